"""Continued pretraining on plain text, with TRL's SFTTrainer in language-modelling mode.

Each document (a line of a .txt file, or a `text` field) is tokenized with an EOS appended, and the token
stream is cut into `block_size` blocks ("wrapped" packing): a block may hold the end of one document and the
start of the next, which attend to each other across the EOS. With `isolate_documents: true` documents are
packed whole into blocks (best fit decreasing; a document longer than a block is split), trained
padding-free with position ids that restart at every document, so transformers' packed-sequence masks
(SDPA/eager) or the varlen flash-attention kernels keep the documents in a block from seeing one another.
Evaluation reports perplexity.

The documents are tokenized once, in parallel processes, into the prepared-data cache (`medgpt.train.prepare`):
each document's text with the EOS token appended (unless it ends with it), tokenized in batches, as TRL's
SFTTrainer tokenizes a `text` row; the trainer then packs these rows into blocks, so the blocks are those of
the plain-text path. `streaming: true` reads a corpus larger than memory as a stream instead: documents are
read and tokenized as training consumes them and packed on the fly (`max_steps` sets the length of the run);
under a distributed launch every process reads the stream and trains on its own share of each global batch
(accelerate's IterableDatasetShard).

On a model whose vocabulary `medgpt tokenizer extend` grew, LoRA also trains the input embeddings and the LM head
in full (`modules_to_save: embed_tokens,lm_head`, set unless the config sets it), so the new tokens' rows learn.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from trl import SFTConfig

from medgpt.config import Config
from medgpt.data.stats import DataStats
from medgpt.errors import UserError
from medgpt.train import common
from medgpt.train.prepare import Encoded, num_proc, prepare, row_lengths
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
    if cfg.data.streaming:
        if cfg.train.max_steps <= 0:
            raise UserError("streaming: true needs max_steps (a stream has no length to count epochs by)")
        if cfg.data.val_size:
            raise UserError("streaming: true cannot hold out val_size from a stream; set eval_data instead")
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


@dataclass(frozen=True)
class PlainText:
    """What stands for a chat template in PT's prepared-data fingerprint: documents as they are, EOS after each."""

    name: str = "plain text, eos appended"


ENCODER_SETTINGS = {"pt_encoder": 1}  # raised whenever encode_documents changes what it produces
TOKENS = {"input_ids": "int32", "labels": "int32"}


def tokenize_documents(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each document with EOS appended as TRL's SFTTrainer appends it (unless the text ends with
    it), in one batched tokenizer call."""
    eos = tokenizer.eos_token
    return tokenizer([t if t.endswith(eos) else t + eos for t in texts])["input_ids"]


def _tokenize_batch(batch: dict, tokenizer) -> dict:
    ids = tokenize_documents([json.loads(record)["text"] for record in batch["record"]], tokenizer)
    return {"input_ids": ids, "labels": ids}


def _token_features():
    from datasets import Features, Sequence, Value

    return Features({name: Sequence(Value(dtype)) for name, dtype in TOKENS.items()})


def encode_documents(dataset, tokenizer, template, cfg: Config, stats: DataStats, scratch: Path,
                     out: Path) -> Encoded:
    """An encoder of `medgpt.train.prepare`: the pt records' token ids (labels: the same ids), tokenized in
    parallel processes into `out`'s folder, with their lengths."""
    import numpy as np

    processes = min(num_proc(cfg), max(1, len(dataset) // 1000))
    rows = dataset.map(_tokenize_batch, batched=True, batch_size=1000, num_proc=processes if processes > 1 else None,
                       remove_columns=dataset.column_names, features=_token_features(), desc=f"tokenizing {out.stem}",
                       cache_file_name=str(out), new_fingerprint=f"{out.parent.name}-{out.stem}",
                       fn_kwargs={"tokenizer": tokenizer})
    lengths = np.asarray(row_lengths(rows), dtype=np.int64)
    return Encoded(rows, lengths, int(lengths.sum()))


def _stream(data, tokenizer, stats: DataStats, batch_size: int = 256):
    """Token rows of `data`'s documents as they are read (`iter_records`: `path:line` errors, on_error skip);
    `stats` holds the counts of the pass over the stream that has read furthest."""
    from dataclasses import fields
    from itertools import islice

    from medgpt.data.readers import iter_records

    counted = DataStats()
    records = iter_records(data.data, "pt", counted, on_error=data.on_error, subset=data.data_subset,
                           split=data.data_split, max_samples=data.max_samples)
    while chunk := list(islice(records, batch_size)):
        if counted.read + counted.blank >= stats.read + stats.blank:
            for name in (f.name for f in fields(DataStats)):
                setattr(stats, name, getattr(counted, name))  # the same objects: later counts show through
        for ids in tokenize_documents([r["text"] for r in chunk], tokenizer):
            yield {"input_ids": ids, "labels": ids}


def streamed_datasets(cfg: Config, tokenizer):
    """The train documents as a datasets IterableDataset read and tokenized as training consumes it (the trainer
    packs it into blocks on the fly), the eval data prepared, and the read counts (train: the records read so
    far)."""
    from datasets import IterableDataset

    stats = DataStats()
    train = IterableDataset.from_generator(_stream, features=_token_features(),
                                           gen_kwargs={"data": cfg.data, "tokenizer": tokenizer, "stats": stats})
    evals, counts = None, {"train": stats}
    if cfg.data.eval_data:
        from dataclasses import replace

        eval_cfg = replace(cfg, data=replace(cfg.data, data=cfg.data.eval_data, eval_data=None, max_samples=None,
                                                 data_subset=None, data_split="train"))
        prepared = prepare_data(eval_cfg, tokenizer)
        evals, counts["eval"] = prepared.train, prepared.stats["train"]
    return train, evals, counts


def prepare_data(cfg: Config, tokenizer):
    """The prepared token rows of `cfg`'s documents (`medgpt.train.prepare.Prepared`), from the cache or made."""
    return prepare(cfg, tokenizer, PlainText(), "pt", encode=encode_documents, settings=ENCODER_SETTINGS)


def text_datasets(cfg: Config, tokenizer):
    """Train and eval rows of token ids (the trainer packs them into blocks) and the read counts: prepared
    (memory-mapped, from the cache), or streamed with `streaming: true`."""
    if cfg.data.streaming:
        return streamed_datasets(cfg, tokenizer)
    prepared = prepare_data(cfg, tokenizer)
    return prepared.train, prepared.eval, prepared.stats


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
