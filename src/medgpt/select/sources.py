"""What selection and decontamination compare: eval items and training records, each as text.

An eval set is multiple-choice questions (C-Eval/CMMLU CSV files, folders or a hub data set),
`{"question", "answer"}` rows, or conversations; a training corpus is anything the data layer reads
as sft records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medgpt.data.rows import item_rows
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
    records, _ = read_corpus(source)
    items = []
    for i, record in enumerate(records):
        question = next(m["content"] for m in record["messages"] if m["role"] == "user")
        items.append(EvalItem(f"{path.stem}/{i}", path.stem, question))
    return items


def read_corpus(source: str, on_error: str = "fail", max_samples: int | None = None):
    """Training records (sft) with their counts; a bad record stops the read or is counted, never lost silently."""
    from medgpt.data.readers import read_records

    return read_records(source, "sft", on_error=on_error, max_samples=max_samples)


def record_text(record: dict, field: str = "user") -> str:
    """The text of a training record that is compared with eval items: its user turns, or every turn."""
    if field not in CORPUS_TEXT:
        raise UserError(f"corpus text {field!r}: expected one of {', '.join(CORPUS_TEXT)}")
    roles = ("user",) if field == "user" else ("system", "user", "assistant")
    return "\n".join(m["content"] for m in record["messages"] if m["role"] in roles)
