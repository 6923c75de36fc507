"""Where records come from, as raw rows: files (.txt, .jsonl, .json, .csv, .parquet), folders of them,
comma-separated lists and hub data sets, each row with its location (`path:N`: the line, or a JSON array's item
`path:[N]` where items share lines; a CSV row's line, a Parquet or hub row's index); JSON-lines logs read back and
JSON-lines files written whole. `RecordError` is why one row cannot be used (a stable reason and a detail).

Standard library only at import time (pyarrow and datasets are imported where a file or data set is read)."""

from __future__ import annotations

import codecs
import csv
import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medgpt.data.stats import DataStats, preview
from medgpt.errors import UserError
from medgpt.files import atomic_writer

logger = logging.getLogger(__name__)

EXTENSIONS = {"pt": (".txt", ".json", ".jsonl", ".parquet", ".csv"), "sft": (".json", ".jsonl", ".parquet", ".csv")}
EXTENSIONS["pref"] = EXTENSIONS["sft"]
# CSV cells are strings; these columns may hold JSON (message lists, history pairs, tool lists).
_STRUCTURED = {"conversations", "messages", "history", "prompt", "chosen", "rejected", "tools"}

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


def _file_lines(path: Path) -> Iterator[bytes]:
    """A file's physical lines as they are read (the UTF-8 BOM left out): memory does not grow with the file."""
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f):
                yield raw.removeprefix(codecs.BOM_UTF8) if number == 0 else raw
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None


def _lines(path: Path, data: bytes | Iterable[bytes]) -> Iterator[tuple[str, str | RecordError | None]]:
    """Physical lines (of a file's bytes, or as `_file_lines` reads them), each decoded on its own so that a bad
    byte spoils only its line."""
    lines = data.split(b"\n") if isinstance(data, bytes) else data
    if isinstance(lines, list) and lines[-1] == b"":
        lines.pop()
    for number, raw in enumerate(lines, 1):
        loc = f"{path}:{number}"
        try:
            line = raw.removesuffix(b"\n").rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            yield loc, RecordError("not UTF-8", f"byte {raw[exc.start]:#04x} at column {exc.start + 1}")
            continue
        yield loc, line if line.strip() else None


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _parse(line: str | RecordError | None) -> Any:
    """A JSON line's value; invalid JSON, or a string holding half of a surrogate pair (`"\\ud800"`: text no
    tokenizer or Arrow file can store), is the record's error."""
    if not isinstance(line, str):
        return line
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return RecordError("invalid JSON", f"{exc.msg} at column {exc.colno}")
    if _SURROGATE_ESCAPE.search(line):  # a pair decodes to one character; half of one cannot be encoded
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            return RecordError("not UTF-8", f"a lone surrogate escape (\\u{ord(exc.object[exc.start]):04x}) in a "
                                            "string: not text")
    return value


def _txt_rows(path: Path, data: bytes | Iterable[bytes]) -> Iterator[Row]:
    for loc, line in _lines(path, data):
        yield loc, {"text": line} if isinstance(line, str) else line


def _jsonl_rows(path: Path, data: bytes | Iterable[bytes]) -> Iterator[Row]:
    for loc, line in _lines(path, data):
        yield loc, _parse(line)


def _json_rows(path: Path, data: bytes) -> Iterator[Row]:
    """A .json file holds a JSON array of objects, one (possibly pretty-printed) object, or JSON lines."""
    start = len(data) - len(data.lstrip())
    head = data[start:start + 1]
    if head in (b"[", b"{"):
        located = None
        try:
            text = data.decode("utf-8")
            located = _array_items(text) if head == b"[" else None
            whole = json.loads(text) if located is None else None
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
        if located is None and isinstance(whole, list):
            located = [(f"[{index}]", item) for index, item in enumerate(whole)]
        if located is not None:
            yield from ((f"{path}:{where}", item) for where, item in located)
            return
        if isinstance(whole, dict):
            yield f"{path}:{_line_of(data, start)}", whole
            return
    yield from _jsonl_rows(path, data)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":  # JSON's whitespace
        pos += 1
    return pos


def _array_items(text: str) -> list[tuple[str, Any]] | None:
    """The items of the JSON array `text`, each parsed once, with where it is: the line it starts on where every
    item starts a line of its own (a pretty-printed array), else its index (`[3]`). None where `text` is not one
    well-formed array (then `json.loads` says what is wrong with it)."""
    decoder, items, starts = json.JSONDecoder(), [], []
    pos = _skip_space(text, _skip_space(text, 0) + 1)  # past the "["
    while not text.startswith("]", pos) or items:
        try:
            item, after = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        items.append(item)
        starts.append(pos)
        pos = _skip_space(text, after)
        if not text.startswith(",", pos):
            break
        pos = _skip_space(text, pos + 1)
    if not text.startswith("]", pos) or _skip_space(text, pos + 1) != len(text):
        return None
    lines, line, counted = [], 1, 0
    for start in starts:
        line, counted = line + text.count("\n", counted, start), start
        lines.append(line)
    where = lines if len(set(lines)) == len(lines) else [f"[{index}]" for index in range(len(items))]
    return list(zip(where, items))


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
    """The rows of a hub data set, streamed (`datasets` streaming: read as they are taken, never downloaded whole
    or held); one that cannot be loaded (offline, unknown name, bad subset or split) is the user's error."""
    where = ", ".join(part for part in (subset, split) if part)
    index = -1
    try:
        import datasets

        for index, row in enumerate(datasets.load_dataset(name, subset, split=split, streaming=True)):
            yield f"{name}:{index}", row
    except Exception as exc:  # offline, unknown name, bad subset/split, a broken shard: all the user's to fix
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if index >= 0:
            raise UserError(f"{name} ({where}): reading stopped after {index + 1} row(s): {reason}") from None
        raise UserError(f"{name} ({where}): not a local path, and the hub data set cannot be loaded: "
                        f"{reason}") from None


def item_rows(item: Path | str, subset: str | None = None, split: str = "train") -> Iterator[Row]:
    """The raw rows of one file (by its extension) or, for a name, of a hub data set."""
    if isinstance(item, str):
        return hub_rows(item, subset, split)
    suffix = item.suffix.lower()
    if suffix == ".parquet":
        return _parquet_rows(item)
    if suffix in (".txt", ".jsonl"):  # read a line at a time: a corpus larger than memory streams
        return (_txt_rows if suffix == ".txt" else _jsonl_rows)(item, _file_lines(item))
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


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write rows as JSON lines (UTF-8, not escaped) atomically."""
    path = Path(path)
    with atomic_writer(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
