"""The `medgpt predict` command: answers written in input order; a bad generation flag is a one-line error."""

from __future__ import annotations

import json

from _inference import ROWS, closes_its_engines, write_rows


def test_predict_command(tmp_path, sharp_model, capsys):
    from medgpt.cli import main

    questions = write_rows(tmp_path / "q.jsonl", ROWS[:2])
    argv = ["predict", "--model", sharp_model, "--input", str(questions), "--output", str(tmp_path / "a.jsonl"),
            "--max-new-tokens", "4", "--dtype", "fp32"]
    with closes_its_engines():
        assert main(argv) == 0
    assert [json.loads(line)["id"] for line in (tmp_path / "a.jsonl").read_text().splitlines()] == ["a", "b"]
    assert main(argv[:-4] + ["--temperature", "-1"]) == 2
    assert "temperature must be a number in [0, 2]" in capsys.readouterr().err
