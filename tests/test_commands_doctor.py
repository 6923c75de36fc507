"""`medgpt doctor`'s flags: bad values are errors before anything starts (the doctor itself: test_train_doctor.py)."""

from __future__ import annotations

from medgpt.cli import main


def test_bad_flags_are_errors(capsys):
    assert main(["doctor", "--timeout", "0"]) == 2
    assert "medgpt doctor: error: --timeout 0: must be > 0" in capsys.readouterr().err
    assert main(["doctor", "--allreduce-bytes", "2"]) == 2
    assert "at least 4" in capsys.readouterr().err


def test_a_launch_without_master_address_is_an_error(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert main(["doctor"]) == 2
    assert "WORLD_SIZE 2 without MASTER_ADDR and MASTER_PORT" in capsys.readouterr().err
