"""SFT on reasoning data (the shipped src/medgpt/sample_data/sft/medical_reasoning.jsonl, records with and without
reasoning mixed): each training row is Qwen3's official chat template's rendering of its record
(tests/fixtures/chat_templates/qwen3.jinja, the reasoning given as `reasoning_content`) and its labels are exactly
the assistant replies of that text, think block included; `train_on_reasoning: false` leaves the reasoning
unlabelled, `enable_thinking: false` trains without it; a tiny SFT on the samples trains."""

from __future__ import annotations

import json
import re

import pytest
from _stage_runs import FAST, train
from test_data_templates import labelled_runs
from test_data_templates_reasoning import official

from medgpt.train import build_config
from medgpt.data.readers import read_records

REPLY = re.compile(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", re.DOTALL)
OPTIONS = {**FAST, "template": "qwen3", "allow_split_markers": True, "max_length": 1024}


def rows(model: str, data: str, tmp_path, **options) -> tuple[list[dict], list[dict]]:
    """The records and the training rows the sft stage builds from them."""
    from medgpt.models import load_tokenizer
    from medgpt.train import sft

    cfg = build_config({"stage": "sft", "model": model, "data": data, "output_dir": str(tmp_path / "o"),
                        **OPTIONS, **options})
    records = read_records(cfg.data.data, "sft")[0]
    train_rows = sft.build_datasets(cfg, load_tokenizer(model))[0]
    return records, [train_rows[i] for i in range(len(train_rows))]


def official_form(messages: list[dict]) -> list[dict]:
    return [{**{k: v for k, v in m.items() if k != "reasoning"}, "reasoning_content": m["reasoning"]}
            if "reasoning" in m else m for m in messages]


def test_rows_are_the_official_rendering_with_labels_on_the_replies(tiny_model, sample_data, tokenizer, tmp_path):
    records, train_rows = rows(tiny_model, str(sample_data / "sft" / "medical_reasoning.jsonl"), tmp_path)
    assert len(records) == len(train_rows) == 20
    thinking = 0
    for record, row in zip(records, train_rows):
        expected = official(official_form(record["messages"]), False)
        runs = labelled_runs(tokenizer, row)
        assert "".join(text for _, text in runs) == expected
        assert [text for labelled, text in runs if labelled] == REPLY.findall(expected)
        last = REPLY.findall(expected)[-1]
        reasoning = record["messages"][-1].get("reasoning")
        assert last.startswith(f"<think>\n{reasoning}\n</think>\n\n" if reasoning else "<think>\n\n</think>\n\n")
        thinking += bool(reasoning)
    assert thinking == 18  # mixed data: 18 records think, 2 answer after an empty think block


def test_train_on_reasoning_and_enable_thinking(tiny_model, sample_data, tokenizer, tmp_path):
    data = str(sample_data / "sft" / "medical_reasoning.jsonl")
    records, context = rows(tiny_model, data, tmp_path, train_on_reasoning=False)
    _, without = rows(tiny_model, data, tmp_path, enable_thinking=False)
    for record, row_context, row_without in zip(records, context, without):
        last = record["messages"][-1]
        spans = [text for labelled, text in labelled_runs(tokenizer, row_context) if labelled]
        if last.get("reasoning"):
            assert spans[-1] == last["content"] + "<|im_end|>"  # the think block is context
            assert last["reasoning"] in tokenizer.decode(row_context["input_ids"])
        else:
            assert spans[-1] == f"<think>\n\n</think>\n\n{last['content']}<|im_end|>"
        plain = [{k: v for k, v in m.items() if k != "reasoning"} for m in record["messages"]]
        assert tokenizer.decode(row_without["input_ids"]) == official(plain, False)


@pytest.mark.slow
def test_tiny_sft_on_the_reasoning_samples(tiny_model, sample_data, tmp_path):
    out = tmp_path / "sft"
    log = train("sft", tiny_model, out, str(sample_data / "sft" / "medical_reasoning.jsonl"), template="qwen3",
                allow_split_markers=True, max_length=1024, method="full", max_steps=6, learning_rate=3e-3,
                per_device_train_batch_size=4)
    curve = [row["loss"] for row in log if "loss" in row]
    assert len(curve) == 6 and curve[-1] < curve[0], curve
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert stats["read"] == stats["kept"] == 20
    assert json.loads((out / "medgpt.json").read_text())["template"] == "qwen3"
