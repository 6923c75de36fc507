"""What the preference and RL stages (rm, dpo, orpo, kto, grpo) share: the chat template TRL renders with,
records as TRL's conversational datasets (overlong ones dropped and counted), the frozen reference model,
and the trainer set-up.

TRL renders conversations with `tokenizer.apply_chat_template`, so a named template's Jinja form is set on
the tokenizer: prompts are then rendered exactly as in SFT (and saved with the model for inference).
"""

from __future__ import annotations

from collections.abc import Callable

from medgpt.config import Config
from medgpt.errors import UserError
from medgpt.train import common


def use_template(cfg: Config, tokenizer):
    """The configured template, with its chat template set on the tokenizer unless it is the tokenizer's own."""
    from medgpt.data.templates import get_template

    template = get_template(cfg.model.template, tokenizer)
    if cfg.model.template != "auto":
        tokenizer.chat_template = template.chat_template()
    return template


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """Prepend the configured system prompt to a prompt that has none of its own."""
    if not system or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]


def to_rows(records: list[dict], tokenizer, template, cfg: Config, stats, responses: tuple[str, ...],
            carry: tuple[str, ...] = ()) -> list[dict]:
    """Records -> TRL conversational rows (prompt with the system prompt, the `responses` fields and the
    `carry` fields). A record whose longest prompt+response is over max_length is dropped (counted) or
    left to the trainer to truncate, as `overlong` says."""
    from medgpt.data.readers import filter_by_length

    keep = range(len(records))
    if max_length := getattr(cfg.train, "max_length", None):
        def length(messages: list[dict]) -> int:
            return len(template.encode(tokenizer, messages, system=cfg.data.system)["input_ids"])

        lengths = [max(length(r["prompt"] + r[key]) for key in responses) for r in records]
        keep = filter_by_length(records, lengths, max_length, cfg.data.overlong, stats)
    return [{"prompt": with_system(records[i]["prompt"], cfg.data.system),
             **{key: records[i][key] for key in responses + carry}} for i in keep]


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


def build_trainer(cfg: Config, trainer_cls, datasets: Callable = conversation_datasets, load: Callable = common.load_policy,
                  task_type: str = "CAUSAL_LM", **trainer_kwargs):
    """A TRL trainer on the model `load(cfg)` returns, the data `datasets(cfg, tokenizer)` returns, the
    configured LoRA and the metrics log; returns (trainer, read counts)."""
    from medgpt.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.adapter or cfg.model.model, cfg.model.trust_remote_code)
    train_ds, eval_ds, stats = datasets(cfg, tokenizer)
    common.enable_eval(cfg, eval_ds)
    trainer = trainer_cls(
        model=load(cfg),
        args=cfg.train,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=common.peft_config(cfg, task_type),
        callbacks=[common.metrics_callback(cfg.output_dir)],
        **trainer_kwargs,
    )
    return trainer, stats
