"""`medgpt.data.readers`: every supported record format (ShareGPT, OpenAI messages, Alpaca, the seed preference
format, tool calls as LLaMA-Factory's sharegpt format and the OpenAI SDK write them) into the canonical form, each
bad record refused with its reason and exact location (or counted when skipped), the shipped samples, `detect_kind`.

File formats and sources (the raw rows under the records) are in test_data_rows.py."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
from _records import ARGS, INTERACTION, PREF, QA, RESULT, SYS, TOOL_CONVERSATION, TOOLS, jsonl, read_one

from medgpt.data.readers import detect_kind, read_records
from medgpt.errors import UserError

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "medgpt" / "sample_data"


# ---- formats into the canonical form ------------------------------------------------------------


@pytest.mark.parametrize("row", [
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
    {"conversations": [{"from": "system", "value": "S"}, {"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]},
    {"conversations": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "system": "S"},
    {"messages": [SYS, *QA]},
    {"instruction": "Q", "output": "A", "system": "S"},
])
def test_sft_formats(tmp_path, row):
    assert read_one(jsonl(tmp_path / "d.jsonl", row), "sft") == {"messages": [SYS, *QA]}


def test_sft_empty_system_is_no_system(tmp_path):
    row = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert read_one(jsonl(tmp_path / "d.jsonl", row), "sft") == {"messages": QA}


def test_alpaca_with_input_and_history(tmp_path):
    row = {"instruction": "Explain", "input": "fever", "output": "A", "history": [["q0", "a0"]], "system": ""}
    assert read_one(jsonl(tmp_path / "d.jsonl", row), "sft")["messages"] == [
        {"role": "user", "content": "q0"}, {"role": "assistant", "content": "a0"},
        {"role": "user", "content": "Explain\nfever"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("row", [
    {"system": "S", "history": [["Q", "A"]], "question": "Q2", "response_chosen": "good", "response_rejected": "bad"},
    {"prompt": PREF["prompt"], "chosen": "good", "rejected": "bad"},
    {"prompt": PREF["prompt"][1:], "system": "S", "chosen": PREF["chosen"], "rejected": PREF["rejected"]},
    {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"},
                       {"from": "human", "value": "Q2"}],
     "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
])
def test_pref_formats(tmp_path, row):
    assert read_one(jsonl(tmp_path / "d.jsonl", row), "pref") == PREF


def test_pref_seed_format_without_system_or_history(tmp_path):
    row = {"question": "Q", "response_chosen": "good", "response_rejected": "bad"}
    assert read_one(jsonl(tmp_path / "d.jsonl", row), "pref")["prompt"] == [{"role": "user", "content": "Q"}]


def test_max_samples(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", *({"text": str(i)} for i in range(10)))
    records, stats = read_records(str(path), "pt", max_samples=3)
    assert [r["text"] for r in records] == ["0", "1", "2"] and stats.read == 3


# ---- tool calling ----------------------------------------------------------------------------------


def test_sharegpt_function_call_and_observation_turns(tmp_path):
    """LLaMA-Factory's sharegpt tool format (data/README.md there): `function_call` and `observation` turns, the
    call as JSON text of {"name", "arguments"}, and `tools` as a JSON string of function definitions."""
    row = {"conversations": [{"from": "human", "value": TOOL_CONVERSATION[0]["content"]},
                             {"from": "function_call", "value": json.dumps({"name": "check_drug_interaction",
                                                                            "arguments": ARGS})},
                             {"from": "observation", "value": RESULT},
                             {"from": "gpt", "value": TOOL_CONVERSATION[3]["content"]}],
           "tools": json.dumps([INTERACTION])}
    assert read_one(jsonl(tmp_path / "d.jsonl", row), "sft") == {"messages": TOOL_CONVERSATION, "tools": TOOLS}


def test_openai_tool_calls_as_the_sdk_writes_them(tmp_path):
    """An assistant message as the OpenAI SDK serialises it (arguments a JSON string, content null, an id the tool
    message answers), with user content given as text parts."""
    from openai.types.chat import ChatCompletionMessage

    sdk = ChatCompletionMessage.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a1", "type": "function",
         "function": {"name": "check_drug_interaction", "arguments": json.dumps(ARGS)}}]})
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Can I take warfarin "},
                                                     {"type": "text", "text": "with amiodarone?"}]},
                        sdk.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": "call_a1", "content": RESULT},
                        TOOL_CONVERSATION[3]],
           "tools": TOOLS}
    assert read_one(jsonl(tmp_path / "d.jsonl", row), "sft") == {"messages": TOOL_CONVERSATION, "tools": TOOLS}


def test_parallel_calls_and_the_older_function_call_field(tmp_path):
    second = {"drug_a": "warfarin", "drug_b": "aspirin"}
    parallel = {"messages": [TOOL_CONVERSATION[0],
                             {"role": "assistant", "content": "Let me check both.", "tool_calls": [
                                 {"id": "1", "type": "function", "function": {"name": "check_drug_interaction",
                                                                              "arguments": json.dumps(ARGS)}},
                                 {"id": "2", "type": "function", "function": {"name": "lookup", "arguments": second}}]},
                             {"role": "tool", "tool_call_id": "2", "content": "minor"},
                             {"role": "tool", "tool_call_id": "1", "content": RESULT},
                             TOOL_CONVERSATION[3]]}
    messages = read_one(jsonl(tmp_path / "a.jsonl", parallel), "sft")["messages"]
    assert [c["function"]["arguments"] for c in messages[1]["tool_calls"]] == [ARGS, second]
    assert [(m["name"], m["content"]) for m in messages[2:4]] == [("lookup", "minor"),
                                                                 ("check_drug_interaction", RESULT)]
    legacy = {"messages": [TOOL_CONVERSATION[0],
                           {"role": "assistant", "content": None,
                            "function_call": {"name": "check_drug_interaction", "arguments": json.dumps(ARGS)}},
                           {"role": "function", "name": "check_drug_interaction", "content": RESULT},
                           TOOL_CONVERSATION[3]]}
    assert read_one(jsonl(tmp_path / "b.jsonl", legacy), "sft")["messages"] == TOOL_CONVERSATION
    ends_with_a_call = {"messages": TOOL_CONVERSATION[:2]}  # the model learns to call the tool
    assert read_one(jsonl(tmp_path / "c.jsonl", ends_with_a_call), "sft")["messages"] == TOOL_CONVERSATION[:2]


OPENAI_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "check_drug_interaction", "arguments": json.dumps(ARGS)}}]}


@pytest.mark.parametrize("messages,reason,detail", [
    ([QA[0], {**OPENAI_CALL, "tool_calls": [{"type": "function", "function": {
        "name": "check_drug_interaction", "arguments": "{drug_a: warfarin"}}]},
      {"role": "tool", "content": "x"}, QA[1]],
     "invalid JSON", '"messages[1]" tool_calls[0] arguments'),
    ([QA[0], {**OPENAI_CALL, "tool_calls": [{"type": "function", "function": {
        "name": "check_drug_interaction", "arguments": "[1, 2]"}}]}, {"role": "tool", "content": "x"}, QA[1]],
     "wrong type", "arguments are a list"),
    ([QA[0], OPENAI_CALL, QA[0], QA[1]], "roles out of order",
     "message 2 is user, expected tool (the results of message 1's tool calls)"),
    ([QA[0], OPENAI_CALL, {"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}, QA[1]],
     "roles out of order", "message 3 is tool, expected assistant"),
    ([QA[0], {"role": "tool", "content": "x"}, QA[1]], "roles out of order", "message 1 is tool, expected assistant"),
    ([QA[0], OPENAI_CALL, {"role": "tool", "tool_call_id": "c9", "content": "x"}, QA[1]], "roles out of order",
     "answers tool call 'c9'"),
    ([QA[0], OPENAI_CALL, {"role": "tool", "tool_call_id": "c1", "name": "other", "content": "x"}, QA[1]],
     "conflicting fields", "is not the function of its tool_call_id"),
    ([{"role": "user", "from": "gpt", "content": "Q"}, QA[1]], "conflicting fields", 'has "from" \'gpt\' and "role"'),
    ([{"role": "user", "value": "Q", "content": "Q2"}, QA[1]], "conflicting fields", 'has "value" \'Q\' and "content"'),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, QA[1]], "wrong type",
     "content[0] is 'image_url'"),
    ([{**QA[0], "tool_calls": OPENAI_CALL["tool_calls"]}, QA[1]], "wrong type", "only assistant turns make them"),
])
def test_bad_tool_conversations_name_their_line(tmp_path, messages, reason, detail):
    path = jsonl(tmp_path / "d.jsonl", {"messages": QA}, {"messages": messages})
    with pytest.raises(UserError) as info:
        read_records(str(path), "sft")
    assert str(info.value).startswith(f"{path}:2: {reason}: ") and detail in str(info.value), str(info.value)


def test_bad_tools_field(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", {"messages": QA, "tools": "[{\"name\": "})
    with pytest.raises(UserError, match=rf"^{path}:1: invalid JSON: \"tools\""):
        read_records(str(path), "sft")
    nameless = [{"type": "function", "function": {"description": "x"}}]
    path = jsonl(tmp_path / "e.jsonl", {"messages": QA, "tools": nameless})
    with pytest.raises(UserError, match=rf"^{path}:1: missing field: \"tools\[0\]\" needs the function's \"name\""):
        read_records(str(path), "sft")
    same = {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    assert read_one(jsonl(tmp_path / "f.jsonl", {**same, "messages": same["conversations"]}), "sft") == {"messages": QA}


def test_sample_tool_conversations():
    """The shipped tool-calling sample: zh and en, every call names a declared tool with its required arguments
    of the declared JSON types, and every result follows the call it answers."""
    records, stats = read_records(str(SAMPLE / "sft" / "medical_tools.jsonl"), "sft")
    assert 8 <= stats.kept == len(records) <= 12
    zh = sum(any("\u4e00" <= ch <= "\u9fff" for ch in r["messages"][-1]["content"]) for r in records)
    assert 0 < zh < len(records)
    types_ = {"string": str, "number": (int, float), "integer": int}
    calls = []
    for record in records:
        declared = {t["function"]["name"]: t["function"]["parameters"] for t in record["tools"]}
        for message in record["messages"]:
            for call in message.get("tool_calls", []):
                schema, arguments = declared[call["function"]["name"]], call["function"]["arguments"]
                assert set(schema["required"]) <= arguments.keys() <= schema["properties"].keys()
                assert all(isinstance(v, types_[schema["properties"][k]["type"]]) for k, v in arguments.items())
                calls.append(len(message["tool_calls"]))
    assert len(calls) >= 8 and max(calls) >= 2  # a parallel call too
    assert any(not any(m.get("tool_calls") for m in r["messages"]) for r in records)  # tools offered, none needed


# ---- one test per reason: exact location on fail, counted on skip -------------------------------


GOOD = {"pt": {"text": "ok"}, "sft": {"messages": QA},
        "pref": {"question": "Q", "response_chosen": "good", "response_rejected": "bad"}}


@pytest.mark.parametrize("kind,bad,reason", [
    ("sft", '{"messages": [', "invalid JSON"),
    ("pt", "[1, 2]", "not an object"),
    ("sft", {"foo": 1}, "missing field"),
    ("pt", {"text": 5}, "wrong type"),
    ("sft", {"messages": []}, "empty conversation"),
    ("sft", {"conversations": [{"from": "human", "value": " "}, {"from": "gpt", "value": "A"}]}, "empty message"),
    ("sft", {"conversations": [{"from": "bot", "value": "Q"}]}, "unknown role"),
    ("sft", {"messages": QA[::-1]}, "roles out of order"),
    ("sft", {"messages": QA[:1]}, "roles out of order"),
    ("pref", {"prompt": "Q", "chosen": "A", "rejected": "A"}, "identical chosen and rejected"),
    ("pref", {"prompt": QA, "chosen": "x", "rejected": "y"}, "roles out of order"),
    ("pref", {"question": "Q", "response_chosen": "", "response_rejected": "bad"}, "empty message"),
    ("pref", {"question": "Q", "response_chosen": "good"}, "missing field"),
    ("sft", b'{"messages": "\xff\xfe caf\xe9"}', "not UTF-8"),
    ("pt", {"text": ""}, "empty text"),
    ("sft", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
             "messages": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A"}]},
     "conflicting fields"),
])
def test_bad_record(tmp_path, kind, bad, reason):
    path = jsonl(tmp_path / "d.jsonl", GOOD[kind], "", bad, GOOD[kind])  # the bad record is on line 3
    with pytest.raises(UserError) as info:
        read_records(str(path), kind)
    assert str(info.value).startswith(f"{path}:3: {reason}")
    records, stats = read_records(str(path), kind, on_error="skip")
    assert len(records) == stats.kept == 2 and stats.blank == 1
    assert stats.read == stats.kept + sum(stats.dropped.values()) == 3
    assert stats.dropped == {reason: 1} and stats.examples == {reason: [f"{path}:3"]}


def test_detect_kind(tmp_path):
    assert detect_kind(str(jsonl(tmp_path / "a.jsonl", {"conversations": []}))) == "sft"
    assert detect_kind(str(jsonl(tmp_path / "b.jsonl", GOOD["pref"]))) == "pref"
    assert detect_kind(str(jsonl(tmp_path / "c.jsonl", "", {"text": "x"}))) == "pt"


@pytest.mark.parametrize("kind,rel", [("sft", "sft/medical_sft.jsonl"), ("pref", "pref/medical_pref.jsonl"),
                                      ("pt", "pt/medical_corpus.txt"), ("sft", "sft/medical_tools.jsonl")])
def test_sample_data_reads_clean(kind, rel):
    if not (SAMPLE / rel).exists():
        pytest.skip(f"sample data {rel} not shipped yet")
    records, stats = read_records(str(SAMPLE / rel), kind)
    assert records and not stats.dropped and stats.kept == stats.read
