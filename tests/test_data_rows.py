"""`medgpt.data.rows`: files (.txt, .jsonl, .json, .csv, .parquet) and their parsing into rows with their exact
location (`path:N`), a broken or non-UTF-8 line spoiling only itself, folders, comma-separated lists, source
errors and hub data sets; read through `read_records`, which the records' normalizers sit on."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import logging

import pytest
from _records import QA, SYS, jsonl, read_one

from medgpt.data.readers import read_records
from medgpt.errors import UserError

# ---- file formats -----------------------------------------------------------------------------------


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
    assert [r["_loc"].rsplit(":", 1)[1] for r in records] == ["1", "[0]", "[1]", "2", "0"]  # b.json: one line
    assert stats.kept == 5 and not stats.skipped_files


def test_sft_csv_with_json_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,input,output,history\nQ,,A,\n', encoding="utf-8")
    assert read_one(path, "sft") == {"messages": QA}


def test_json_file_detects_lines_and_single_object(tmp_path):
    lines = jsonl(tmp_path / "lines.json", {"text": "a"}, {"text": "b"})
    assert [r["_loc"] for r in read_records(str(lines), "pt")[0]] == [f"{lines}:1", f"{lines}:2"]
    single = tmp_path / "one.json"
    single.write_text('\n{\n  "text": "a"\n}\n', encoding="utf-8")
    assert read_records(str(single), "pt")[0] == [{"text": "a", "_loc": f"{single}:2"}]


def test_json_array_items_are_located_by_their_line_or_their_index(tmp_path):
    path = tmp_path / "pretty.json"
    path.write_text(json.dumps([{"text": "a"}, {"text": "b\nc"}, {"text": "d"}], indent=2), encoding="utf-8")
    assert [r["_loc"] for r in read_records(str(path), "pt")[0]] == [f"{path}:2", f"{path}:5", f"{path}:8"]
    path.write_text('[{"text": "a"},\n {"text": "b"}, {"text": ""}]', encoding="utf-8")
    records, stats = read_records(str(path), "pt", on_error="skip")
    assert [r["_loc"] for r in records] == [f"{path}:[0]", f"{path}:[1]"] and stats.examples == {
        "empty text": [f"{path}:[2]"]}


def test_broken_json_array_is_a_file_error(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"text": "a"},\n{"text": }\n]', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{path}:3: invalid JSON"):
        read_records(str(path), "pt", on_error="skip")


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


def test_a_hub_data_set_is_streamed_and_its_failures_are_user_errors(tmp_path):
    """`hub_rows` reads through `datasets.load_dataset(..., streaming=True)` (the reference: the same set loaded
    without streaming); a data set folder in the hub's layout stands in for the hub, which tests cannot reach."""
    import datasets

    from medgpt.data.rows import hub_rows

    folder = tmp_path / "medical_pairs" / "data"
    folder.mkdir(parents=True)
    rows = [{"question": f"q{i}", "answer": f"a{i}"} for i in range(25)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    name = str(tmp_path / "medical_pairs")
    streamed = hub_rows(name, None, "train")
    assert next(streamed) == (f"{name}:0", rows[0])  # read as taken: nothing was downloaded or converted whole
    assert [row for _, row in streamed] == list(datasets.load_dataset(name, split="train"))[1:]
    with pytest.raises(UserError, match="hub data set cannot be loaded"):
        list(hub_rows(name, None, "validation"))


def test_half_a_surrogate_pair_is_the_records_error_and_a_whole_pair_is_text(tmp_path):
    """`"\\ud800"` alone decodes (Python's json) to a string that no UTF-8 writer, tokenizer or Arrow file takes;
    a pair is one character (the reference: Python's own decoding of the pair)."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fever \\ud800 cough"}\n{"text": "smile \\ud83d\\ude00"}\n', encoding="utf-8")
    records, stats = read_records(str(path), "pt", on_error="skip")
    assert [r["text"] for r in records] == ["smile \U0001F600"]
    assert stats.dropped == {"not UTF-8": 1} and stats.examples["not UTF-8"] == [f"{path}:1"]
