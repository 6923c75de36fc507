"""Supervised fine-tuning on conversations, with TRL's SFTTrainer.

Labels cover the assistant turns only (unless train_on_all). Unpacked batches are grouped by length. `packing: true` packs samples with
best-fit decreasing into max_length rows and trains padding-free: position ids restart at every
sample, and the attention kernels (flash attention, or SDPA/eager through transformers' packed-sequence
masks) keep packed samples from attending to each other.
"""

from __future__ import annotations

from trl import SFTConfig

from medgpt.config import Config
from medgpt.data.encode import encode_conversations
from medgpt.train import common

CONFIG_CLASS = SFTConfig


def configure(cfg: Config) -> None:
    """Unpacked batches group samples of similar length (`train_sampling_strategy: group_by_length`) unless a
    sampler is set: every padding token costs a full token's compute and teaches nothing."""
    if not cfg.train.packing and not cfg.train.padding_free and "train_sampling_strategy" not in cfg.raw:
        cfg.train.train_sampling_strategy = "group_by_length"


def build_datasets(cfg: Config, tokenizer):
    template = common.training_template(cfg, tokenizer)
    train, evals, stats = common.load_records(cfg, "sft")
    train_rows = encode_conversations(train, tokenizer, template, cfg, stats["train"])
    eval_stats = stats.get("eval", stats["train"])
    eval_rows = encode_conversations(evals, tokenizer, template, cfg, eval_stats) if evals else []
    return common.to_dataset(train_rows), common.to_dataset(eval_rows), stats


def run(cfg: Config) -> dict:
    from trl import SFTTrainer

    trainer, stats = common.build_trainer(cfg, SFTTrainer, build_datasets)
    return common.train_and_save(trainer, cfg, stats)
