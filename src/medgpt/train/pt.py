"""Continued pretraining on plain text, with TRL's SFTTrainer in language-modelling mode.

Each document (a line of a .txt file, or a `text` field) is tokenized with an EOS appended, and the token
stream is cut into `block_size` blocks ("wrapped" packing): a block may hold the end of one document and the
start of the next, which attend to each other across the EOS. With `isolate_documents: true` documents are
packed whole into blocks (best fit decreasing; a document longer than a block is split), trained
padding-free with position ids that restart at every document, so transformers' packed-sequence masks
(SDPA/eager) or the varlen flash-attention kernels keep the documents in a block from seeing one another.
Evaluation reports perplexity.

On a model whose vocabulary `medgpt tokenizer extend` grew, LoRA also trains the input embeddings and the LM head
in full (`modules_to_save: embed_tokens,lm_head`, set unless the config sets it), so the new tokens' rows learn.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from trl import SFTConfig

from medgpt.config import Config
from medgpt.errors import UserError
from medgpt.train import common
from medgpt.vocab import vocabulary_extension

log = logging.getLogger(__name__)
CONFIG_CLASS = SFTConfig


@dataclass
class PTArgs:
    """How the text is cut into training blocks."""

    block_size: int | None = None  # tokens per block; default: max_length (1024)
    isolate_documents: bool = False  # no attention between documents packed into one block


STAGE_ARGS = PTArgs


def configure(cfg: Config) -> None:
    """Turn block_size / isolate_documents into the SFT packing options they mean."""
    pt: PTArgs = cfg.stage_args
    if pt.block_size is not None:
        if pt.block_size < 2:
            raise UserError(f"block_size {pt.block_size}: must be at least 2 tokens")
        if "max_length" in cfg.raw and cfg.train.max_length != pt.block_size:
            raise UserError(f"block_size {pt.block_size} and max_length {cfg.train.max_length} disagree: set one")
        cfg.train.max_length = pt.block_size
    if not cfg.train.max_length:
        raise UserError("stage pt needs a block size: set block_size (or max_length)")
    cfg.train.packing = True
    cfg.train.packing_strategy = "bfd_split" if pt.isolate_documents else "wrapped"
    cfg.train.padding_free = pt.isolate_documents
    cfg.train.dataset_text_field = "text"
    cfg.train.completion_only_loss = False
    train_new_token_rows(cfg)


EXTENDED_VOCAB_MODULES = "embed_tokens,lm_head"


def train_new_token_rows(cfg: Config) -> None:
    """LoRA on a model with an extended vocabulary: train the embeddings and LM head in full (their new rows
    start as means of old ones), unless the config names modules_to_save itself."""
    model = cfg.model.model
    if cfg.run.method == "full" or cfg.model.adapter or not model or not Path(model).is_dir():
        return
    extension = vocabulary_extension(model)
    if extension and not cfg.lora.modules_to_save:
        cfg.lora.modules_to_save = EXTENDED_VOCAB_MODULES
        log.info("%s has %d tokens added by `medgpt tokenizer extend`: LoRA also trains %s in full", model,
                 extension.get("pieces_added", 0), EXTENDED_VOCAB_MODULES)


def text_datasets(cfg: Config, tokenizer):
    """Train and eval datasets of plain `text` rows (SFTTrainer cuts them into blocks), and the read counts."""
    train, evals, stats = common.load_records(cfg, "pt")
    return common.to_dataset(common.strip_locations(train)), common.to_dataset(common.strip_locations(evals)), stats


def perplexity(trainer) -> dict:
    """exp(eval loss), from the final evaluation (in the trainer's log history)."""
    losses = [row["eval_loss"] for row in trainer.state.log_history if "eval_loss" in row]
    return {"eval_perplexity": math.exp(min(losses[-1], 50.0))} if losses else {}


def build_trainer(cfg: Config):
    """The SFTTrainer on the text blocks, and the read counts."""
    from trl import SFTTrainer

    return common.build_trainer(cfg, SFTTrainer, text_datasets)


def run(cfg: Config) -> dict:
    trainer, stats = build_trainer(cfg)
    return common.train_and_save(trainer, cfg, stats, extra_metrics=perplexity)
