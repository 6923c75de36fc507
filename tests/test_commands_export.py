"""`medgpt export`: the GGUF and the Modelfile written by the command line; bad options are one-line errors."""

from __future__ import annotations

from pathlib import Path

import gguf

from medgpt.cli import main


def test_export_writes_the_gguf_and_the_modelfile(tiny_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "--model", tiny_model, "--to", "gguf", "--out", str(out), "--quant", "q8_0"]) == 0
    printed = capsys.readouterr().out
    name = f"{Path(tiny_model).name}-q8_0.gguf"
    assert (out / name).is_file() and "ollama create NAME -f Modelfile" in printed
    reader = gguf.GGUFReader(str(out / name))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (out / "Modelfile").read_text().startswith(f"FROM ./{name}\nTEMPLATE \"\"\"")


def test_bad_options_are_errors(tiny_model, tmp_path, capsys):
    assert main(["export", "--model", tiny_model, "--out", str(tmp_path / "o"), "--quant", "int4"]) == 2
    assert "quantization 'int4': expected one of" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
