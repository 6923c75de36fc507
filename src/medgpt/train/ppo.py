"""RLHF with PPO (Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences").

TRL 1.x has no PPO trainer, so the algorithm lives here as one readable loop. Each step:

1. rollout: sample a response to each of `rollout_batch_size` prompts from the policy (LoRA on the base), each
   ending at its first stop token or stop string (`infer.base.stop_tokens`, the same stops serving uses);
2. score: a frozen reward model (`stage: rm`) and/or reward functions give each response one number, the sum of
   the scores that apply to it (a function's None is left out); a response no reward applies to is left out
   of the update, since a stand-in score such as 0 would train the policy away from it;
3. per-token rewards: `-kl_coef * (log p_policy - log p_reference)` on every response token, plus the
   score on the last one. The reference is the same network with its LoRA adapter switched off, so no
   second copy of the weights is held;
4. advantages by GAE from a value head on the policy's last hidden state;
5. `ppo_epochs` passes over the rollout in shuffled minibatches, minimising the clipped policy loss plus
   `vf_coef` times the clipped value loss;
6. `adaptive_kl` moves `kl_coef` so the KL to the reference approaches `target_kl`.

The step number alone fixes which prompts a step uses and its random seed, so a resumed run continues
exactly where the checkpoint left off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import random
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments

from medgpt.config import Config
from medgpt.data.records import to_prompt
from medgpt.errors import UserError
from medgpt.infer.base import stop_tokens
from medgpt.models import position_ids
from medgpt.train import common, prefs, rewards
from medgpt.train.prepare import conversation_encoder, decode_rows, prepare
from medgpt.train.ppo_losses import KLController, gae, masked_mean, masked_whiten, ppo_losses

log = logging.getLogger(__name__)

VALUE_HEAD = "value_head.safetensors"
STATE_FILE = "trainer_state.json"
REFERENCE_ADAPTER = "reference"


@dataclass
class PPOConfig(TrainingArguments):
    """TrainingArguments plus the PPO knobs.

    One step = one rollout of `rollout_batch_size` prompts (per process), then `ppo_epochs` passes over it
    in minibatches of `mini_batch_size` (one optimizer step each, computed in chunks of
    per_device_train_batch_size). `max_steps` counts rollouts; generation and scoring run in chunks of
    per_device_eval_batch_size. The rewards are `rewards.RewardArgs`, the stage's own options.
    """

    missing_eos_penalty: float = 0.0  # subtracted from the score of a response cut off by max_new_tokens
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = 6.0  # nats per response, the adaptive controller's target
    horizon: int = 10000  # responses over which the adaptive controller moves kl_coef by up to 20%
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    rollout_batch_size: int = 16
    mini_batch_size: int | None = None  # default per_device_train_batch_size * gradient_accumulation_steps
    max_prompt_length: int = 512
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    whiten_rewards: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mini_batch_size is None:
            self.mini_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.mini_batch_size % self.per_device_train_batch_size:
            raise ValueError(f"mini_batch_size {self.mini_batch_size} is not a multiple of "
                             f"per_device_train_batch_size {self.per_device_train_batch_size}")
        if self.rollout_batch_size < self.mini_batch_size:
            raise ValueError(f"rollout_batch_size {self.rollout_batch_size} is smaller than mini_batch_size "
                             f"{self.mini_batch_size}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (PPO samples its rollouts)")


CONFIG_CLASS = PPOConfig
STAGE_ARGS = rewards.RewardArgs


def configure(cfg: Config) -> None:
    """PPO's own checks, before any model is loaded: a reward to optimise, and no eval split."""
    args: rewards.RewardArgs = cfg.stage_args
    if not (args.reward_model or args.reward_fn):
        raise UserError("ppo needs a reward: set reward_model (a `stage: rm` output) or reward_fn")
    if cfg.data.eval_data or cfg.data.val_size:
        raise UserError("ppo has no evaluation split: unset eval_data and val_size")


# ---- the policy, its value head and the reference ----------------------------------------------


class ActorCritic(torch.nn.Module):
    """The policy LM and a scalar value head on its last hidden state: one module to train and prepare."""

    def __init__(self, policy: torch.nn.Module, trainable: str = "fp32") -> None:
        """`trainable`: the run's trainable dtype, which the value head and every trained parameter are held in."""
        from medgpt.models import cast_trainable

        super().__init__()
        self.policy = policy
        hidden = policy.get_input_embeddings().embedding_dim
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        cast_trainable(self, trainable)

    def forward(self, input_ids, attention_mask, logits_to_keep: int):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                          logits_to_keep=logits_to_keep, output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1].to(self.value_head.weight.dtype)  # a bf16 base without autocast
        return out.logits, self.value_head(hidden).squeeze(-1)


def build_policy(cfg: Config, checkpoint: str | None):
    """The trainable policy and a context manager that turns it into the frozen reference.

    LoRA: the reference is the base model (adapter disabled), or, when a trained adapter is given as
    `adapter:`, a frozen second copy of that adapter only. Full fine-tuning keeps a frozen model copy.
    """
    from peft import get_peft_model, load_peft_weights, set_peft_model_state_dict
    from trl.trainer.utils import disable_dropout_in_model, use_adapter

    if cfg.run.method == "full" and cfg.model.adapter:
        raise UserError("ppo with method full trains a whole model: merge the adapter first (medgpt merge)")
    policy = common.load_policy(cfg if not (cfg.run.method == "full" and checkpoint)
                                else dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model=checkpoint)))
    reference = None
    if cfg.run.method == "full":
        reference = common.load_policy(cfg, trainable=False).eval()
        disable_dropout_in_model(reference)
    elif cfg.model.adapter:
        policy.load_adapter(cfg.model.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        policy.set_adapter("default")
    else:
        policy = get_peft_model(policy, common.peft_config(cfg, model=policy))
    if checkpoint and cfg.run.method != "full":
        set_peft_model_state_dict(policy, load_peft_weights(checkpoint), adapter_name="default")
    disable_dropout_in_model(policy)  # dropout would make the update's log-probs differ from the rollout's
    if cfg.train.activation_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @contextlib.contextmanager
    def as_reference():
        if reference is not None:
            yield reference
        else:
            with use_adapter(policy, REFERENCE_ADAPTER if cfg.model.adapter else None):
                yield policy

    return policy, reference, as_reference


# ---- rollouts -----------------------------------------------------------------------------------


def prepare_data(cfg: Config, tokenizer):
    """The prompts with their token ids (`ids`) and the columns reward functions may use (answer, reference),
    prepared once (`medgpt.train.prepare`), with the template set on `tokenizer`.

    Read like GRPO's: SFT conversations (up to the last user turn; the answer becomes `reference`),
    multiple-choice rows, `{"question", "answer"}` and `{"query"}` rows. A prompt over max_prompt_length is dropped
    or keeps its end, the question, as `overlong` says.
    """
    encode = conversation_encoder(responses=(), carry=("answer", "options", "reference", "rubrics"), prompt_ids=True)
    return prepare(cfg, tokenizer, prefs.use_template(cfg, tokenizer), "prompts", encode=encode, normalize=to_prompt)


def read_rollout_prompts(cfg: Config, tokenizer) -> tuple[Any, dict]:
    """The prepared prompts (memory-mapped, each row decoded as it is read) and the read counts."""
    prepared = prepare_data(cfg, tokenizer)
    return prepared.train.with_transform(decode_rows), prepared.stats


def prompts_for_step(n_prompts: int, step: int, batch: int, rank: int, world: int, seed: int) -> list[int]:
    """Indices into a stream of shuffled passes over the prompts: fixed by the step alone, so resume is exact."""
    orders: dict[int, list[int]] = {}
    out = []
    for k in range((step * world + rank) * batch, (step * world + rank + 1) * batch):
        epoch, i = divmod(k, n_prompts)
        if epoch not in orders:
            orders[epoch] = list(range(n_prompts))
            random.Random(seed + epoch).shuffle(orders[epoch])
        out.append(orders[epoch][i])
    return out


@dataclass
class Rollout:
    """One batch of prompt+response sequences (prompts left-padded to width P) and what PPO needs of them."""

    input_ids: torch.Tensor  # [N, P + R]
    attention_mask: torch.Tensor
    responses: torch.Tensor  # [N, R]
    mask: torch.Tensor  # [N, R] 1 on response tokens (through the stop token)
    scores: torch.Tensor  # [N]
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> Rollout:
        return Rollout(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                          for f in dataclasses.fields(self)})


def _first(lo: int, hi: int, holds: Callable[[int], bool]) -> int:
    """The smallest k in [lo, hi] for which `holds(k)`, for a condition that, once true, stays true (hi: true)."""
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
    return lo


def cut_response(row: list[int], tokenizer, stop_ids: set[int] | list[int],
                 stop_strings: list[str] | tuple[str, ...] = ()) -> tuple[list[int], int, bool]:
    """A sampled row cut at its first stop: (the tokens PPO trains on, through the stop; how many of them come
    before the stop, the reply the rewards read; whether it stopped). A stop token ends the row at that token;
    a stop string (a stop word the vocabulary holds only as several tokens) at the token that completes it,
    and the reply is the tokens before the one it starts in. A row with neither was cut off at the length
    limit; what generate() padded after a stop is dropped."""
    stop_ids = set(stop_ids)
    end = next((i for i, token in enumerate(row) if token in stop_ids), None)
    head = list(row if end is None else row[:end])
    text = lambda n: tokenizer.decode(head[:n], skip_special_tokens=False)  # noqa: E731
    if stop_strings and any(s in text(len(head)) for s in stop_strings):
        # a prefix that holds a stop string only grows: search for the shortest one, then for the stop's start
        kept = _first(1, len(head), lambda n: any(s in text(n) for s in stop_strings))
        start = min(i for i in (text(kept).find(s) for s in stop_strings) if i >= 0)
        return head[:kept], _first(0, kept - 1, lambda n: len(text(n + 1)) > start), True
    if end is not None:
        return list(row[:end + 1]), end, True
    return list(row), len(row), False


def generate(policy, tokenizer, prompt_ids: list[list[int]], args: PPOConfig, stop_ids: list[int],
             stop_strings: list[str] | tuple[str, ...] = ()) -> list[tuple[list[int], int, bool]]:
    """Sample one response per prompt, each cut at its first stop token or stop string (`cut_response`)."""
    from transformers import GenerationConfig
    from trl.trainer.utils import pad

    device = next(policy.parameters()).device
    ids = [torch.tensor(p) for p in prompt_ids]
    input_ids = pad(ids, tokenizer.pad_token_id, "left").to(device)
    mask = pad([torch.ones_like(i) for i in ids], 0, "left").to(device)
    # every sampling knob set explicitly: the model's own defaults (top_p, repetition_penalty) would make the
    # sampled distribution differ from the one whose log-probs PPO optimises
    config = GenerationConfig(do_sample=True, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, max_new_tokens=args.max_new_tokens, eos_token_id=list(stop_ids),
                              pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0,
                              stop_strings=list(stop_strings) or None)
    out = policy.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                          **({"tokenizer": tokenizer} if stop_strings else {}))
    return [cut_response(row, tokenizer, stop_ids, stop_strings) for row in out[:, input_ids.shape[1]:].tolist()]


def response_stats(model: ActorCritic | torch.nn.Module, batch: Rollout, temperature: float, with_values: bool = True):
    """Log-probs and entropies of the response tokens (and values of the states before each) under `model`."""
    from trl.trainer.utils import selective_log_softmax_and_entropy

    width = batch.responses.shape[1]
    if with_values:
        logits, values = model(batch.input_ids, batch.attention_mask, logits_to_keep=width + 1)
        values = values[:, -width - 1:-1]
    else:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids(batch.attention_mask), logits_to_keep=width + 1,
                       use_cache=False).logits
        values = None
    logprobs, entropy = selective_log_softmax_and_entropy(logits[:, :-1].float(), batch.responses,
                                                          temperature=temperature)
    return logprobs, entropy, values


# ---- the loop -----------------------------------------------------------------------------------


class PPO:
    """The state of one PPO run: models, optimizer, schedule; `step()` does one rollout and its updates."""

    def __init__(self, cfg: Config) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        from medgpt.models import open_tokenizer

        self.cfg, self.args = cfg, cfg.train
        args = self.args
        self.accelerator = Accelerator(cpu=args.use_cpu, mixed_precision=args.mixed_precision)
        set_seed(args.seed)
        self.tokenizer = open_tokenizer(cfg.model)
        self.template = prefs.use_template(cfg, self.tokenizer)
        self.scorers = rewards.build_rewards(cfg.stage_args, device=str(self.accelerator.device),
                                             dtype=cfg.model.dtype, batch_size=args.per_device_eval_batch_size)
        self.prompts, self.stats = read_rollout_prompts(cfg, self.tokenizer)
        self.checkpoint = common.last_checkpoint(cfg)
        state = json.loads((Path(self.checkpoint) / STATE_FILE).read_text()) if self.checkpoint else {}
        self.global_step = state.get("global_step", 0)
        self.kl = KLController(args, state.get("kl_coef", args.kl_coef))

        policy, reference, self.as_reference = build_policy(cfg, self.checkpoint)
        ids, self.stop_strings = stop_tokens(self.tokenizer, self.template, policy)
        self.stop_ids = sorted(ids)
        model = ActorCritic(policy, common.training_precision(cfg).trainable)
        if self.checkpoint:
            from safetensors.torch import load_file

            model.value_head.load_state_dict(load_file(Path(self.checkpoint) / VALUE_HEAD))
        if reference is not None:
            reference.to(self.accelerator.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon, weight_decay=args.weight_decay)
        world = self.accelerator.num_processes
        per_epoch = math.ceil(len(self.prompts) / (args.rollout_batch_size * world))
        self.total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
        updates = self.total_steps * args.ppo_epochs * math.ceil(args.rollout_batch_size / args.mini_batch_size)
        scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(updates),
                                  num_training_steps=updates, scheduler_specific_kwargs=args.lr_scheduler_kwargs)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.scheduler = scheduler  # stepped once per optimizer step here, so not wrapped by accelerate
        if self.checkpoint:
            self.optimizer.load_state_dict(torch.load(Path(self.checkpoint) / "optimizer.pt", weights_only=True))
            self.scheduler.load_state_dict(torch.load(Path(self.checkpoint) / "scheduler.pt", weights_only=True))
            log.info("resumed from %s at step %d", self.checkpoint, self.global_step)

    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    @torch.no_grad()
    def rollout(self) -> tuple[Rollout, dict[str, float]]:
        """Sample, score, and turn the scores into per-token rewards and advantages."""
        from trl.trainer.utils import pad

        args, acc = self.args, self.accelerator
        order = prompts_for_step(len(self.prompts), self.global_step, args.rollout_batch_size, acc.process_index,
                                 acc.num_processes, args.seed)
        picked = [self.prompts[i] for i in order]
        policy = self.unwrapped.policy
        self.model.eval()
        chunk = args.per_device_eval_batch_size
        with acc.autocast():
            cut = [c for s in range(0, len(picked), chunk)
                   for c in generate(policy, self.tokenizer, [p["ids"] for p in picked[s:s + chunk]], args,
                                     self.stop_ids, self.stop_strings)]
        responses = [ids for ids, _, _ in cut]
        finished = [done for _, _, done in cut]
        replies = [ids[:n] for ids, n, _ in cut]
        texts = [self.tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        columns = {"prompts": [p["prompt"] for p in picked],
                   "completions": [[{"role": "assistant", "content": t}] for t in texts], "completion_ids": replies,
                   **{k: [p.get(k) for p in picked] for k in ("answer", "options", "reference", "rubrics")}}
        summed = [None if all(v is None for v in row) else sum(v for v in row if v is not None)
                  for row in zip(*(self._score(fn, columns) for fn in self.scorers))]
        scored = torch.tensor([s is not None for s in summed], dtype=torch.float32, device=acc.device)
        scores = torch.tensor([s or 0.0 for s in summed], dtype=torch.float32, device=acc.device)
        scores -= args.missing_eos_penalty * torch.tensor([not f for f in finished], dtype=torch.float32,
                                                          device=acc.device)
        scores *= scored

        prompt_ids = pad([torch.tensor(p["ids"]) for p in picked], self.tokenizer.pad_token_id, "left")
        prompt_mask = pad([torch.ones(len(p["ids"]), dtype=torch.long) for p in picked], 0, "left")
        response_ids = pad([torch.tensor(r) for r in responses], self.tokenizer.pad_token_id, "right")
        response_mask = pad([torch.ones(len(r), dtype=torch.long) for r in responses], 0, "right")
        tokens = response_mask.float().to(acc.device)  # every response token, through the stop
        batch = Rollout(input_ids=torch.cat([prompt_ids, response_ids], 1).to(acc.device),
                        attention_mask=torch.cat([prompt_mask, response_mask], 1).to(acc.device),
                        responses=response_ids.to(acc.device), mask=tokens * scored[:, None], scores=scores)

        parts = []  # (logprobs, entropy, values, reference logprobs) per chunk
        for rows in torch.arange(len(picked), device=acc.device).split(chunk):
            part = batch.rows(rows)
            with acc.autocast():
                logprobs, entropy, values = response_stats(self.model, part, args.temperature)
                with self.as_reference() as reference:
                    ref_logprobs = response_stats(reference, part, args.temperature, with_values=False)[0]
            parts.append((logprobs, entropy, values.float(), ref_logprobs))
        logprobs, entropy, values, ref_logprobs = (torch.cat(t) for t in zip(*parts))
        mask = batch.mask  # the tokens of scored responses: the only ones the update learns from
        batch.logprobs, batch.values = logprobs * mask, values * mask
        kl = (logprobs - ref_logprobs) * tokens
        rewards = -self.kl.value * kl * mask
        rewards[torch.arange(len(picked)), tokens.sum(1).long() - 1] += scores  # the score lands on the last token
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages = gae(rewards, batch.values, args.gamma, args.lam)
        batch.returns = advantages + batch.values
        batch.advantages = masked_whiten(advantages, mask) * mask
        given = scores[scored.bool()]  # no score at all: NaN, as TRL logs a reward that applied to no completion
        stats = {"reward": given.mean().item() if len(given) else math.nan,
                 "reward_std": given.std().item() if len(given) > 1 else 0.0, "scored": scored.mean().item(),
                 "kl": kl.sum(1).mean().item(), "non_score_reward": -self.kl.value * kl.sum(1).mean().item(),
                 "entropy": masked_mean(entropy, tokens).item(), "response_length": tokens.sum(1).mean().item(),
                 "finished": sum(finished) / len(finished), "kl_coef": self.kl.value}
        return batch, stats

    def _score(self, fn: Callable[..., list], columns: dict[str, list]) -> list[float | None]:
        """One function's scores; None where the function does not apply to that row."""
        scores = fn(**columns)
        if len(scores) != len(columns["prompts"]):
            name = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__", fn))
            raise UserError(f"reward function {name}: {len(scores)} scores for {len(columns['prompts'])} responses")
        return [None if s is None or (isinstance(s, float) and math.isnan(s)) else float(s) for s in scores]

    def update(self, batch: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of clipped policy + value loss over the rollout in shuffled minibatches."""
        args, acc = self.args, self.accelerator
        self.model.train()
        totals: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.ppo_epochs):
            for minibatch in torch.randperm(len(batch.scores), device=acc.device).split(args.mini_batch_size):
                for rows in minibatch.split(args.per_device_train_batch_size):
                    part = batch.rows(rows)
                    logprobs, entropy, values = response_stats(self.model, part, args.temperature)
                    losses = ppo_losses(part, logprobs, values.float(), args)
                    loss = losses["policy_loss"] + args.vf_coef * losses["value_loss"]
                    acc.backward(loss * len(rows) / len(minibatch))
                    for key, value in losses.items():
                        totals[key].append(value.item())
                if args.max_grad_norm:
                    acc.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
        return {**{k: sum(v) / len(v) for k, v in totals.items()}, "learning_rate": self.scheduler.get_last_lr()[0]}

    def step(self) -> dict[str, float]:
        """One rollout, its PPO updates and the KL controller's move; seeded by the step number."""
        acc = self.accelerator
        torch.manual_seed(self.args.seed + self.global_step * acc.num_processes + acc.process_index)
        batch, stats = self.rollout()
        stats.update(self.update(batch))
        kl = acc.reduce(torch.tensor(stats["kl"], device=acc.device), "mean").item()
        self.kl.update(kl, self.args.rollout_batch_size * acc.num_processes)
        self.global_step += 1
        return stats

    def save_checkpoint(self) -> None:
        from medgpt.files import save_atomic, write_json

        if not self.accelerator.is_main_process:
            return
        out = self.cfg.output_dir / f"checkpoint-{self.global_step}"

        def save(tmp: Path) -> None:
            from safetensors.torch import save_file

            self.save_policy(tmp)
            save_file(self.unwrapped.value_head.state_dict(), str(tmp / VALUE_HEAD))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            write_json(tmp / STATE_FILE, {"global_step": self.global_step, "kl_coef": self.kl.value})

        save_atomic(out, save)
        log.info("saved %s", out)
        limit = self.args.save_total_limit
        if limit:
            old = sorted(self.cfg.output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[:-limit]
            for folder in old:
                shutil.rmtree(folder, ignore_errors=True)

    def save_policy(self, folder: Path) -> None:
        policy = self.unwrapped.policy
        if self.cfg.run.method == "full":
            policy.save_pretrained(folder, safe_serialization=True)
        else:
            policy.save_pretrained(folder, selected_adapters=["default"], safe_serialization=True)


def run(cfg: Config) -> dict:
    """Train with PPO; returns the metrics of the last logged steps."""
    from tqdm.auto import tqdm

    ppo = PPO(cfg)
    common.prepare_output(cfg, ppo.global_step if ppo.checkpoint else None)
    args, acc = ppo.args, ppo.accelerator
    writer = None
    if acc.is_main_process and "tensorboard" in (args.report_to or []):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.output_dir / "runs"))
    every = _steps(args.logging_steps, ppo.total_steps)
    save_every = _steps(args.save_steps, ppo.total_steps) if args.save_strategy != "no" else 0
    pending: dict[str, list[float]] = defaultdict(list)
    last: dict[str, float] = {}
    bar = tqdm(total=ppo.total_steps, initial=ppo.global_step, desc="ppo", disable=not acc.is_local_main_process)
    while ppo.global_step < ppo.total_steps:
        stats = ppo.step()
        for key, value in stats.items():
            pending[key].append(value)
        bar.update()
        bar.set_postfix(reward=f"{stats['reward']:.3f}", kl=f"{stats['kl']:.3f}")
        if ppo.global_step % every == 0 or ppo.global_step == ppo.total_steps:
            last = {k: acc.reduce(torch.tensor(sum(v) / len(v), device=acc.device), "mean").item()
                    for k, v in pending.items()}
            pending.clear()
            if acc.is_main_process:
                _log(cfg.output_dir, ppo.global_step, last, writer)
        if save_every and ppo.global_step % save_every == 0:
            ppo.save_checkpoint()
    bar.close()
    if writer:
        writer.close()
    acc.wait_for_everyone()
    metrics = {"global_step": ppo.global_step, **last}
    if acc.is_main_process:
        save_final(ppo, cfg, metrics)
    return metrics


def save_final(ppo: PPO, cfg: Config, metrics: dict[str, float]) -> None:
    """The trained adapter (or model) with its tokenizer, counts, metrics and medgpt.json, as the other stages
    leave them; medgpt.json is written last, marking the folder complete."""
    ppo.save_policy(cfg.output_dir)
    common.save_outputs(cfg, ppo.tokenizer, ppo.stats, metrics)


def _steps(value: float, total: int) -> int:
    """A TrainingArguments step interval: an int, or a float < 1 as a share of the total."""
    return max(1, math.ceil(value * total) if value < 1 else int(value))


def _log(output_dir: Path, step: int, stats: dict[str, float], writer) -> None:
    with (output_dir / common.METRICS_FILE).open("a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "time": time.time(), **stats}) + "\n")
    if writer:
        for key, value in stats.items():
            writer.add_scalar(f"ppo/{key}", value, step)
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
