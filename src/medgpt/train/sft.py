"""Supervised fine-tuning on conversations, with TRL's SFTTrainer.

Labels cover the assistant turns only (unless train_on_all). `packing: true` packs samples with
best-fit decreasing into max_length rows and trains padding-free: position ids restart at every
sample, and the attention kernels (flash attention, or SDPA/eager through transformers' packed-sequence
masks) keep packed samples from attending to each other.
"""

from __future__ import annotations

from trl import SFTConfig

from medgpt.config import Config
from medgpt.train import common

CONFIG_CLASS = SFTConfig


def build_datasets(cfg: Config, tokenizer):
    from medgpt.data.templates import get_template

    template = get_template(cfg.model.template, tokenizer)
    train, evals, stats = common.load_records(cfg, "sft")
    train_rows = common.encode_conversations(train, tokenizer, template, cfg, stats["train"])
    eval_rows = common.encode_conversations(evals, tokenizer, template, cfg, stats.get("eval", stats["train"])) if evals else []
    return common.to_dataset(train_rows), common.to_dataset(eval_rows), stats


def run(cfg: Config) -> dict:
    from medgpt.models import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.adapter or cfg.model.model, cfg.model.trust_remote_code)
    train_ds, eval_ds, stats = build_datasets(cfg, tokenizer)
    return common.train_and_save(common.sft_trainer(cfg, tokenizer, train_ds, eval_ds), cfg, stats)
