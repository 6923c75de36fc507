"""What the preference and RL stages (rm, dpo, orpo, kto, grpo) share: the chat template TRL renders with,
records as TRL's conversational datasets (prepared once into the memory-mapped cache of `medgpt.train.prepare`,
overlong ones dropped and counted) and the frozen reference model.

TRL renders conversations with `tokenizer.apply_chat_template`, so a named template's Jinja form is set on
the tokenizer: prompts are then rendered exactly as in SFT (and saved with the model for inference).
"""

from __future__ import annotations

from collections.abc import Callable

from medgpt.config import Config
from medgpt.train import common
from medgpt.train.prepare import Prepared, conversation_encoder, decode_rows, num_proc, prepare

PARALLEL_ROWS = 10_000  # from this many rows TRL's own tokenization runs in parallel processes


def use_template(cfg: Config, tokenizer):
    """The configured template, with its chat template set on the tokenizer unless it is the tokenizer's own."""
    template = common.training_template(cfg, tokenizer)
    if cfg.model.template != "auto":
        tokenizer.chat_template = template.chat_template()
    return template


def prepare_rows(cfg: Config, tokenizer, kind: str = "pref", normalize: Callable | None = None,
                 responses: tuple[str, ...] = ("chosen", "rejected"), carry: tuple[str, ...] = ()) -> Prepared:
    """The prepared conversational rows ({"prompt", "chosen", "rejected"} by default) of `cfg`'s records, with
    the template TRL renders them with set on `tokenizer`; `kind`/`normalize` name another record kind and its
    normalizer (`iter_records`' argument), `responses`/`carry` the row's fields (`conversation_rows`)."""
    return prepare(cfg, tokenizer, use_template(cfg, tokenizer), kind, encode=conversation_encoder(responses, carry),
                   normalize=normalize)


def conversation_datasets(cfg: Config, tokenizer, prepare_data: Callable = prepare_rows):
    """Train and eval datasets of conversational rows (memory-mapped, each row decoded as TRL reads it) and the
    read counts, prepared by `prepare_data` (a stage's: `prepare_rows` with its kind)."""
    prepared = prepare_data(cfg, tokenizer)
    if hasattr(cfg.train, "dataset_num_proc") and cfg.train.dataset_num_proc is None and \
            len(prepared.train) >= PARALLEL_ROWS:
        cfg.train.dataset_num_proc = num_proc(cfg)  # TRL tokenizes the rows in as many processes as prepare used
    return (*(None if ds is None else ds.with_transform(decode_rows) for ds in (prepared.train, prepared.eval)),
            prepared.stats)


def reference_model(cfg: Config):
    """The frozen reference for DPO/KTO full fine-tuning, loaded like the policy so both start equal.

    With LoRA none is loaded: TRL disables the adapter to get the reference (or, when training a loaded
    adapter further, keeps a frozen copy of it).
    """
    if cfg.run.method != "full" or cfg.model.adapter or getattr(cfg.train, "precompute_ref_log_probs", False):
        return None
    from medgpt.models import load_model

    return load_model(cfg.model, training=True).eval()
