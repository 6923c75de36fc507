"""Prepared training data: records read once into memory-mapped Arrow, encoded by `datasets` `map` in parallel
processes, and kept in a cache named by everything that determines the result, so a second run, a `--resume` or
the next stage that trains on the same data loads it in seconds.

The fingerprint covers the data files' contents (a hub data set: its name, subset and split), the record kind,
the template, the tokenizer, max_length, the overlong rule, the system prompt, the reasoning switches, on_error,
max_samples, the held-out split (and its seed) and the encoder's version. The cache lives under datasets' own
`HF_DATASETS_CACHE` (`medgpt-prepared/`) unless `data_cache_dir` names another folder. A folder appears only
when complete; under `torchrun`/`accelerate launch` the main process of each node prepares and the other ranks
wait, then memory-map the same files.

The rows and counts are those of the in-memory path (`medgpt.data.encode.encode_conversations`): the same ids
and labels record for record, the same `path:line` errors and counted drops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgpt.config import Config, DataArgs
from medgpt.data.encode import count_encoded, encode_conversation_batch
from medgpt.data.readers import OVERLONG, iter_records
from medgpt.data.rows import check_choice, expand
from medgpt.data.stats import DataStats
from medgpt.errors import UserError
from medgpt.files import write_json
from medgpt.train.common import held_out

log = logging.getLogger(__name__)

ENCODER_VERSION = 1  # raised whenever encoding changes what it produces
KEYS = ("data", "data_subset", "data_split", "eval_data", "val_size", "max_samples", "on_error", "overlong",
        "system", "train_on_all", "enable_thinking", "train_on_reasoning")


@dataclass
class Prepared:
    """Train and eval datasets (memory-mapped; eval None without held-out data), the read counts by split, the
    cache folder, and whether it was found there."""

    train: Any
    eval: Any
    stats: dict[str, DataStats]
    folder: Path
    cached: bool


def num_proc(cfg: Config) -> int:
    """Processes that encode: `dataset_num_proc` where set, else the CPUs this process may use."""
    return getattr(cfg.train, "dataset_num_proc", None) or len(os.sched_getaffinity(0))


def cache_root(cfg: Config) -> Path:
    if cfg.data.data_cache_dir:
        return Path(cfg.data.data_cache_dir)
    from datasets import config

    return Path(config.HF_DATASETS_CACHE) / "medgpt-prepared"


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, str(tokenizer.special_tokens_map), getattr(tokenizer, "add_bos_token", None)]
    return hashlib.sha256((text + json.dumps(extra, default=str)).encode()).hexdigest()


def fingerprint(cfg: Config, tokenizer, template, kind: str, settings: dict[str, Any] | None = None) -> str:
    """A digest of everything that determines the prepared rows of `kind` (see the module docstring), and the
    `settings` an encoder adds."""
    sources = {}
    for key in ("data", "eval_data"):
        value = getattr(cfg.data, key)
        if value:
            sources[key] = [[str(item), _file_digest(item) if isinstance(item, Path) else "hub"]
                            for item in expand(value, kind, DataStats())]
    parts = {"encoder": ENCODER_VERSION, "kind": kind, "sources": sources,
             "data": {key: getattr(cfg.data, key) for key in KEYS}, "max_length": cfg.train.max_length,
             "seed": cfg.train.seed if cfg.data.val_size else None, "template": repr(template),
             "chat_template": getattr(tokenizer, "chat_template", None) if template.name == "auto" else None,
             "tokenizer": _tokenizer_digest(tokenizer), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_records(records, path: Path) -> int:
    """Write canonical records (JSON text and location) to an Arrow file as they are read; their count."""
    from datasets.arrow_writer import ArrowWriter

    count = 0
    with ArrowWriter(path=str(path), writer_batch_size=10_000) as writer:
        for record in records:
            loc = record.pop("_loc", "")
            writer.write({"record": json.dumps(record, ensure_ascii=False), "loc": loc})
            count += 1
        writer.finalize()
    return count


def _encode_batch(batch: dict, tokenizer, template, data, max_length) -> dict:
    encoded = encode_conversation_batch([json.loads(text) for text in batch["record"]], tokenizer, template, data,
                                        max_length)
    return {key: [e[key] for e in encoded] for key in ("input_ids", "labels", "length", "drop")}


def encode_conversation_records(dataset, tokenizer, template, cfg: Config, stats: DataStats, folder: Path,
                                name: str) -> int:
    """An encoder of `prepare`: `dataset`'s conversation records (a `record` column of JSON text and their `loc`)
    encoded in parallel processes into input_ids/labels, the kept rows saved to `folder/name` (their count
    returned), the rest counted in `stats`."""
    from datasets import Features, Sequence, Value

    features = Features({"loc": Value("string"), "input_ids": Sequence(Value("int32")),
                         "labels": Sequence(Value("int32")), "length": Value("int32"), "drop": Value("string")})
    processes = min(num_proc(cfg), max(1, len(dataset) // 1000))
    encoded = dataset.map(_encode_batch, batched=True, batch_size=256, num_proc=processes if processes > 1 else None,
                          remove_columns=["record"], features=features, desc=f"encoding {name}",
                          cache_file_name=str(folder / f"{name}-encoded.arrow"), new_fingerprint=f"{folder.name}-{name}",
                          fn_kwargs={"tokenizer": tokenizer, "template": template, "data": cfg.data,
                                     "max_length": cfg.train.max_length})
    keep = []
    columns = encoded.select_columns(["length", "drop"]).to_dict()
    for index, (length, drop) in enumerate(zip(columns["length"], columns["drop"])):
        result = {"length": length, "drop": drop}
        if drop is None:
            count_encoded(stats, result, "", cfg.train.max_length)
            keep.append(index)
        else:
            count_encoded(stats, result, encoded[index]["loc"], cfg.train.max_length)
    if stats.dropped or stats.truncated:
        log.info("max_length %s: %s", cfg.train.max_length, stats.summary())
    rows = encoded.select(keep).select_columns(["input_ids", "labels"])
    rows.save_to_disk(str(folder / name))
    return len(keep)


def _length_batch(batch: dict, tokenizer, template) -> dict:
    records = [json.loads(text) for text in batch["record"]]
    return {"length": [e["length"] for e in encode_conversation_batch(records, tokenizer, template, DataArgs(), None)]}


def conversation_lengths(records: Iterable[dict], tokenizer, template, processes: int = 1) -> list[int]:
    """Token lengths of conversation records as SFT encodes them (before any length rule), measured in
    `processes` processes: what `medgpt data check` reports."""
    from datasets import Dataset

    with tempfile.TemporaryDirectory(prefix="medgpt-lengths-") as tmp:
        count = _write_records(({**record} for record in records), Path(tmp) / "records.arrow")
        dataset = Dataset.from_file(str(Path(tmp) / "records.arrow"))
        processes = min(processes, max(1, count // 1000))
        lengths = dataset.map(_length_batch, batched=True, batch_size=256, remove_columns=dataset.column_names,
                              num_proc=processes if processes > 1 else None, desc="tokenizing",
                              cache_file_name=str(Path(tmp) / "lengths.arrow"), new_fingerprint="lengths",
                              fn_kwargs={"tokenizer": tokenizer, "template": template})
        return lengths["length"]


def _split(dataset, cfg: Config):
    """(train, eval) of a read without eval_data: the records `common.held_out` holds out."""
    if not cfg.data.val_size:
        return dataset, None
    train, evals = held_out(len(dataset), cfg.data.val_size, cfg.train.seed)
    return dataset.select(train), dataset.select(evals)


def _build(cfg: Config, tokenizer, template, kind: str, folder: Path, encode: Callable) -> None:
    """Prepare into a private folder, renamed to `folder` when complete (removed when anything fails)."""
    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _build_in(cfg, tokenizer, template, kind, work, encode)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        work.rename(folder)
    except OSError:  # another process finished the same preparation first
        shutil.rmtree(work, ignore_errors=True)


def _build_in(cfg: Config, tokenizer, template, kind: str, work: Path, encode: Callable) -> None:
    from datasets import Dataset

    data = cfg.data
    stats = {"train": DataStats()}
    read = iter_records(data.data, kind, stats["train"], on_error=data.on_error, subset=data.data_subset,
                        split=data.data_split, max_samples=data.max_samples)
    if not _write_records(read, work / "records.arrow"):
        raise UserError(f"{data.data}: no usable {kind} records")
    train, evals = _split(Dataset.from_file(str(work / "records.arrow")), cfg)
    if data.eval_data:
        stats["eval"] = DataStats()
        if _write_records(iter_records(data.eval_data, kind, stats["eval"], on_error=data.on_error),
                          work / "eval-records.arrow"):
            evals = Dataset.from_file(str(work / "eval-records.arrow"))
    kept = encode(train, tokenizer, template, cfg, stats["train"], work, "train")
    if evals is not None:
        encode(evals, tokenizer, template, cfg, stats.get("eval", stats["train"]), work, "eval")
    write_json(work / "stats.json", {split: s.to_dict() for split, s in stats.items()})
    for scratch in work.glob("*.arrow"):
        scratch.unlink()
    if not kept:
        raise UserError(f"{data.data}: every record is longer than max_length {cfg.train.max_length}")


def main_process_first():
    """Ranks of a distributed launch wait for their node's main process; one process: no wait."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return nullcontext()
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def prepare(cfg: Config, tokenizer, template, kind: str = "sft", encode: Callable = encode_conversation_records,
            settings: dict[str, Any] | None = None) -> Prepared:
    """The encoded train (and eval) rows of `cfg`'s `kind` records, from the cache or prepared into it.

    `encode(dataset, tokenizer, template, cfg, stats, folder, name) -> kept` turns a split's records into the rows
    a trainer takes (`encode_conversation_records`: SFT's ids and labels); `settings` are what else determines
    its rows (a stage's own keys), part of the fingerprint with the encoder's name."""
    from datasets import load_from_disk

    if not cfg.data.data:
        raise UserError("no training data: set `data:` in the config or pass --data PATH")
    check_choice("overlong", cfg.data.overlong, OVERLONG)
    own = {"encoder": f"{encode.__module__}.{encode.__qualname__}", **(settings or {})}
    folder = cache_root(cfg) / f"{kind}-{fingerprint(cfg, tokenizer, template, kind, own)}"
    cached = (folder / "stats.json").exists()
    with main_process_first():
        if not (folder / "stats.json").exists():
            log.info("preparing %s data into %s (%d processes)", kind, folder, num_proc(cfg))
            _build(cfg, tokenizer, template, kind, folder, encode)
    stats = {split: DataStats.from_dict(s) for split, s in json.loads((folder / "stats.json").read_text()).items()}
    evals = load_from_disk(str(folder / "eval")) if (folder / "eval").exists() else None
    log.info("prepared %s data: %s (%s)", kind, folder, "cached" if cached else "new")
    return Prepared(load_from_disk(str(folder / "train")), evals if evals is not None and len(evals) else None,
                    stats, folder, cached)


def token_statistics(dataset) -> dict[str, Any]:
    """Rows, tokens and labelled tokens of a prepared dataset, and its length percentiles (read from the Arrow
    columns, a chunk at a time)."""
    import numpy as np
    import pyarrow.compute as pc

    table = dataset.with_format("arrow")[:] if len(dataset) else None
    if table is None:
        return {"rows": 0, "tokens": 0, "labelled_tokens": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
    labelled = sum(pc.sum(pc.not_equal(pc.list_flatten(chunk), -100)).as_py() or 0
                   for chunk in table.column("labels").chunks)
    return {"rows": len(dataset), "tokens": int(lengths.sum()), "labelled_tokens": int(labelled),
            **{f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}, "max": int(lengths.max())}


def describe(prepared: Prepared) -> dict[str, Any]:
    """What `medgpt data prepare` prints and writes: counts by split, token statistics, the cache folder."""
    out: dict[str, Any] = {"cache": str(prepared.folder), "cached": prepared.cached,
                           "counts": {split: s.to_dict() for split, s in prepared.stats.items()},
                           "train": token_statistics(prepared.train)}
    if prepared.eval is not None:
        out["eval"] = token_statistics(prepared.eval)
    return out

