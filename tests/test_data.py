"""Readers, validation, counts, conversion and the `medgpt data` command."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from medgpt.cli import main
from medgpt.data.convert import convert
from medgpt.data.encode import filter_by_length
from medgpt.data.readers import detect_kind, read_records
from medgpt.data.rows import write_jsonl
from medgpt.data.stats import DataStats, write_stats
from medgpt.errors import UserError

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "medgpt" / "sample_data"
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


# ---- formats into the canonical form ------------------------------------------------------------


def test_pt_txt_lines_with_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first doc\n\n  \nsecond doc\r\n", encoding="utf-8")
    records, stats = read_records(str(path), "pt")
    assert records == [{"text": "first doc", "_loc": f"{path}:1"}, {"text": "second doc", "_loc": f"{path}:4"}]
    assert (stats.read, stats.kept, stats.blank) == (2, 2, 2)


def test_pt_structured_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl(tmp_path / "a.jsonl", {"text": "one"})
    (tmp_path / "b.json").write_text(json.dumps([{"text": "two"}, {"text": "three"}]), encoding="utf-8")
    (tmp_path / "c.csv").write_text('text,source\n"four, with comma",x\n', encoding="utf-8")
    pq.write_table(pa.table({"text": ["five"]}), tmp_path / "d.parquet")
    records, stats = read_records(str(tmp_path), "pt")
    assert [r["text"] for r in records] == ["one", "two", "three", "four, with comma", "five"]
    assert [r["_loc"].rsplit(":", 1)[1] for r in records] == ["1", "0", "1", "2", "0"]
    assert stats.kept == 5 and not stats.skipped_files


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


def test_sft_csv_with_json_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output,history\nQ,,A,\n', encoding="utf-8")
    assert read_one(path, "sft") == {"messages": QA}


PREF = {"prompt": [SYS, *QA, {"role": "user", "content": "Q2"}],
        "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "bad"}]}


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


def test_json_file_detects_lines_and_single_object(tmp_path):
    lines = jsonl(tmp_path / "lines.json", {"text": "a"}, {"text": "b"})
    assert [r["_loc"] for r in read_records(str(lines), "pt")[0]] == [f"{lines}:1", f"{lines}:2"]
    single = tmp_path / "one.json"
    single.write_text('\n{\n  "text": "a"\n}\n', encoding="utf-8")
    assert read_records(str(single), "pt")[0] == [{"text": "a", "_loc": f"{single}:2"}]


def test_broken_json_array_is_a_file_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: invalid JSON"):
        read_records(str(path), "pt", on_error="skip")


def test_max_samples(tmp_path):
    path = jsonl(tmp_path / "d.jsonl", *({"text": str(i)} for i in range(10)))
    records, stats = read_records(str(path), "pt", max_samples=3)
    assert [r["text"] for r in records] == ["0", "1", "2"] and stats.read == 3


# ---- tool calling ----------------------------------------------------------------------------------

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


def test_not_utf8_txt_line_spoils_only_that_line(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("一\n二\n".encode() + b"\xff\xfe bad\n" + "四\n".encode())
    records, stats = read_records(str(path), "pt", on_error="skip")
    assert [r["text"] for r in records] == ["一", "二", "四"] and stats.examples == {"not UTF-8": [f"{path}:3"]}


def test_not_utf8_csv_row(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"text\nok\n\xff\xfe\nok\n")
    with pytest.raises(UserError, match=rf"^{path}:3: not UTF-8"):
        read_records(str(path), "pt")


# ---- sources -------------------------------------------------------------------------------------


def test_folder_recursion_and_unknown_extension(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    jsonl(tmp_path / "sub" / "b.jsonl", {"messages": QA})
    jsonl(tmp_path / "a.jsonl", {"messages": [SYS, *QA]})
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "raw.txt").write_text("plain text is not sft data")
    with caplog.at_level(logging.WARNING, logger="medgpt.data.readers"):
        records, stats = read_records(str(tmp_path), "sft")
    assert [r["_loc"] for r in records] == [f"{tmp_path / 'a.jsonl'}:1", f"{tmp_path / 'sub' / 'b.jsonl'}:1"]
    assert stats.skipped_files == [str(tmp_path / "notes.md"), str(tmp_path / "raw.txt")]
    assert "notes.md" in caplog.text and "raw.txt" in caplog.text


def test_comma_separated_sources(tmp_path):
    a, b = jsonl(tmp_path / "a.jsonl", {"text": "a"}), jsonl(tmp_path / "b.jsonl", {"text": "b"})
    assert [r["text"] for r in read_records(f"{b},{a}", "pt")[0]] == ["b", "a"]
    assert [r["text"] for r in read_records([str(a), str(b)], "pt")[0]] == ["a", "b"]


def test_source_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "data.xml").write_text("<x/>")
    with pytest.raises(UserError, match="no such file"):
        read_records(str(tmp_path / "missing.jsonl"), "sft")
    with pytest.raises(UserError, match="no sft data files"):
        read_records(str(tmp_path / "empty"), "sft")
    with pytest.raises(UserError, match="cannot read .xml"):
        read_records(str(tmp_path / "data.xml"), "sft")
    with pytest.raises(UserError, match="kind must be one of"):
        read_records(str(tmp_path), "rm")


def test_hub_failure_names_the_data_set():
    with pytest.raises(UserError, match="no-such-user/medical-data"):
        read_records("no-such-user/medical-data", "sft")


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


# ---- stats, length filter, conversion ------------------------------------------------------------


def test_stats_merge_and_write(tmp_path):
    a, b = DataStats(read=5), DataStats(read=3, blank=1)
    for i in range(4):
        a.drop("missing field", f"a:{i}")
    b.drop("missing field", "b:1")
    b.drop("invalid JSON", "b:2")
    merged = a.merge(b)
    assert (merged.read, merged.kept, merged.blank) == (8, 2, 1)
    assert merged.dropped == {"missing field": 5, "invalid JSON": 1}
    assert merged.examples["missing field"] == ["a:0", "a:1", "a:2", "a:3", "b:1"]
    stats = DataStats(read=4)
    stats.drop("invalid JSON", "x:1")
    assert json.loads(stats.write(tmp_path).read_text())["kept"] == 3
    path = write_stats(tmp_path, {"train": stats, "eval": DataStats(read=1)})
    assert json.loads(path.read_text())["eval"]["kept"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["data_stats.json"]  # no temporary file left


def test_filter_by_length():
    rows = [{"_loc": f"f:{i}"} for i in range(4)]
    stats = DataStats(read=4)
    assert filter_by_length(rows, [1, 9, 3, 12], 8, "drop", stats) == [0, 2]
    assert stats.dropped == {"longer than max_length": 2} and stats.examples["longer than max_length"] == ["f:1", "f:3"]
    assert stats.kept == 2
    stats = DataStats(read=4)
    assert filter_by_length(rows, [1, 9, 3, 12], 8, "truncate", stats) == [0, 1, 2, 3]
    assert stats.truncated == 2 and not stats.dropped and stats.kept == 4
    with pytest.raises(UserError):
        filter_by_length(rows, [1] * 4, 8, "cut", stats)


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


# ---- the command line ----------------------------------------------------------------------------


def test_cli_check_bad_line_exits_nonzero(tmp_path, capsys):
    path = jsonl(tmp_path / "d.jsonl", {"messages": QA}, "", {"messages": QA[::-1]}, "{oops")
    assert main(["data", "check", str(path), "--kind", "sft", "--no-tokenizer"]) == 1
    out, err = capsys.readouterr()
    assert "roles out of order" in out and f"{path}:3" in out
    assert "invalid JSON" in out and f"{path}:4" in out
    assert "read 3, kept 1" in out and "Traceback" not in out + err
    assert main(["data", "check", str(path), "--on-error", "skip", "--no-tokenizer", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "sft" and report["dropped"] == {"roles out of order": 1, "invalid JSON": 1}


def test_cli_user_error_is_one_line(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nope.jsonl"), "--no-tokenizer"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "no such file" in err and "Traceback" not in err


def test_cli_convert_round_trip(tmp_path, capsys):
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}]},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    src, mid, out = tmp_path / "in.jsonl", tmp_path / "mid" / "openai.jsonl", tmp_path / "out" / "sharegpt.jsonl"
    jsonl(src, *rows)
    assert main(["data", "convert", str(src), "--to", "openai", "--out", str(mid)]) == 0
    assert main(["data", "convert", str(mid), "--kind", "sft", "--to", "sharegpt", "--out", str(out)]) == 0
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == rows
    assert json.loads((out.parent / "data_stats.json").read_text())["kept"] == 2
    assert "wrote 2 sft records" in capsys.readouterr().out


def test_cli_check_token_lengths_with_fake_tokenizer(tmp_path, monkeypatch, capsys):
    """The length report logic, with a whitespace tokenizer standing in for the real one."""
    class Tokenizer:
        name_or_path = "fake"

        def __call__(self, texts):
            return {"input_ids": [t.split() for t in texts]}

    class Template:
        def encode(self, tokenizer, messages, system=None, train_on_all=False, tools=None):
            ids = [w for m in messages for w in m["content"].split()]
            return {"input_ids": ids, "labels": ids, "assistant_masks": [1] * len(ids)}

    monkeypatch.setitem(sys.modules, "medgpt.models", types.SimpleNamespace(load_tokenizer=lambda name=None: Tokenizer()))
    monkeypatch.setitem(sys.modules, "medgpt.data.templates", types.SimpleNamespace(get_template=lambda n, t=None: Template()))
    path = jsonl(tmp_path / "d.jsonl", *({"question": "q " * n, "response_chosen": "a", "response_rejected": "b c"}
                                         for n in range(1, 101)))
    assert main(["data", "check", str(path), "--max-length", "50", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert (tokens["p50"], tokens["p90"], tokens["p99"], tokens["max"]) == (52, 92, 101, 102)
    assert tokens["longer"] == 52 and tokens["longer_examples"][0] == f"{path}:49"


@pytest.mark.slow
def test_cli_check_token_lengths_bundled_tokenizer(tmp_path, capsys):
    pytest.importorskip("medgpt.models", reason="medgpt.models (load_tokenizer) not written yet")
    pytest.importorskip("medgpt.data.templates", reason="medgpt.data.templates not written yet")
    path = jsonl(tmp_path / "d.jsonl", *({"messages": [{"role": "user", "content": "word " * n},
                                                       {"role": "assistant", "content": "ok"}]} for n in (1, 50, 200)))
    assert main(["data", "check", str(path), "--max-length", "100", "--json"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens["p50"] < tokens["max"] and tokens["max"] > 200 and tokens["longer"] == 1
