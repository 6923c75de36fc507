"""Supervised fine-tuning on conversations, with TRL's SFTTrainer.

Labels cover the assistant turns only (unless train_on_all). Unpacked batches are grouped by length. `packing: true` packs samples with
best-fit decreasing into max_length rows and trains padding-free: position ids restart at every
sample, and the attention kernels (flash attention, or SDPA/eager through transformers' packed-sequence
masks) keep packed samples from attending to each other.
"""

from __future__ import annotations

from trl import SFTConfig

from medgpt.config import Config
from medgpt.train import common
from medgpt.train.prepare import prepare

CONFIG_CLASS = SFTConfig


def configure(cfg: Config) -> None:
    """Unpacked batches group samples of similar length (`train_sampling_strategy: group_by_length`) unless a
    sampler is set: every padding token costs a full token's compute and teaches nothing. Unpacked, TRL trains on
    the prepared rows as they are (packing is TRL's)."""
    if not cfg.train.packing and not cfg.train.padding_free and "train_sampling_strategy" not in cfg.raw:
        cfg.train.train_sampling_strategy = "group_by_length"
    if not cfg.train.packing:  # the prepared rows are final (truncated, none without labels): no pass of TRL's
        cfg.train.dataset_kwargs = {"skip_prepare_dataset": True, **(cfg.train.dataset_kwargs or {})}


def prepare_data(cfg: Config, tokenizer):
    """The conversations' input_ids/labels rows, prepared once (`medgpt.train.prepare`)."""
    return prepare(cfg, tokenizer, common.training_template(cfg, tokenizer), "sft")


def build_datasets(cfg: Config, tokenizer):
    """Train and eval rows (memory-mapped, from the prepared-data cache) and the read counts."""
    prepared = prepare_data(cfg, tokenizer)
    return prepared.train, prepared.eval, prepared.stats


def run(cfg: Config) -> dict:
    from trl import SFTTrainer

    trainer, stats = common.build_trainer(cfg, SFTTrainer, build_datasets)
    return common.train_and_save(trainer, cfg, stats)
