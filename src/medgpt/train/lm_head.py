"""The LM head the TRL loss reads, chosen for the device (`lm_head_loss`): TRL's chunked log-prob head, or the
plain logits of the labelled positions.

TRL's SFT, DPO (and KTO, GRPO) trainers call `model(..., labels=labels, fused_lm_head=True)` and read per-token
log-probabilities (and entropy, top-1 hits, mean logits for their metrics) from a head that never builds the
full logits (`trl.trainer.utils.add_fused_lm_head`). On a GPU that head is a Triton kernel over the labelled
positions only. Without Triton (CPUs) it folds every position, padding and prompt included, through a dozen
element-wise torch passes per vocabulary tile, and recomputes the tiles in the backward pass.

`plain` keeps the same contract (same outputs, same loss) but projects only the labelled positions through the
LM head once and takes their logsumexp: the fp32 logits of those positions are held (labelled tokens x
vocabulary x 4 bytes) and turned into their own gradient in the backward pass; `auto` allows that on a CPU
where twice their size fits in `PLAIN_LOGITS_SHARE` of the RAM. GPUs keep TRL's kernel.
"""

from __future__ import annotations

import logging
import types

from medgpt.config import Config
from medgpt.errors import UserError
from medgpt.stages import stage_facts

log = logging.getLogger(__name__)
PLAIN_LOGITS_SHARE = 0.1  # of the RAM the labelled positions' logits (and their gradient) may take on a CPU
# model configs whose logits are scaled or soft-capped: TRL's head applies these; `plain` does not
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                 "logits_scaling")


def choose(cfg: Config, model) -> str:
    """`plain` or `chunked` for this run: what `lm_head_loss` says, `auto` resolved for the device."""
    asked = cfg.run.lm_head_loss
    text = model.config.get_text_config()
    scaled = [k for k in SCALED_LOGITS if getattr(text, k, None) not in (None, 1.0)]
    why_not = (f"stage {cfg.run.stage} keeps TRL's head" if not stage_facts(cfg.run.stage).plain_head
               else f"the model scales its logits ({', '.join(scaled)})" if scaled else None)
    if asked == "plain" and why_not:
        raise UserError(f"lm_head_loss plain: {why_not} (use auto or chunked)")
    if asked != "auto":
        return asked
    if why_not or not cfg.train.use_cpu:
        return "chunked"  # on a GPU: TRL's Triton kernel scores only the labelled positions, without logits
    return "plain" if logits_bytes(cfg, text.vocab_size) <= PLAIN_LOGITS_SHARE * ram_bytes() else "chunked"


def logits_bytes(cfg: Config, vocab: int) -> int:
    """The most the plain head holds: every token of a micro-batch labelled, fp32 logits and their gradient
    (DPO's chosen and rejected go through together)."""
    rows = cfg.train.per_device_train_batch_size * (2 if stage_facts(cfg.run.stage).paired else 1)
    return rows * (cfg.train.max_length or 1024) * vocab * 4 * 2


def ram_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


ENTROPY_ROWS = 256  # positions per slice of the entropy: a temporary of 256 x vocabulary, not of the logits' size


def entropy_of(logits, lse):
    """The entropy of each row's softmax, -sum p log p with log p = logits - lse, a slice of rows at a time."""
    import torch

    parts = []
    for start in range(0, logits.shape[0], ENTROPY_ROWS):
        log_p = logits[start:start + ENTROPY_ROWS] - lse[start:start + ENTROPY_ROWS].unsqueeze(-1)
        parts.append(-(log_p.exp() * log_p).sum(-1))
    return torch.cat(parts) if parts else logits.new_zeros(0)


def use_plain_head(model) -> None:
    """Replace TRL's fused head on `model` (the causal LM TRL patched, not its PEFT wrapper) with the plain one:
    `fused_lm_head=True` calls return the same `FusedCausalLMOutput` fields (log_probs, entropy, mean_logits,
    is_top1, label_mask, loss), zero on positions whose label is -100. Entropy and mean logits are computed
    without gradient (TRL's trainers read them only for their metrics)."""
    import torch
    from trl.trainer.utils import FusedCausalLMOutput

    original = types.MethodType(type(model).forward, model)  # the model's own forward, under TRL's patch

    class LabelLogProbs(torch.autograd.Function):
        """log softmax(logits)[label] per row, and the rows' logsumexp, keeping only the logits (which the head
        made anyway): the backward pass turns them, in place, into their gradient g * (one-hot - softmax).
        `log_softmax` + `gather` keep the log-softmax and then build a dense gradient of it and one of the
        logits: three logits-sized buffers at the peak of the backward pass instead of one."""

        @staticmethod
        def forward(ctx, logits, labels):
            lse = logits.logsumexp(-1)
            picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
            ctx.save_for_backward(logits, lse, labels)
            ctx.mark_non_differentiable(lse)
            return picked, lse

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad, _):
            logits, lse, labels = ctx.saved_tensors
            grad_logits = logits.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad.unsqueeze(-1))
            return grad_logits.scatter_add_(-1, labels.unsqueeze(-1), grad.unsqueeze(-1)), None

    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return original(*args, **kwargs, **extra)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        mask = targets != -100
        lm_head = self.get_output_embeddings()
        logits = lm_head(hidden[mask].to(lm_head.weight.device)).float()
        picked = targets[mask].to(logits.device)
        log_probs, lse = LabelLogProbs.apply(logits, picked)
        with torch.no_grad():
            mean_logits, is_top1 = logits.mean(-1), logits.argmax(-1) == picked
            entropy = entropy_of(logits.detach(), lse)

        def spread(values):  # back to the label mask's shape, zero where there is no label
            return values.new_zeros(mask.shape).masked_scatter(mask.to(values.device), values)

        total = log_probs.sum()
        loss = -total / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        return FusedCausalLMOutput(loss=loss, log_probs=spread(log_probs), entropy=spread(entropy),
                                   mean_logits=spread(mean_logits), is_top1=spread(is_top1), label_mask=mask)

    model.forward = types.MethodType(forward, model)


def apply(trainer, cfg: Config) -> str:
    """Set the head `choose` picks on the trainer's model (and reference model); returns its name."""
    from peft import PeftModel

    def causal_lm(model):
        return model.get_base_model() if isinstance(model, PeftModel) else model

    policy = causal_lm(trainer.model)
    if not hasattr(policy, "get_output_embeddings") or policy.get_output_embeddings() is None:
        return "none"
    head = choose(cfg, policy)
    if head == "plain":
        for model in (policy, getattr(trainer, "ref_model", None)):
            if model is not None:
                use_plain_head(causal_lm(model))
    log.info("lm_head_loss: %s", head)
    return head
