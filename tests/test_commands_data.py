"""The `medgpt data` command: `check` (bad lines reported with their location, exit codes, token lengths with the
template's encoding) and `convert`."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json

import pytest
from _records import QA, jsonl

from medgpt.cli import main


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
        def encode(self, tokenizer, messages, system=None, train_on_all=False, tools=None, enable_thinking=None):
            ids = [w for m in messages for w in m["content"].split()]
            return {"input_ids": ids, "labels": ids, "assistant_masks": [1] * len(ids)}

    monkeypatch.setattr("medgpt.models.load_tokenizer", lambda name=None: Tokenizer())
    monkeypatch.setattr("medgpt.data.templates.get_template", lambda n, t=None: Template())
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


def test_cli_check_reads_a_multiple_choice_file_as_mcq(sample_data, tmp_path, capsys):
    physician = sample_data / "mcq" / "val" / "physician_val.csv"
    assert main(["data", "check", str(physician), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["kind"], report["kept"], report["dropped"]) == ("mcq", 24, {})
    bad = tmp_path / "bad_val.csv"
    bad.write_text("id,question,A,B,C,D,E,answer\n0,q,a,b,c,d,e,A\n1,q,a,b,c,,,B\n2,q,a,b,c,d,,F\n3,q,a,b,c,d,,C\n",
                   encoding="utf-8")
    assert main(["data", "check", str(bad), "--no-tokenizer"]) == 1
    out = capsys.readouterr().out
    assert "(mcq): read 4, kept 1, dropped 3" in out
    assert all(f"{reason} " in out and f"{bad}:{line}" in out
               for reason, line in (("too many options", 2), ("missing field", 3), ("wrong type", 4)))
