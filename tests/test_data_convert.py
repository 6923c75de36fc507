"""`medgpt.data.convert`: canonical records to ShareGPT, OpenAI, Alpaca and the seed preference format, each read
back by the readers as the same records (tool calls included), and what a format cannot hold refused."""

import json

import pytest
from _records import ARGS, INTERACTION, PREF, QA, SYS, TOOL_CONVERSATION, TOOLS, strip

from medgpt.data.convert import convert
from medgpt.data.readers import read_records
from medgpt.data.rows import write_jsonl
from medgpt.errors import UserError


@pytest.mark.parametrize("to", ["sharegpt", "openai", "alpaca"])
def test_convert_sft_round_trip(tmp_path, to):
    canonical = [{"messages": [SYS, *QA, {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]}]
    path = write_jsonl(tmp_path / "out.jsonl", convert(canonical, to))
    assert strip(read_records(str(path), "sft")[0]) == canonical


@pytest.mark.parametrize("to", ["sharegpt", "openai", "pref"])
def test_convert_pref_round_trip(tmp_path, to):
    path = write_jsonl(tmp_path / "out.jsonl", convert([PREF], to))
    assert strip(read_records(str(path), "pref")[0]) == [PREF]


def test_convert_seed_pref_format():
    assert convert([PREF], "pref") == [{"system": "S", "history": [["Q", "A"]], "question": "Q2",
                                         "response_chosen": "good", "response_rejected": "bad"}]


def test_convert_refuses_what_the_format_cannot_hold():
    with pytest.raises(UserError, match="cannot convert pt records to sharegpt"):
        convert([{"text": "x", "_loc": "f:1"}], "sharegpt")
    two = {**PREF, "chosen": PREF["chosen"] * 2, "_loc": "f:2"}
    with pytest.raises(UserError, match="f:2: chosen has 2 messages"):
        convert([two], "pref")


@pytest.mark.parametrize("to", ["sharegpt", "openai"])
def test_convert_tool_conversations_round_trip(tmp_path, to):
    canonical = [{"messages": [SYS, *TOOL_CONVERSATION], "tools": TOOLS}]
    path = write_jsonl(tmp_path / "out.jsonl", convert(canonical, to))
    assert strip(read_records(str(path), "sft")[0]) == canonical
    written = json.loads(path.read_text(encoding="utf-8"))
    if to == "sharegpt":
        roles = [t["from"] for t in written["conversations"]]
        assert roles == ["system", "human", "function_call", "observation", "gpt"]
        assert json.loads(written["tools"]) == [INTERACTION]
    else:
        assert json.loads(written["messages"][2]["tool_calls"][0]["function"]["arguments"]) == ARGS


def test_convert_refuses_tool_calls_the_format_cannot_hold():
    record = {"messages": TOOL_CONVERSATION, "tools": TOOLS, "_loc": "f:3"}
    with pytest.raises(UserError, match="f:3: alpaca cannot hold tool calls"):
        convert([record], "alpaca")
    talking = [TOOL_CONVERSATION[0], {**TOOL_CONVERSATION[1], "content": "Checking."}, *TOOL_CONVERSATION[2:]]
    with pytest.raises(UserError, match="f:4: message 1 has text and tool calls"):
        convert([{"messages": talking, "_loc": "f:4"}], "sharegpt")
