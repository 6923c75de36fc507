"""Prepared training data: records read once into memory-mapped Arrow, encoded by `datasets` `map` in parallel
processes, and kept in a cache named by everything that determines the result, so a second run, a `--resume` or
the next stage that trains on the same data loads it in seconds.

The fingerprint covers the data files' contents (a hub data set: its name, subset and split), the record kind,
the template, the tokenizer, max_length (and PPO's max_prompt_length), the overlong rule, the system prompt, the
reasoning switches, on_error, max_samples, the held-out split (and its seed) and the encoder's version. The
cache lives under datasets' own `HF_DATASETS_CACHE` (`medgpt-prepared/`) unless `data_cache_dir` names another
folder. A folder appears only when complete; under `torchrun`/`accelerate launch` the main process of each node
prepares and the other ranks wait, then memory-map the same files. Records are read, encoded and written a chunk
(`CHUNK_RECORDS`) at a time, so what is mapped into memory at once does not grow with the data.

The rows and counts are those of encoding the records one by one (`medgpt.data.encode.encode_conversations`):
the same ids and labels record for record, the same `path:line` errors and counted drops. The preference and RL
stages' rows (`conversation_encoder`) are TRL's conversational rows, which TRL then tokenizes itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medgpt.config import Config, DataArgs
from medgpt.data.encode import conversation_rows, count_encoded, encode_conversation_batch
from medgpt.data.readers import OVERLONG, iter_records
from medgpt.data.rows import check_choice, expand
from medgpt.data.stats import DataStats
from medgpt.errors import UserError
from medgpt.files import write_json
from medgpt.train.common import held_out

log = logging.getLogger(__name__)

ENCODER_VERSION = 2  # raised whenever encoding changes what it produces or how it is stored
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
    tokens: dict[str, dict] = field(default_factory=dict)  # token statistics by split (`token_summary`)


@dataclass
class Encoded:
    """What an encoder made of one chunk of records: the kept rows (memory-mapped from files in the preparation's
    folder), their token lengths and labelled tokens (None for conversational rows, which the trainer tokenizes)."""

    rows: Any
    lengths: Any = None
    labelled: int | None = None


CHUNK_RECORDS = 100_000  # records read, encoded and written at a time: what one step maps into memory


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
             "data": {key: getattr(cfg.data, key) for key in KEYS},
             "max_length": getattr(cfg.train, "max_length", None),
             "max_prompt_length": getattr(cfg.train, "max_prompt_length", None),
             "seed": cfg.train.seed if cfg.data.val_size else None, "template": repr(template),
             "chat_template": getattr(tokenizer, "chat_template", None) if template.name == "auto" else None,
             "tokenizer": _tokenizer_digest(tokenizer), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_records(records, path: Path) -> int:
    """Write canonical records (JSON text and location) to an Arrow file as they are read; their count."""
    return sum(count for _, count in _record_chunks(records, path.parent, path.stem, None))


def _record_chunks(records, folder: Path, name: str, size: int | None) -> Iterator[tuple[Path, int]]:
    """Write canonical records (JSON text and location) to Arrow files of `size` records each (one file: None) as
    they are read; each file with its count as it is complete."""
    from datasets.arrow_writer import ArrowWriter

    writer, path, count, index = None, None, 0, 0
    for record in records:
        if writer is None:
            path, count = folder / (f"{name}-{index:05d}.arrow" if size else f"{name}.arrow"), 0
            writer, index = ArrowWriter(path=str(path), writer_batch_size=10_000), index + 1
        loc = record.pop("_loc", "")
        writer.write({"record": json.dumps(record, ensure_ascii=False), "loc": loc})
        count += 1
        if size and count == size:
            writer.finalize()
            writer.close()
            writer = None
            yield path, count
    if writer is not None:
        writer.finalize()
        writer.close()
        yield path, count


def _ahead(items: Iterator, depth: int = 1) -> Iterator:
    """`items` taken in a thread of its own, up to `depth` ahead of the consumer: reading the next chunk of records
    overlaps encoding this one. An error of the reader is raised here; a consumer that stops stops the reader."""
    done, stop, ahead = object(), threading.Event(), queue.Queue(maxsize=depth)

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # the consumer raises it
            put(exc)

    thread = threading.Thread(target=run, name="medgpt-read-records", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _write_rows(dataset, path: Path):
    """The rows of `dataset` (through its selection) written to one Arrow file, read back memory-mapped."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(path=str(path), features=dataset.features, writer_batch_size=10_000) as writer:
        for batch in dataset.with_format("arrow").iter(batch_size=10_000):
            writer.write_table(batch)
        writer.finalize()
    return Dataset.from_file(str(path))


def _encode_batch(batch: dict, tokenizer, template, data, max_length) -> dict:
    encoded = encode_conversation_batch([json.loads(text) for text in batch["record"]], tokenizer, template, data,
                                        max_length)
    return {**{key: [e[key] for e in encoded] for key in ("input_ids", "labels", "length", "drop")},
            "labelled": [sum(label != -100 for label in e["labels"]) for e in encoded]}


def encode_chunk(dataset, cfg: Config, stats: DataStats, scratch: Path, out: Path, batch_fn: Callable,
                 columns: dict, limit: int | None, fn_kwargs: dict) -> Encoded:
    """`batch_fn` mapped over `dataset`'s records (a `record` column of JSON text and their `loc`) in parallel
    processes into `columns` and each record's `length`, `drop` reason (and `labelled` tokens, where it counts
    them); the kept rows written to `out`, the rest counted in `stats` (`count_encoded`)."""
    import numpy as np
    from datasets import Features, Value

    counts = {"length": Value("int32"), "drop": Value("string"),
              **({"labelled": Value("int32")} if "input_ids" in columns else {})}
    processes = min(num_proc(cfg), max(1, len(dataset) // 1000))
    encoded = dataset.map(batch_fn, batched=True, batch_size=256, num_proc=processes if processes > 1 else None,
                          remove_columns=["record"], features=Features({"loc": Value("string"), **columns, **counts}),
                          desc=f"encoding {out.stem}", cache_file_name=str(scratch / f"{out.stem}-encoded.arrow"),
                          new_fingerprint=f"{scratch.parent.name}-{out.stem}", fn_kwargs=fn_kwargs)
    counted = encoded.select_columns(list(counts)).with_format("numpy")[:]
    keep = []
    for index, (length, drop) in enumerate(zip(counted["length"].tolist(), counted["drop"].tolist())):
        if count_encoded(stats, {"length": length, "drop": drop}, encoded[index]["loc"] if drop else "", limit):
            keep.append(index)
    rows = _write_rows(encoded.select(keep).select_columns(list(columns)), out)
    if "labelled" not in counts:
        return Encoded(rows)
    lengths = np.minimum(counted["length"][keep], limit or np.iinfo(np.int32).max)
    return Encoded(rows, lengths, int(counted["labelled"][keep].sum()))


def encode_conversation_records(dataset, tokenizer, template, cfg: Config, stats: DataStats, scratch: Path,
                                out: Path) -> Encoded:
    """An encoder of `prepare` (SFT): conversation records into input_ids/labels (`encode_conversation_batch`)."""
    from datasets import Sequence, Value

    columns = {"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))}
    return encode_chunk(dataset, cfg, stats, scratch, out, _encode_batch, columns, cfg.train.max_length,
                        {"tokenizer": tokenizer, "template": template, "data": cfg.data,
                         "max_length": cfg.train.max_length})


ROW_JSON = ("prompt", "chosen", "rejected", "completion", "tools", "chat_template_kwargs")  # stored as JSON text,
JSON = "_json"  # in the column named with this suffix
CARRIED = {"label": "bool", "answer": "string", "options": "string", "reference": "string", "rubrics": "string"}


def _rows_batch(batch: dict, tokenizer, template, data, max_length, responses, carry, prompt_ids) -> dict:
    encoded = conversation_rows([json.loads(text) for text in batch["record"]], tokenizer, template, data, responses,
                                carry, max_length, prompt_ids)
    columns = {key + JSON if key in ROW_JSON else key:
               [json.dumps(e["row"][key], ensure_ascii=False) if key in ROW_JSON else e["row"][key] for e in encoded]
               for key in encoded[0]["row"] if key != "ids"} if encoded else {}
    if prompt_ids:
        columns["ids"] = [e["row"]["ids"] for e in encoded]
    return {**columns, "length": [e["length"] or 0 for e in encoded], "drop": [e["drop"] for e in encoded]}


def decode_rows(batch: dict) -> dict:
    """The transform that gives prepared conversational rows back as TRL reads them: each `<field>_json` column as
    `<field>`, the value it holds (message lists with only their own keys, as written). Where a trainer's `map`
    has written `<field>` itself (TRL's rendered or unpaired rows), that column is the one read."""
    out = {key: values for key, values in batch.items() if not key.endswith(JSON)}
    for key, values in batch.items():
        if key.endswith(JSON) and key.removesuffix(JSON) not in out:
            out[key.removesuffix(JSON)] = [json.loads(v) for v in values]
    return out


def conversation_encoder(responses: tuple[str, ...] = ("chosen", "rejected"), carry: tuple[str, ...] = (),
                         prompt_ids: bool = False) -> Callable:
    """An encoder of `prepare` for the preference and RL stages: records into TRL conversational rows
    (`conversation_rows`; messages, tools and chat_template_kwargs as JSON text, read back through `decode_rows`;
    the carried columns as they are), with `responses` rows longer than max_length, or prompts longer than PPO's
    max_prompt_length (`prompt_ids`), dropped or kept for truncation as `overlong` says."""
    from datasets import Sequence, Value

    def encode(dataset, tokenizer, template, cfg: Config, stats: DataStats, scratch: Path, out: Path) -> Encoded:
        think = cfg.data.enable_thinking is not None and responses
        names = ["prompt", *responses, *(["tools"] if responses else []), *carry,
                 *(["chat_template_kwargs"] if think else [])]
        columns = {key + JSON if key in ROW_JSON else key: Value(CARRIED.get(key, "string")) for key in names}
        if prompt_ids:
            columns["ids"] = Sequence(Value("int32"))
        limit = cfg.train.max_prompt_length if prompt_ids else getattr(cfg.train, "max_length", None)
        return encode_chunk(dataset, cfg, stats, scratch, out, _rows_batch, columns, limit,
                            {"tokenizer": tokenizer, "template": template, "data": cfg.data, "max_length": limit,
                             "responses": responses, "carry": carry, "prompt_ids": prompt_ids})

    encode.settings = {"responses": responses, "carry": carry, "prompt_ids": prompt_ids}
    encode.__qualname__ = "conversation_encoder"
    return encode


def _length_batch(batch: dict, kind: str, tokenizer, template) -> dict:
    records = [json.loads(text) for text in batch["record"]]
    if kind == "pt":
        return {"length": [len(ids) for ids in tokenizer([r["text"] for r in records])["input_ids"]]}
    if kind == "sft":
        encoded = encode_conversation_batch(records, tokenizer, template, DataArgs(), None)
    else:
        encoded = conversation_rows(records, tokenizer, template, DataArgs(), ("chosen", "rejected"), max_length=10**9)
    return {"length": [e["length"] for e in encoded]}


def record_lengths(records: Iterable[dict], kind: str, tokenizer, template, folder: Path, processes: int = 1):
    """`loc` and token `length` of each of `kind`'s records as training measures them (sft: the conversation
    as SFT encodes it; pref: the longer of prompt+chosen and prompt+rejected as TRL renders them; pt: the plain
    tokenized text), before any length rule: a dataset memory-mapped from files in `folder`, measured in
    `processes` processes as the records stream in. What `medgpt data check` reports."""
    from datasets import Dataset

    tmp = Path(folder)
    tmp.mkdir(parents=True, exist_ok=True)
    count = _write_records(({**record} for record in records), tmp / "records.arrow")
    dataset = Dataset.from_file(str(tmp / "records.arrow"))
    processes = min(processes, max(1, count // 1000))
    return dataset.map(_length_batch, batched=True, batch_size=256, remove_columns=["record"],
                       num_proc=processes if processes > 1 else None, desc="tokenizing",
                       cache_file_name=str(tmp / "lengths.arrow"), new_fingerprint="lengths",
                       fn_kwargs={"kind": kind, "tokenizer": tokenizer, "template": template})


def _build(cfg: Config, tokenizer, template, kind: str, folder: Path, encode: Callable,
           normalize: Callable | None) -> None:
    """Prepare into a private folder, renamed to `folder` when complete (removed when anything fails)."""
    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "scratch").mkdir(parents=True)
    try:
        _build_in(cfg, tokenizer, template, kind, work, encode, normalize)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        work.rename(folder)
    except OSError:  # another process finished the same preparation first
        shutil.rmtree(work, ignore_errors=True)


def _build_in(cfg: Config, tokenizer, template, kind: str, work: Path, encode: Callable,
              normalize: Callable | None) -> None:
    """Read the records into chunk files, then encode chunk by chunk (each split's rows in files of their own, in
    record order), so that what is mapped into memory at a time does not grow with the data."""
    import numpy as np
    from datasets import Dataset

    data, scratch = cfg.data, work / "scratch"
    read, encoded = DataStats(), DataStats()  # the reader's counts and the encoder's, merged at the end
    chunks = _record_chunks(iter_records(data.data, kind, read, on_error=data.on_error, subset=data.data_subset,
                                         split=data.data_split, max_samples=data.max_samples, normalize=normalize),
                            scratch, "records", CHUNK_RECORDS)
    held = None
    if data.val_size and not data.eval_data:  # the held-out draw needs the count: every chunk is read first
        chunks = list(chunks)
        total = sum(count for _, count in chunks)
        held = np.zeros(total, bool)
        if total:
            held[held_out(total, data.val_size, cfg.train.seed)[1]] = True
    parts: dict[str, list[Encoded]] = {"train": [], "eval": []}
    offset = 0
    for path, count in chunks if held is not None else _ahead(chunks):
        records = Dataset.from_file(str(path))
        mask, offset = np.zeros(count, bool) if held is None else held[offset:offset + count], offset + count
        for split, rows in (("train", np.flatnonzero(~mask)), ("eval", np.flatnonzero(mask))):
            if len(rows):
                part = records if len(rows) == count else records.select(rows)
                parts[split].append(encode(part, tokenizer, template, cfg, encoded, scratch,
                                           work / f"{split}-{len(parts[split]):05d}.arrow"))
        del records
    if not offset:
        raise UserError(f"{data.data}: no usable {kind} records")
    stats = {"train": read.merge(encoded)}
    if data.eval_data:
        stats["eval"] = DataStats()
        for path, _ in _record_chunks(iter_records(data.eval_data, kind, stats["eval"], on_error=data.on_error,
                                                   normalize=normalize), scratch, "eval-records", CHUNK_RECORDS):
            parts["eval"].append(encode(Dataset.from_file(str(path)), tokenizer, template, cfg, stats["eval"],
                                        scratch, work / f"eval-{len(parts['eval']):05d}.arrow"))
    if stats["train"].dropped or stats["train"].truncated:
        log.info("max_length %s: %s", getattr(cfg.train, "max_length", None), stats["train"].summary())
    shutil.rmtree(scratch)
    if not sum(len(part.rows) for part in parts["train"]):
        raise UserError(f"{data.data}: no record is left to train on ({stats['train'].summary()})")
    write_json(work / "parts.json", {split: [Path(f["filename"]).name for part in done for f in part.rows.cache_files]
                                     for split, done in parts.items() if done})
    write_json(work / "tokens.json", {split: token_summary(done) for split, done in parts.items() if done})
    write_json(work / "stats.json", {split: s.to_dict() for split, s in stats.items()})


def token_summary(parts: list[Encoded]) -> dict[str, Any]:
    """Rows, tokens and labelled tokens of a split's encoded chunks and the percentiles of their lengths; rows
    only for conversational rows."""
    import numpy as np

    rows = sum(len(part.rows) for part in parts)
    if any(part.lengths is None for part in parts):
        return {"rows": rows}
    lengths = np.concatenate([part.lengths for part in parts])
    if not len(lengths):
        return {"rows": 0, "tokens": 0, "labelled_tokens": 0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    return {"rows": rows, "tokens": int(lengths.sum()), "labelled_tokens": sum(part.labelled for part in parts),
            **{f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)}, "max": int(lengths.max())}


def main_process_first():
    """Ranks of a distributed launch wait for their node's main process; one process: no wait."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return nullcontext()
    from accelerate import PartialState

    return PartialState().local_main_process_first()


def prepare(cfg: Config, tokenizer, template, kind: str = "sft", encode: Callable = encode_conversation_records,
            settings: dict[str, Any] | None = None, normalize: Callable | None = None) -> Prepared:
    """The encoded train (and eval) rows of `cfg`'s `kind` records, from the cache or prepared into it.

    `encode(dataset, tokenizer, template, cfg, stats, scratch, out) -> Encoded` turns a chunk of a split's records
    into the rows a trainer takes, written to `out` (`encode_conversation_records`: SFT's ids and labels;
    `conversation_encoder(...)`: TRL's conversational rows; `pt.encode_documents`); `settings` are what else
    determines its rows (a stage's own keys), part of the fingerprint with the encoder's name and its own
    `settings`. `normalize` reads a kind the readers do not define (`iter_records`' argument:
    `medgpt.data.records.to_unpaired`, `to_prompt`)."""
    from datasets import Dataset, concatenate_datasets

    if not cfg.data.data:
        raise UserError("no training data: set `data:` in the config or pass --data PATH")
    check_choice("overlong", cfg.data.overlong, OVERLONG)
    own = {"encoder": f"{encode.__module__}.{encode.__qualname__}", **getattr(encode, "settings", {}),
           "normalize": normalize and f"{normalize.__module__}.{normalize.__qualname__}", **(settings or {})}
    folder = cache_root(cfg) / f"{kind}-{fingerprint(cfg, tokenizer, template, kind, own)}"
    cached = (folder / "stats.json").exists()
    with main_process_first():
        if not (folder / "stats.json").exists():
            log.info("preparing %s data into %s (%d processes)", kind, folder, num_proc(cfg))
            _build(cfg, tokenizer, template, kind, folder, encode, normalize)
    stats = {split: DataStats.from_dict(s) for split, s in json.loads((folder / "stats.json").read_text()).items()}
    files = json.loads((folder / "parts.json").read_text())
    split = {name: concatenate_datasets([Dataset.from_file(str(folder / f)) for f in files[name]])
             for name in ("train", "eval") if files.get(name)}
    evals = split.get("eval")
    log.info("prepared %s data: %s (%s)", kind, folder, "cached" if cached else "new")
    return Prepared(split["train"], evals if evals is not None and len(evals) else None, stats, folder, cached,
                    json.loads((folder / "tokens.json").read_text()))


def row_lengths(dataset) -> list[int]:
    """The token count of each row of a prepared dataset (through its selection), read from the Arrow offsets of
    its input_ids: no row is decoded."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_numpy().tolist() if len(dataset) \
        else []


def describe(prepared: Prepared) -> dict[str, Any]:
    """What `medgpt data prepare` prints and writes: counts by split, token statistics, the cache folder."""
    out: dict[str, Any] = {"cache": str(prepared.folder), "cached": prepared.cached,
                           "counts": {split: s.to_dict() for split, s in prepared.stats.items()},
                           **prepared.tokens}
    return out

