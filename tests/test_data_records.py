"""medgpt.data.records: the record kinds only some stages read, counted and located (path:line) where one is
wrong: KTO's unpaired rows (from preference pairs and from labelled completions) and GRPO/PPO prompts
(multiple-choice rows with their answer letter, open questions with their reference reply)."""

from __future__ import annotations

import pytest
from _stage_runs import write_jsonl

from medgpt.data.records import read_prompts, read_unpaired
from medgpt.errors import UserError


def test_unpaired_reader_counts_and_locates(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [
        {"question": "Q", "response_chosen": "good", "response_rejected": "bad"},
        {"prompt": "Q2", "completion": "fine", "label": 1},
        {"prompt": "Q3", "completion": "x", "label": "maybe"},
    ])
    records, stats = read_unpaired(path, "unpaired", on_error="skip")
    assert [(r["completion"][0]["content"], r["label"]) for r in records] == [("good", True), ("bad", False),
                                                                             ("fine", True)]
    assert (stats.read, stats.kept, dict(stats.dropped)) == (3, 2, {"wrong type": 1})
    with pytest.raises(UserError, match=r"u\.jsonl:3: wrong type: \"label\" is 'maybe'"):
        read_unpaired(path, "unpaired")


def test_grpo_reader_builds_mcq_and_open_prompts(sample_data, tmp_path):
    records, stats = read_prompts(str(sample_data / "mcq" / "val" / "physician_val.csv"), "prompts")
    assert stats.kept == len(records) == 24
    first = records[0]
    assert first["answer"] in "ABCD" and first["options"] == "ABCD"
    assert "\nA. " in first["prompt"][0]["content"] and first["prompt"][0]["content"].endswith("字母。")
    open_rows, _ = read_prompts(str(sample_data / "sft" / "medical_sft.jsonl"), "prompts", max_samples=3)
    assert all(r["prompt"][-1]["role"] == "user" and r["reference"] and r["answer"] is None for r in open_rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("question,A,B,answer\nQ?,yes,no,C\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv:2: wrong type: \"answer\" is 'C', expected one of A, B"):
        read_prompts(str(bad), "prompts")


def test_mcq_rows_take_options_a_to_d_in_either_case_and_refuse_more(tmp_path):
    from medgpt.data.records import mcq_options
    from medgpt.data.rows import RecordError

    assert mcq_options({"question": "q", "a": "x", "B": "y", "c": " ", "answer": "A"}) == {"A": "x", "B": "y"}
    with pytest.raises(RecordError, match="too many options: option column\\(s\\) E, F"):
        mcq_options({"question": "q", "A": "1", "B": "2", "C": "3", "D": "4", "E": "5", "F": 6, "answer": "E"})
    rows = tmp_path / "five.jsonl"
    rows.write_text('{"question": "q", "A": "1", "B": "2", "E": "5", "answer": "A"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"five\.jsonl:1: too many options"):
        read_prompts(str(rows), "prompts")
    records, stats = read_prompts(str(rows), "prompts", on_error="skip")
    assert not records and stats.dropped == {"too many options": 1}
