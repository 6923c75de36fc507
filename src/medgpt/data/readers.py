"""Read every supported input format into one canonical record per kind, validated and counted.

Canonical records are TRL's conversational forms, so nothing downstream knows the source format:

- `pt`:   `{"text": str}`
- `sft`:  `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- `pref`: `{"prompt": [... ending with a user turn], "chosen": [assistant turns], "rejected": [...]}`

Each record also carries `"_loc": "path:N"` so later steps (token-length filtering, error messages)
can point at the source; callers strip it. N is the physical line for .txt/.jsonl/.csv (blank lines
count), the element index for a JSON array, the row index for parquet and hub data sets.

Callers with record kinds of their own read through the same loop: `read_records(..., normalize=fn)`.
The public helpers (`as_object`, `message_list`, `turns`, `check_order`, `with_system`, `query_messages`,
`to_sft`, `to_pref`) are the validation rules a normalizer builds on, and `iter_rows` gives the raw rows.

A record that cannot be used either stops the read with `UserError("path:N: reason: detail")`
(`on_error="fail"`) or is dropped and counted under its reason (`on_error="skip"`); reasons are the
short stable strings in `REASONS`. A file that cannot be read at all is always an error. Files in a
folder with an extension this kind cannot read are not ignored silently: they are logged as a warning
and listed in `DataStats.skipped_files`.
"""

from __future__ import annotations

import codecs
import csv
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from medgpt.data.stats import DataStats, atomic_writer, preview, write_stats
from medgpt.errors import UserError

__all__ = [
    "DataStats", "RecordError", "as_object", "check_choice", "check_order", "convert", "detect_kind", "expand",
    "hub_rows", "item_rows", "iter_rows", "message_list", "query_messages", "read_log", "read_records", "text_message",
    "to_pref", "to_pt", "to_sft", "turns", "with_system", "write_jsonl", "write_stats",
]

logger = logging.getLogger(__name__)

KINDS = ("pt", "sft", "pref")
FORMATS = ("sharegpt", "openai", "alpaca", "pref")
ON_ERROR = ("fail", "skip")
OVERLONG = ("drop", "truncate")
REASONS = (
    "invalid JSON", "not an object", "missing field", "wrong type", "empty conversation", "empty message",
    "unknown role", "roles out of order", "identical chosen and rejected", "not UTF-8", "empty text",
    "invalid CSV", "longer than max_length",
)
EXTENSIONS = {"pt": (".txt", ".json", ".jsonl", ".parquet", ".csv"), "sft": (".json", ".jsonl", ".parquet", ".csv")}
EXTENSIONS["pref"] = EXTENSIONS["sft"]
ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
# CSV cells are strings; these columns may hold JSON (message lists, history pairs).
_STRUCTURED = {"conversations", "messages", "history", "prompt", "chosen", "rejected"}

Row = tuple[str, Any]  # (location, parsed object | RecordError | None for a blank line)


class RecordError(ValueError):
    """Why one record cannot be used: `reason` is the stable counter key, the rest is for humans."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_choice(name: str, value: str, allowed: Iterable[str]) -> str:
    """`value` when it is one of `allowed`; otherwise the user's error, naming the choices."""
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
    return value


def _type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- sources and files -> raw rows -------------------------------------------------------------


def _looks_like_path(item: str) -> bool:
    return item.startswith(("/", "./", "../", "~")) or Path(item).suffix.lower() in EXTENSIONS["pt"]


def expand(source: str | Path | list[str], kind: str, stats: DataStats) -> list[Path | str]:
    """Files to read in order (folders recursively, sorted) and hub names, recording skipped files.
    A kind other than pt, sft and pref (records a caller normalizes itself) takes the sft file types."""
    extensions = EXTENSIONS.get(kind, EXTENSIONS["sft"])
    if isinstance(source, (list, tuple)):
        items = list(source)
    else:
        source = str(source)
        items = [source] if Path(source).expanduser().exists() else source.split(",")
    found: list[Path | str] = []
    for item in (str(i).strip() for i in items if str(i).strip()):
        path = Path(item).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            readable = [p for p in files if p.suffix.lower() in extensions]
            stats.skipped_files += [str(p) for p in files if p not in readable]
            if not readable:
                raise UserError(f"{path}: no {kind} data files ({', '.join(extensions)}) in this folder")
            found += readable
        elif path.is_file():
            if path.suffix.lower() not in extensions:
                raise UserError(f"{path}: cannot read {path.suffix or 'extension-less'} files as {kind} data "
                                f"(expected {', '.join(extensions)})")
            found.append(path)
        elif _looks_like_path(item):
            raise UserError(f"{item}: no such file or folder")
        else:
            found.append(item)
    return found


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _lines(path: Path, data: bytes) -> Iterator[tuple[str, str | RecordError | None]]:
    """Physical lines, each decoded on its own so that a bad byte spoils only its line."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        loc = f"{path}:{number}"
        try:
            line = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            yield loc, RecordError("not UTF-8", f"byte {raw[exc.start]:#04x} at column {exc.start + 1}")
            continue
        yield loc, line if line.strip() else None


def _parse(line: str | RecordError | None) -> Any:
    if not isinstance(line, str):
        return line
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        return RecordError("invalid JSON", f"{exc.msg} at column {exc.colno}")


def _txt_rows(path: Path, data: bytes) -> Iterator[Row]:
    for loc, line in _lines(path, data):
        yield loc, {"text": line} if isinstance(line, str) else line


def _jsonl_rows(path: Path, data: bytes) -> Iterator[Row]:
    for loc, line in _lines(path, data):
        yield loc, _parse(line)


def _json_rows(path: Path, data: bytes) -> Iterator[Row]:
    """A .json file holds a JSON array of objects, one (possibly pretty-printed) object, or JSON lines."""
    start = len(data) - len(data.lstrip())
    head = data[start:start + 1]
    if head in (b"[", b"{"):
        try:
            whole = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            if head == b"[":
                line = _line_of(data, exc.start)
                raise UserError(f"{path}:{line}: not UTF-8: the JSON array cannot be read") from None
            whole = None
        except json.JSONDecodeError as exc:
            if head == b"[":
                raise UserError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}; "
                                "the JSON array cannot be read") from None
            whole = None
        if isinstance(whole, list):
            yield from ((f"{path}:{index}", item) for index, item in enumerate(whole))
            return
        if isinstance(whole, dict):
            yield f"{path}:{_line_of(data, start)}", whole
            return
    yield from _jsonl_rows(path, data)


def _csv_cell(key: str, value: str) -> Any:
    """Decode JSON held in structured columns; an empty cell there means the field is absent."""
    if key not in _STRUCTURED:
        return value
    if not value.strip():
        return None
    if value.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            pass
    return value


def _csv_rows(path: Path, data: bytes) -> Iterator[Row]:
    """CSV with a header line; the location is the physical line a row starts on."""
    bad: set[int] = set()

    def decoded() -> Iterator[str]:
        for number, raw in enumerate(data.splitlines(keepends=True), 1):
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError:
                bad.add(number)
                yield raw.decode("utf-8", errors="replace")

    reader = csv.reader(decoded())
    try:
        header = next(reader, None)
        if header is None:
            return
        if bad:
            raise UserError(f"{path}:1: not UTF-8: the CSV header cannot be read")
        previous = reader.line_num
        for cells in reader:
            first, previous = previous + 1, reader.line_num
            loc = f"{path}:{first}"
            if spoiled := sorted(bad.intersection(range(first, previous + 1))):
                yield loc, RecordError("not UTF-8", f"line {spoiled[0]}")
            elif not any(cell.strip() for cell in cells):
                yield loc, None
            elif len(cells) > len(header):
                yield loc, RecordError("invalid CSV", f"{len(cells)} cells, the header has {len(header)}")
            else:
                yield loc, {key: _csv_cell(key, value) for key, value in zip(header, cells)}
    except csv.Error as exc:
        raise UserError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from None


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches()
    except Exception as exc:  # pyarrow raises several types for files that are not parquet
        raise UserError(f"{path}: cannot read parquet: {exc}") from None
    index = 0
    for batch in batches:
        for row in batch.to_pylist():
            yield f"{path}:{index}", row
            index += 1


def hub_rows(name: str, subset: str | None, split: str) -> Iterator[Row]:
    """The rows of a hub data set; one that cannot be loaded (offline, unknown name) is the user's error."""
    try:
        import datasets

        dataset = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown name, bad subset/split: all the user's to fix
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = ", ".join(part for part in (subset, split) if part)
        raise UserError(f"{name} ({where}): not a local path, and the hub data set cannot be loaded: "
                        f"{reason}") from None
    for index, row in enumerate(dataset):
        yield f"{name}:{index}", row


def item_rows(item: Path | str, subset: str | None = None, split: str = "train") -> Iterator[Row]:
    """The raw rows of one file (by its extension) or, for a name, of a hub data set."""
    if isinstance(item, str):
        return hub_rows(item, subset, split)
    suffix = item.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(item)
    try:
        data = item.read_bytes().removeprefix(codecs.BOM_UTF8)
    except OSError as exc:
        raise UserError(f"{item}: cannot read: {exc.strerror}") from None
    return {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}[suffix](item, data)


def iter_rows(source: str | Path | list[str], kind: str, stats: DataStats, subset: str | None = None,
              split: str = "train") -> Iterator[Row]:
    """The raw rows of every file and hub data set of `source` in order. The source is checked now, the
    rows are read as they are taken; `stats` records the skipped files and each file as its reading starts."""
    items = expand(source, kind, stats)
    if stats.skipped_files:
        logger.warning("skipping %d file(s) that are not %s data: %s", len(stats.skipped_files), kind,
                       preview(stats.skipped_files))

    def rows() -> Iterator[Row]:
        for item in items:
            stats.files.append(str(item))
            yield from item_rows(item, subset, split)

    return rows()


def read_log(path: str | Path) -> list[dict]:
    """The object rows of a JSON-lines log another process may be writing: a missing file is no rows,
    and a line that is not an object (one cut off by an interrupted write) is skipped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    return [raw for _, raw in _jsonl_rows(path, data) if isinstance(raw, dict)]


# ---- raw objects -> canonical records ----------------------------------------------------------


def as_object(raw: Any) -> dict:
    """`raw` when it is a JSON object; every record format is one."""
    if not isinstance(raw, dict):
        raise RecordError("not an object", f"got {_type(raw)}")
    return raw


def _field(obj: dict, key: str, kind: type | tuple[type, ...] = str) -> Any:
    value = obj.get(key)
    if value is None:
        raise RecordError("missing field", f'"{key}"')
    if not isinstance(value, kind):
        raise RecordError("wrong type", f'"{key}" is {_type(value)}')
    return value


def text_message(obj: dict, key: str, role: str) -> dict:
    """A required non-empty string field as one message."""
    content = _field(obj, key)
    if not content.strip():
        raise RecordError("empty message", f'"{key}"')
    return {"role": role, "content": content}


def _system(obj: dict) -> list[dict]:
    """The optional `system` field; empty means none (the seed format writes `"system": ""`)."""
    system = obj.get("system") or ""
    if not isinstance(system, str):
        raise RecordError("wrong type", f'"system" is {_type(system)}')
    return [{"role": "system", "content": system}] if system.strip() else []


def _history(obj: dict) -> list[dict]:
    """Earlier turns as `[user, assistant]` pairs (Alpaca / MedicalGPT convention)."""
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("wrong type", f'"history" is {_type(history)}, expected a list of [user, assistant] pairs')
    messages: list[dict] = []
    for index, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError("wrong type", f'"history[{index}]" is not a [user, assistant] pair of strings')
        if not all(t.strip() for t in pair):
            raise RecordError("empty message", f'"history[{index}]"')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def with_system(obj: dict, messages: list[dict]) -> list[dict]:
    """Prepend the top-level `system` field unless the messages start with their own system turn."""
    return messages if messages and messages[0]["role"] == "system" else _system(obj) + messages


def _message(turn: Any, where: str) -> dict | None:
    """One ShareGPT (`from`/`value`) or OpenAI (`role`/`content`) turn; an empty system turn is no turn."""
    if not isinstance(turn, dict):
        raise RecordError("wrong type", f"{where} is {_type(turn)}, expected an object")
    role, content = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if role is None or content is None:
        raise RecordError("missing field", f'{where} needs "from" and "value" (or "role" and "content")')
    if not isinstance(role, str) or role.lower() not in ROLES:
        raise RecordError("unknown role", f"{where}: {role!r} (expected one of {', '.join(ROLES)})")
    if not isinstance(content, str):
        raise RecordError("wrong type", f"{where} content is {_type(content)}")
    role = ROLES[role.lower()]
    if not content.strip():
        if role == "system":
            return None
        raise RecordError("empty message", f"{where} ({role})")
    return {"role": role, "content": content}


def message_list(value: Any, key: str) -> list[dict]:
    """A list of messages (or one message object, as ShareGPT-style preference data writes `chosen`)."""
    if not isinstance(value, (list, dict)):
        raise RecordError("wrong type", f'"{key}" is {_type(value)}, expected a list of messages')
    items = [value] if isinstance(value, dict) else value
    return [m for index, turn in enumerate(items) if (m := _message(turn, f'"{key}[{index}]"')) is not None]


def turns(obj: dict, key: str, role: str) -> list[dict]:
    """A preference field: a string (one message with `role`) or messages."""
    value = _field(obj, key, (str, dict, list))
    return [text_message(obj, key, role)] if isinstance(value, str) else message_list(value, key)


def check_order(messages: list[dict], key: str, first: str = "user", last: str | None = None,
                system: bool = True) -> None:
    """After an optional leading system message, roles alternate starting with `first`."""
    body = messages[1:] if system and messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordError("empty conversation", f'"{key}" has no {first} message')
    expected = first
    for index, message in enumerate(body, len(messages) - len(body)):
        if message["role"] != expected:
            raise RecordError("roles out of order",
                              f'"{key}" message {index} is {message["role"]}, expected {expected}')
        expected = "assistant" if expected == "user" else "user"
    if last and body[-1]["role"] != last:
        raise RecordError("roles out of order", f'"{key}" ends with a {body[-1]["role"]} message, expected {last}')


def query_messages(obj: dict, key: str = "instruction") -> list[dict]:
    """The prompt of a one-question row: the `system` field, the `history` pairs and the string field `key`
    as the user turn; an `instruction` is followed by the row's `input` (the Alpaca rule)."""
    question = _field(obj, key)
    extra = (obj.get("input") or "") if key == "instruction" else ""
    if not isinstance(extra, str):
        raise RecordError("wrong type", f'"input" is {_type(extra)}')
    query = "\n".join(part for part in (question, extra) if part.strip())
    if not query:
        raise RecordError("empty message", f'"{key}"')
    return _system(obj) + _history(obj) + [{"role": "user", "content": query}]


def to_pt(raw: Any) -> dict:
    """A `text` row as a pt record."""
    text = _field(as_object(raw), "text")
    if not text.strip():
        raise RecordError("empty text")
    return {"text": text}


def to_sft(raw: Any) -> dict:
    """A ShareGPT, OpenAI or Alpaca row as an sft record: a conversation ending with an assistant turn."""
    obj = as_object(raw)
    key = next((k for k in ("conversations", "messages") if obj.get(k) is not None), None)
    if key:
        messages = with_system(obj, message_list(obj[key], key))
    elif "instruction" in obj:
        key = "instruction"
        messages = query_messages(obj, key) + [text_message(obj, "output", "assistant")]
    else:
        raise RecordError("missing field", '"conversations" or "messages" or "instruction"')
    check_order(messages, key, last="assistant")
    return {"messages": messages}


def to_pref(raw: Any) -> dict:
    """A seed-format (`question`/`response_chosen`) or TRL-form (`prompt`/`chosen`) row as a pref record."""
    obj = as_object(raw)
    if "question" in obj or "response_chosen" in obj:
        prompt = _system(obj) + _history(obj) + [text_message(obj, "question", "user")]
        chosen, rejected = ([text_message(obj, f"response_{k}", "assistant")] for k in ("chosen", "rejected"))
    elif "chosen" in obj or "rejected" in obj:
        key = next((k for k in ("prompt", "conversations", "messages") if obj.get(k) is not None), None)
        if key is None:
            raise RecordError("missing field", '"prompt" or "conversations"')
        prompt = with_system(obj, turns(obj, key, "user"))
        chosen, rejected = (turns(obj, k, "assistant") for k in ("chosen", "rejected"))
    else:
        raise RecordError("missing field", '"question", "response_chosen", "response_rejected" '
                                           'or "prompt", "chosen", "rejected"')
    check_order(prompt, "prompt", last="user")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        check_order(messages, key, first="assistant", last="assistant", system=False)
    if [m["content"].strip() for m in chosen] == [m["content"].strip() for m in rejected]:
        raise RecordError("identical chosen and rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


NORMALIZERS: dict[str, Callable[[Any], dict]] = {"pt": to_pt, "sft": to_sft, "pref": to_pref}


# ---- public API --------------------------------------------------------------------------------


def read_records(source: str | list[str], kind: str, on_error: str = "fail", subset: str | None = None,
                 split: str = "train", max_samples: int | None = None,
                 normalize: Callable[[Any], dict | list[dict]] | None = None) -> tuple[list[dict], DataStats]:
    """Read `source` (file, folder, comma-separated list, or hub data set name) as canonical `kind`
    records with `_loc`. Reading stops once `max_samples` records are kept.

    `normalize(raw row)` replaces the kind's own normalizer for records a caller defines: it returns one
    record or several (a preference pair as two unpaired rows) or raises `RecordError`. `kind` then only
    names the records in logs and errors, and any kind but pt, sft and pref is read from the sft file types."""
    if normalize is None:
        normalize = NORMALIZERS[check_choice("kind", kind, KINDS)]
    check_choice("on_error", on_error, ON_ERROR)
    stats, records = DataStats(), []
    rows = iter_rows(source, kind, stats, subset, split)
    for loc, raw in rows if max_samples is None or max_samples > 0 else ():
        if raw is None:
            stats.blank += 1
            continue
        stats.read += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            out = normalize(raw)
        except RecordError as exc:
            if on_error == "fail":
                raise UserError(f"{loc}: {exc}") from None
            logger.debug("dropped %s: %s", loc, exc)
            stats.drop(exc.reason, loc)
            continue
        records += [{**record, "_loc": loc} for record in (out if isinstance(out, list) else [out])]
        if max_samples is not None and len(records) >= max_samples:
            break
    label = ",".join(map(str, source)) if isinstance(source, (list, tuple)) else str(source)
    logger.log(logging.WARNING if stats.dropped else logging.INFO, "%s (%s): %s", label, kind, stats.summary())
    return records, stats


def detect_kind(source: str | list[str], subset: str | None = None, split: str = "train") -> str:
    """Guess the kind from the fields of the first record, so `medgpt data check PATH` needs no --kind."""
    for item in expand(source, "pt", DataStats()):
        if isinstance(item, Path) and item.suffix.lower() == ".txt":
            return "pt"
        for loc, raw in item_rows(item, subset, split):
            if not isinstance(raw, dict):
                continue
            if raw.keys() & {"question", "response_chosen", "chosen", "rejected"}:
                return "pref"
            if raw.keys() & {"conversations", "messages", "instruction"}:
                return "sft"
            if "text" in raw:
                return "pt"
            raise UserError(f"{loc}: cannot tell the kind from the fields {sorted(raw)}; pass --kind")
    raise UserError(f"{source}: no record to guess the kind from; pass --kind")


def _kind_of(record: dict) -> str:
    return "sft" if "messages" in record else "pref" if "prompt" in record else "pt" if "text" in record else "?"


def _split_turns(messages: list[dict]) -> tuple[str, list[list[str]], list[dict]]:
    """Leading system text, the [user, assistant] pairs, and a trailing unpaired message if any."""
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    body = messages[1:] if system else messages
    pairs = [[body[i]["content"], body[i + 1]["content"]] for i in range(0, len(body) - 1, 2)]
    return system, pairs, body[2 * len(pairs):]


def _single(messages: list[dict], loc: str, key: str) -> str:
    if len(messages) != 1:
        raise UserError(f"{loc}: {key} has {len(messages)} messages; this format holds exactly one")
    return messages[0]["content"]


def _sharegpt(messages: list[dict]) -> list[dict]:
    return [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages]


def _sft_alpaca(record: dict, loc: str) -> dict:
    system, pairs, _ = _split_turns(record["messages"])
    return {"instruction": pairs[-1][0], "input": "", "output": pairs[-1][1], "system": system, "history": pairs[:-1]}


def _pref_seed(record: dict, loc: str) -> dict:
    system, history, (question, *_) = _split_turns(record["prompt"])
    return {"system": system, "history": history, "question": question["content"],
            "response_chosen": _single(record["chosen"], loc, "chosen"),
            "response_rejected": _single(record["rejected"], loc, "rejected")}


_CONVERTERS: dict[tuple[str, str], Callable[[dict, str], dict]] = {
    ("sft", "sharegpt"): lambda r, loc: {"conversations": _sharegpt(r["messages"])},
    ("sft", "openai"): lambda r, loc: {"messages": r["messages"]},
    ("sft", "alpaca"): _sft_alpaca,
    ("pref", "openai"): lambda r, loc: {k: r[k] for k in ("prompt", "chosen", "rejected")},
    ("pref", "sharegpt"): lambda r, loc: {"conversations": _sharegpt(r["prompt"]), **{
        k: {"from": "gpt", "value": _single(r[k], loc, k)} for k in ("chosen", "rejected")}},
    ("pref", "pref"): _pref_seed,
}


def convert(records: Iterable[dict], to: str) -> list[dict]:
    """Canonical records -> `sharegpt`, `openai`, `alpaca` (sft, with `history`) or `pref` (the seed
    preference format); `_loc` is used in errors and not copied."""
    check_choice("to", to, FORMATS)
    out = []
    for record in records:
        kind, loc = _kind_of(record), record.get("_loc", "record")
        converter = _CONVERTERS.get((kind, to))
        if converter is None:
            raise UserError(f"{loc}: cannot convert {kind} records to {to} "
                            f"(possible: {', '.join(t for k, t in _CONVERTERS if k == kind) or 'none'})")
        out.append(converter(record, loc))
    return out


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSON lines (UTF-8, not escaped) atomically."""
    path = Path(path)
    with atomic_writer(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
