"""What the preference and RL stages (rm, dpo, orpo, kto, grpo) share: the chat template TRL renders with,
records as TRL's conversational datasets (overlong ones dropped and counted) and the frozen reference model.

TRL renders conversations with `tokenizer.apply_chat_template`, so a named template's Jinja form is set on
the tokenizer: prompts are then rendered exactly as in SFT (and saved with the model for inference).
"""

from __future__ import annotations

from collections.abc import Callable

from medgpt.config import Config
from medgpt.data.encode import to_rows
from medgpt.errors import UserError
from medgpt.train import common


def use_template(cfg: Config, tokenizer):
    """The configured template, with its chat template set on the tokenizer unless it is the tokenizer's own."""
    template = common.training_template(cfg, tokenizer)
    if cfg.model.template != "auto":
        tokenizer.chat_template = template.chat_template()
    return template


def conversation_datasets(cfg: Config, tokenizer, kind: str = "pref", read: Callable | None = None,
                  responses: tuple[str, ...] = ("chosen", "rejected"), carry: tuple[str, ...] = ()):
    """Train and eval datasets of conversational rows ({"prompt", "chosen", "rejected"} by default) and the
    read counts; `kind`/`read` name another record kind and its reader."""
    template = use_template(cfg, tokenizer)
    train, evals, stats = common.load_records(cfg, kind, read=read)
    train_rows = to_rows(train, tokenizer, template, cfg, stats["train"], responses, carry)
    eval_rows = to_rows(evals, tokenizer, template, cfg, stats.get("eval", stats["train"]), responses, carry)
    if not train_rows:
        raise UserError(f"{cfg.data.data}: every record is longer than max_length {cfg.train.max_length}")
    return common.to_dataset(train_rows), common.to_dataset(eval_rows), stats


def reference_model(cfg: Config):
    """The frozen reference for DPO/KTO full fine-tuning, loaded like the policy so both start equal.

    With LoRA none is loaded: TRL disables the adapter to get the reference (or, when training a loaded
    adapter further, keeps a frozen copy of it).
    """
    if cfg.run.method != "full" or cfg.model.adapter or getattr(cfg.train, "precompute_ref_log_probs", False):
        return None
    from medgpt.models import load_model

    return load_model(cfg.model, training=True).eval()
