"""Reasoning in records: every input form (OpenAI `reasoning_content`, a `<think>` block opening a ShareGPT, OpenAI
or Alpaca reply, HuatuoGPT-o1's Question / Complex_CoT / Response) reads into an assistant message's `reasoning`;
conflicting or malformed forms are `path:line` errors; `data check` counts records with and without reasoning;
`data convert` writes each form back and reads back to the same records. The shipped reasoning samples read as
their README says. The reading of a `<think>` block is checked against Qwen3's official chat template in
test_data_templates_reasoning.py (the rendered texts agree)."""

from __future__ import annotations

import json

import pytest
from _records import jsonl, read_one, strip

from medgpt.cli import main
from medgpt.data.convert import convert
from medgpt.data.readers import detect_kind, read_records, to_sft
from medgpt.data.rows import write_jsonl
from medgpt.errors import UserError

ANSWER = {"role": "assistant", "content": "多休息，多喝水。", "reasoning": "发热伴咳嗽，多为病毒感染。\n先对症处理。"}
EXPECTED = {"messages": [{"role": "user", "content": "发烧咳嗽怎么办？"}, ANSWER]}
THINK = f"<think>\n{ANSWER['reasoning']}\n</think>\n\n{ANSWER['content']}"
FORMS = {
    "openai reasoning_content": {"messages": [{"role": "user", "content": "发烧咳嗽怎么办？"}, {
        "role": "assistant", "content": ANSWER["content"], "reasoning_content": ANSWER["reasoning"]}]},
    "openai think block": {"messages": [{"role": "user", "content": "发烧咳嗽怎么办？"},
                                        {"role": "assistant", "content": THINK}]},
    "openai both, the same": {"messages": [{"role": "user", "content": "发烧咳嗽怎么办？"}, {
        "role": "assistant", "content": THINK, "reasoning_content": ANSWER["reasoning"]}]},
    "sharegpt think block": {"conversations": [{"from": "human", "value": "发烧咳嗽怎么办？"},
                                               {"from": "gpt", "value": THINK}]},
    "alpaca think block": {"instruction": "发烧咳嗽怎么办？", "input": "", "output": THINK},
    "alpaca reasoning_content": {"instruction": "发烧咳嗽怎么办？", "output": ANSWER["content"],
                                 "reasoning_content": ANSWER["reasoning"]},
    "huatuogpt-o1": {"Question": "发烧咳嗽怎么办？", "Complex_CoT": ANSWER["reasoning"], "Response": ANSWER["content"]},
}


@pytest.mark.parametrize("form", FORMS)
def test_every_form_reads_into_reasoning(tmp_path, form):
    path = jsonl(tmp_path / "d.jsonl", FORMS[form])
    assert detect_kind(str(path)) == "sft"
    assert read_one(path, "sft") == EXPECTED


def test_empty_think_block_and_history_replies():
    """An empty think block is no reasoning (a non-thinking reply); Alpaca history replies are read as replies."""
    row = {"instruction": "Q2", "output": "<think>\n\n</think>\n\nA2", "history": [["Q1", "<think>r1</think>A1"]]}
    assert to_sft(row)["messages"] == [{"role": "user", "content": "Q1"},
                                       {"role": "assistant", "content": "A1", "reasoning": "r1"},
                                       {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


@pytest.mark.parametrize("reply,extra,reason", [
    (THINK, {"reasoning_content": "something else"}, "conflicting fields"),
    ("<think>no end", {}, "invalid think block"),
    ("answer </think> more", {}, "invalid think block"),
    ("<think>a</think><think>b</think>answer", {}, "invalid think block"),
    ("<think>only reasoning</think>", {}, "has reasoning but no answer|empty message"),
    ("ok", {"reasoning_content": 3}, "wrong type"),
])
def test_bad_reasoning_is_a_path_line_error(tmp_path, reply, extra, reason):
    good = FORMS["openai reasoning_content"]
    bad = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": reply, **extra}]}
    path = jsonl(tmp_path / "d.jsonl", good, bad)
    with pytest.raises(UserError, match=f"d.jsonl:2: ({reason})"):
        read_records(str(path), "sft")
    records, stats = read_records(str(path), "sft", on_error="skip")
    assert len(records) == 1 and sum(stats.dropped.values()) == 1


def test_data_check_counts_records_with_and_without_reasoning(tmp_path, capsys):
    path = jsonl(tmp_path / "d.jsonl", *FORMS.values(), {"conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]})
    assert main(["data", "check", str(path), "--no-tokenizer", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["reasoning"] == {"with": len(FORMS), "without": 1}
    assert main(["data", "check", str(path), "--no-tokenizer"]) == 0
    assert f"reasoning: {len(FORMS)} record(s) with, 1 without" in capsys.readouterr().out


@pytest.mark.parametrize("to", ["openai", "sharegpt", "alpaca"])
def test_convert_writes_reasoning_back(tmp_path, to):
    multi = {"messages": [{"role": "system", "content": "S"}, EXPECTED["messages"][0], ANSWER,
                          {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}
    records = [{**EXPECTED, "_loc": "x:1"}, {**multi, "_loc": "x:2"}]
    out = convert(records, to)
    if to == "openai":
        assert out[0]["messages"][1] == {"role": "assistant", "content": ANSWER["content"],
                                         "reasoning_content": ANSWER["reasoning"]}
    elif to == "sharegpt":
        assert out[0]["conversations"][1] == {"from": "gpt", "value": THINK}
    else:
        assert out[0]["output"] == THINK and out[1]["history"] == [["发烧咳嗽怎么办？", THINK]]
    path = write_jsonl(tmp_path / f"{to}.jsonl", out)
    assert strip(read_records(str(path), "sft")[0]) == strip(records)


def test_convert_refuses_reasoning_a_sharegpt_call_turn_cannot_hold():
    call = {"type": "function", "function": {"name": "f", "arguments": {}}}
    record = {"messages": [{"role": "user", "content": "Q"},
                           {"role": "assistant", "content": "", "tool_calls": [call], "reasoning": "r"},
                           {"role": "tool", "content": "1", "name": "f"}, {"role": "assistant", "content": "A"}]}
    with pytest.raises(UserError, match="reasoning and tool calls"):
        convert([record], "sharegpt")
    assert convert([record], "openai")[0]["messages"][1]["reasoning_content"] == "r"


def test_shipped_reasoning_samples(sample_data):
    records, stats = read_records(str(sample_data / "sft" / "medical_reasoning.jsonl"), "sft")
    with_reasoning = [r for r in records if any(m.get("reasoning") for m in r["messages"])]
    assert stats.read == stats.kept == len(records) == 20 and len(with_reasoning) == 18
    chinese = [r for r in records if any("\u4e00" <= ch <= "\u9fff" for ch in r["messages"][-1]["content"])]
    assert len(chinese) == 10
    assert all("<think>" not in m["content"] for r in records for m in r["messages"])
