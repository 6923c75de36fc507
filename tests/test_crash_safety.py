"""What a kill at the wrong moment leaves behind is never taken for finished work: a checkpoint folder cut off
while saving, a finished run's medgpt.json beside a new run's partial files, temporary folders of killed
writes, and a pipeline stage killed while merging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt.config import build_config
from medgpt.data.stats import temporary_sibling
from medgpt.models import save_atomic
from medgpt.train import common


def config(tmp_path: Path, **extra):
    return build_config({"stage": "sft", "output_dir": str(tmp_path / "out"), "report_to": "none", **extra})


def test_resume_passes_over_a_checkpoint_cut_off_while_saving(tmp_path, caplog):
    out = tmp_path / "out"
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6: model written, state not yet
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert common.last_checkpoint(config(tmp_path, resume=True)) == str(out / "checkpoint-4")
    assert "incomplete checkpoint(s) checkpoint-6" in caplog.text
    assert common.last_checkpoint(config(tmp_path)) is None  # a fresh run resumes from nothing


def test_a_fresh_run_first_marks_a_finished_folder_unfinished(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "medgpt.json").write_text(json.dumps({"stage": "sft", "complete": True}))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    common.prepare_output(config(tmp_path, resume=True))
    assert (out / "medgpt.json").exists()  # resuming continues the same run
    common.prepare_output(config(tmp_path))
    assert not (out / "medgpt.json").exists() and not (out / "metrics.jsonl").exists()


def test_temporary_folders_of_killed_writes_are_removed_by_the_next_one(tmp_path):
    out = tmp_path / "merged"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".merged.tmp-{dead.stdout.strip()}"  # that process has exited: its folder is litter
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"x" * 1000)
    other = tmp_path / ".merged.tmp-1"  # pid 1 is alive: a write in progress elsewhere is left alone
    other.mkdir()
    save_atomic(out, lambda tmp: (tmp / "config.json").write_text("{}"))
    assert (out / "config.json").exists()
    assert not left.exists() and other.exists()
    assert temporary_sibling(out).name == f".merged.tmp-{os.getpid()}"


def test_a_pipeline_stage_killed_while_merging_resumes_with_the_merge_only(tmp_path, sample_data, monkeypatch):
    from medgpt import models, train
    from medgpt.pipeline import build_pipeline, plan_steps, read_manifest, run_pipeline

    run_dir = tmp_path / "run"
    p = build_pipeline({"output_dir": str(run_dir), "report_to": "none", "stages": [
        {"stage": "sft", "data": str(sample_data / "sft" / "medical_sft.jsonl")}]})

    def trained(cfg):  # stands in for training: the stage's folder as a finished `train` leaves it
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        (cfg.output_dir / "medgpt.json").write_text(json.dumps({"stage": "sft", "complete": True}))
        return {"train_loss": 1.0}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run_training", trained)
    monkeypatch.setattr(models, "merge_adapter", killed)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(p, report=False)
    assert read_manifest(run_dir)["stages"]["sft"]["status"] == "trained"
    assert [s.action for s in plan_steps(p)] == ["finish"]  # no second training, only the merge
