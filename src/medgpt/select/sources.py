"""What selection and decontamination compare: eval items and training records, each as text.

An eval set is multiple-choice questions (C-Eval/CMMLU CSV files, folders or a hub data set),
`{"question", "answer"}` rows, or conversations; a training corpus is anything the data layer reads
as sft records. `open_corpus` streams a corpus once into a memory-mapped Arrow file, so selection
fetches records by index instead of holding them all.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from medgpt.data.rows import item_rows
from medgpt.data.stats import DataStats
from medgpt.errors import UserError

CORPUS_TEXT = ("user", "conversation")


@dataclass
class EvalItem:
    id: str  # "subject/id"
    subject: str
    text: str  # the question: what is embedded, and what an n-gram leak would copy


def _first_row(path: Path) -> dict | None:
    """The first row of a jsonl file when it is an object: its fields tell which kind of eval set it is."""
    if path.suffix.lower() != ".jsonl":
        return None
    raw = next((raw for _, raw in item_rows(path) if raw is not None), None)
    return raw if isinstance(raw, dict) else None


def load_eval_items(source: str, split: str = "val", subjects: list[str] | None = None) -> list[EvalItem]:
    """Eval items from MCQ files/folders/hub sets, question-answer jsonl, or conversations (first user turn)."""
    from medgpt.eval.mcq import load_questions

    path = Path(source).expanduser()
    first = _first_row(path) if path.is_file() else None
    if first is not None and "question" in first and not {"A", "response_chosen"} & first.keys():
        from medgpt.eval.gen import read_rows

        rows = read_rows(path, ("question",))
        return [EvalItem(f"{path.stem}/{i}", path.stem, r["question"]) for i, r in enumerate(rows)]
    if path.is_dir() or path.suffix.lower() == ".csv" or (first is not None and "A" in first) or not path.exists():
        questions = load_questions(source, split, subjects)
        return [EvalItem(f"{q.subject}/{q.id}", q.subject, q.question) for qs in questions.values() for q in qs]
    from medgpt.data.readers import iter_records

    items = []
    for i, record in enumerate(iter_records(source, "sft", DataStats())):
        question = next(m["content"] for m in record["messages"] if m["role"] == "user")
        items.append(EvalItem(f"{path.stem}/{i}", path.stem, question))
    return items


def read_corpus(source: str, on_error: str = "fail", max_samples: int | None = None):
    """Training records (sft) as a list, with their counts: for small sets only (`open_corpus` streams)."""
    from medgpt.data.readers import read_records

    return read_records(source, "sft", on_error=on_error, max_samples=max_samples)


def record_text(record: dict, field: str = "user") -> str:
    """The text of a training record that is compared with eval items: its user turns, or every turn."""
    if field not in CORPUS_TEXT:
        raise UserError(f"corpus text {field!r}: expected one of {', '.join(CORPUS_TEXT)}")
    roles = ("user",) if field == "user" else ("system", "user", "assistant")
    return "\n".join(m["content"] for m in record["messages"] if m["role"] in roles)


def conversation_key(record: dict) -> str:
    """Identical conversations (ignoring case and surrounding space) share a key."""
    text = "\x00".join(f"{m['role']}\x01{m['content'].strip().lower()}" for m in record["messages"])
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


# Arrow strings cannot hold lone surrogates (which JSON escapes can carry), so texts are stored as their
# UTF-8 bytes with surrogates passed through, and decoded on the way out.
def _pack(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def _unpack(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")


class CorpusTexts:
    """The compared text of each record, read a slice (`[i:j]`) or a list of rows (`take`) at a time."""

    def __init__(self, dataset):
        self.dataset = dataset.select_columns(["text"])

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, rows: slice) -> list[str]:
        return [_unpack(t) for t in self.dataset[rows]["text"]]

    def take(self, indices: Iterable[int]) -> list[str]:
        return [_unpack(t) for t in self.dataset.select(list(indices))[:]["text"]]


class Corpus:
    """Training records in a memory-mapped Arrow file (columns `record` JSON, `loc`, `text`, `key`), by index."""

    def __init__(self, path: Path):
        from datasets import Dataset

        self.dataset = Dataset.from_file(str(path))
        self.texts = CorpusTexts(self.dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def record(self, index: int) -> dict:
        """The record at `index`, with its `_loc`, as the data layer reads it."""
        row = self.dataset[int(index)]
        return {**json.loads(_unpack(row["record"])), "_loc": _unpack(row["loc"])}

    def records(self, indices: Iterable[int]) -> list[dict]:
        """The records at `indices`, in that order (one read for all of them)."""
        rows = self.dataset.select_columns(["record", "loc"]).select(list(indices))[:]
        return [{**json.loads(_unpack(r)), "_loc": _unpack(loc)} for r, loc in zip(rows["record"], rows["loc"])]

    def keys(self, indices: Iterable[int]) -> list[str]:
        """The `conversation_key` of the records at `indices`."""
        return self.dataset.select_columns(["key"]).select(list(indices))[:]["key"]


def write_corpus(records: Iterable[dict], path: Path, field: str) -> int:
    """Write records to an Arrow file as they come (JSON, location, `record_text(field)`, conversation key)."""
    from datasets import Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({"record": Value("binary"), "loc": Value("binary"), "text": Value("binary"),
                         "key": Value("string")})
    count = 0
    with ArrowWriter(features=features, path=str(path), writer_batch_size=10_000) as writer:
        for record in records:
            text, key = record_text(record, field), conversation_key(record)
            loc = record.pop("_loc", "")
            writer.write({"record": _pack(json.dumps(record, ensure_ascii=False)), "loc": _pack(loc),
                          "text": _pack(text), "key": key})
            count += 1
        writer.finalize()
    return count


@contextmanager
def open_corpus(source: str, folder: str | Path, field: str = "user", on_error: str = "fail",
                max_samples: int | None = None) -> Iterator[tuple[Corpus, DataStats]]:
    """(`Corpus`, the read's `DataStats`) of the sft records of `source`, streamed once into an Arrow file in a
    scratch folder under `folder`; the folder is removed on leaving, however the block ends."""
    from medgpt.data.readers import iter_records

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".corpus-", dir=folder) as scratch:
        path, stats = Path(scratch) / "corpus.arrow", DataStats()
        if not write_corpus(iter_records(source, "sft", stats, on_error=on_error, max_samples=max_samples), path,
                            field):
            raise UserError(f"{source}: no usable training records")
        yield Corpus(path), stats
