"""`medgpt parity`: a table and a JSON file; exit 0 when every pair is within its tolerance, 1 (naming the first
diverging prompt and position) when one is not."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_model

from medgpt.cli import main
from medgpt.export.gguf import export_model


@pytest.mark.slow
def test_parity_passes_and_writes_its_table_and_json(sharp_model, tmp_path, capsys):
    out = tmp_path / "parity.json"
    code = main(["parity", "--model", sharp_model, "--limit", "1", "--max-new-tokens", "4", "--quants", "f16",
                 "--runtimes", "engine,gguf,llama.cpp", "--output", str(out), "--work-dir", str(tmp_path / "w")])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads(out.read_text())
    assert [p["candidate"] for p in result["pairs"]] == ["medgpt engine (model, fp32)",
                                                         "GGUF f16 (transformers GGUF loader)", "GGUF f16 (llama.cpp)"]
    assert "| model (transformers, fp32) vs GGUF f16 (transformers GGUF loader) | f16 |" in printed
    assert "passed; written:" in printed


@pytest.mark.slow
def test_another_model_fails_and_names_where(sharp_model, tmp_path, capsys):
    other = build_tiny_model(tmp_path / "other", seed=1)
    stranger = export_model(str(other), tmp_path / "g", quant="f16").gguf
    code = main(["parity", "--model", sharp_model, "--limit", "1", "--max-new-tokens", "4", "--quants", "",
                 "--runtimes", "gguf", "--gguf", str(stranger), "--output", str(tmp_path / "p.json")])
    printed = capsys.readouterr().out
    assert code == 1
    assert "| FAIL: max \\|Δ log-prob\\|" in printed and "first diverges at prompt 0" in printed
    result = json.loads((tmp_path / "p.json").read_text())
    assert result["passed"] is False and result["pairs"][0]["failures"][0].startswith("max |Δ log-prob| ")


def test_bad_options_are_errors(tmp_path, capsys):
    assert main(["parity", "--max-new-tokens", "0", "--output", str(tmp_path / "p.json")]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err
