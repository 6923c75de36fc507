"""medgpt.train.kto's data: unpaired rows read from preference pairs and from labelled completions, counted and
located (path:line) where one is wrong. KTO's learning signal is checked in test_train.py."""

from __future__ import annotations

import pytest
from _stage_runs import write_jsonl

from medgpt.data.records import read_unpaired
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
