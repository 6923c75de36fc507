"""The `medgpt chat` command: it shows the loaded model and every generation setting with where the setting comes
from (a flag, medgpt's chat default or the model's generation_config)."""

from __future__ import annotations

import io

from _inference import closes_its_engines, with_generation_config


def test_chat_command_shows_the_loaded_model_and_settings(sharp_model, tmp_path, monkeypatch, capsys):
    from medgpt.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # the chat ends at once (Ctrl-D)
    shipped = with_generation_config(sharp_model, tmp_path / "m", do_sample=True, temperature=0.6)
    with closes_its_engines():
        assert main(["chat", "--model", shipped, "--dtype", "fp32", "--top-p", "0.5"]) == 0
    out = capsys.readouterr().out
    assert f"model m ({shipped})" in out and "adapter none" in out and "dtype float32" in out
    assert ("temperature 0.6, top-p 0.5, repetition penalty 1.1, max new tokens 512 "
            "(from --top-p; medgpt's chat default; the model's generation_config)") in out
