"""Supervised fine-tuning on conversations, with TRL's SFTTrainer.

Labels cover the assistant turns only (unless train_on_all). Unpacked batches are grouped by length. `packing: true` packs samples with
best-fit decreasing into max_length rows and trains padding-free: position ids restart at every
sample, and the attention kernels (flash attention, or SDPA/eager through transformers' packed-sequence
masks) keep packed samples from attending to each other.
"""

from __future__ import annotations

from trl import SFTConfig, SFTTrainer

from medgpt.config import Config
from medgpt.train import common
from medgpt.train.prepare import prepare, row_lengths

CONFIG_CLASS = SFTConfig


class PreparedSFTTrainer(SFTTrainer):
    """SFTTrainer whose length-grouped sampler takes the rows' lengths from their Arrow offsets: transformers'
    own would decode every row to measure it (minutes before the first step for millions of rows)."""

    def _get_train_sampler(self, train_dataset=None):
        from transformers.trainer_pt_utils import LengthGroupedSampler

        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or "input_ids" not in getattr(dataset,
                                                                                                "column_names", ()):
            return super()._get_train_sampler(train_dataset)
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=row_lengths(dataset))


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
    trainer, stats = common.build_trainer(cfg, PreparedSFTTrainer, build_datasets)
    return common.train_and_save(trainer, cfg, stats)
