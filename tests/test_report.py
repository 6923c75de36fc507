"""Run reports: curves as embedded PNG plots, final metrics, data counts, answers side by side (cached)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil

import pytest

from medgpt.data.stats import DataStats
from medgpt.errors import UserError
from medgpt.report import ModelRef, StageResult, load_prompts, plot_curves, write_report


def fake_stage(folder, rows):
    """A stage folder as a DPO run leaves it: metrics log, final metrics, data counts."""
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "lo')
    (folder / "final_metrics.json").write_text(json.dumps({"train_loss": 0.61, "epoch": 1.0, "note": "x"}))
    stats = DataStats(read=72)
    for i in range(3):
        stats.drop("longer than max_length", f"pref.jsonl:{i + 1}")
    stats.drop("identical chosen and rejected", "pref.jsonl:9")
    (folder / "data_stats.json").write_text(json.dumps({"train": stats.to_dict()}))


def test_report_has_plots_metrics_data_and_answers(tiny_model, tmp_path, monkeypatch):
    model = str(shutil.copytree(tiny_model, tmp_path / "model"))
    rows = [{"step": s, "loss": 0.7 - 0.05 * s, "rewards/margins": 0.1 * s, "rewards/chosen": 0.05 * s,
             "rewards/accuracies": 0.5 + 0.1 * s, "learning_rate": 1e-4} for s in range(1, 5)]
    fake_stage(tmp_path / "dpo", rows)
    prompts = load_prompts(None)
    assert len(prompts) == 6 and all(p[-1]["role"] == "user" for p in prompts)
    results = [StageResult("dpo", "dpo", tmp_path / "dpo", ModelRef(model, None, "chatml"))]
    report = write_report(tmp_path, results, ModelRef(model, None, "chatml"), prompts, max_new_tokens=3)

    md = report.read_text()
    page = (tmp_path / "report.html").read_text()
    # the curves: a PNG beside the markdown, the same PNG inside the html
    assert "![dpo.png](plots/dpo.png)" in md
    png = (tmp_path / "plots" / "dpo.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [png]
    assert "<img" in page and 'src="plots/' not in page  # self-contained
    # final metrics and data counts (read / kept / dropped by reason)
    assert "| train_loss | 0.61 |" in md
    assert "| train | 72 | 68 | 4 | 0 | longer than max_length: 3, identical chosen and rejected: 1 |" in md
    assert "longer than max_length: 3" in page
    # answers: a column per model, a row per prompt
    assert "| prompt | base | dpo |" in md
    for messages in prompts:
        assert messages[-1]["content"].replace("|", "\\|") in md
    cached = json.loads((tmp_path / "answers.json").read_text())
    assert set(cached) == {"base", "dpo"} and all(len(c["answers"]) == 6 for c in cached.values())

    # writing the report again reuses the answers: no model is loaded
    def no_engine(*args, **kwargs):
        raise AssertionError("answers were generated again")

    monkeypatch.setattr("medgpt.infer.engine.load_engine", no_engine)
    write_report(tmp_path, results, ModelRef(model, None, "chatml"), prompts, max_new_tokens=3)
    # ... unless a model changed (trained again)
    weights = tmp_path / "model" / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="generated again"):
        write_report(tmp_path, results, ModelRef(model, None, "chatml"), prompts, max_new_tokens=3)


def test_report_without_curves_or_answers(tmp_path):
    (tmp_path / "rm").mkdir()
    report = write_report(tmp_path, [StageResult("rm", "rm", tmp_path / "rm")], None, load_prompts("none"))
    md = report.read_text()
    assert "No training curves logged" in md and "Answers side by side" not in md
    assert plot_curves([{"step": 1, "learning_rate": 1e-4}], "x") is None


def test_plot_panels_follow_the_logged_metrics():
    rows = [{"step": s, "loss": 1.0 / s, "kl": 0.01 * s, "reward": 0.1 * s, "reward_std": 1.0} for s in (1, 2, 3)]
    assert plot_curves(rows, "grpo").startswith(b"\x89PNG")


def test_bad_prompts_file_points_at_the_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"query": "ok"}\n{"query": \n')
    with pytest.raises(UserError, match=r"prompts.jsonl:2"):
        load_prompts(str(path))
    assert load_prompts("off") == []
