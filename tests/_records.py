"""Records shared by the data-layer tests (test_data_readers.py, test_data_rows.py, test_data_convert.py,
test_commands_data.py): a JSON-lines writer, canonical messages, a preference pair and a tool-calling conversation."""

import json
from pathlib import Path

from medgpt.data.readers import read_records

QA = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
SYS = {"role": "system", "content": "S"}


def jsonl(path: Path, *rows) -> Path:
    """Write rows (objects, or raw str/bytes lines) as JSON lines."""
    lines = [r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode() for r in rows]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "_loc"} for r in records]


def read_one(path: Path, kind: str) -> dict:
    records, stats = read_records(str(path), kind)
    assert stats.read == stats.kept == len(records) == 1
    return strip(records)[0]


PREF = {"prompt": [SYS, *QA, {"role": "user", "content": "Q2"}],
        "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}


INTERACTION = {"name": "check_drug_interaction", "description": "Look up the interaction between two drugs",
           "parameters": {"type": "object", "properties": {"drug_a": {"type": "string"}, "drug_b": {"type": "string"}},
                          "required": ["drug_a", "drug_b"]}}
TOOLS = [{"type": "function", "function": INTERACTION}]
ARGS = {"drug_a": "warfarin", "drug_b": "amiodarone"}
CALL = {"type": "function", "function": {"name": "check_drug_interaction", "arguments": ARGS}}
RESULT = '{"severity": "major"}'
TOOL_CONVERSATION = [{"role": "user", "content": "Can I take warfarin with amiodarone?"},
                     {"role": "assistant", "content": "", "tool_calls": [CALL]},
                     {"role": "tool", "content": RESULT, "name": "check_drug_interaction"},
                     {"role": "assistant", "content": "Only with a lower warfarin dose and INR checks."}]
