"""Data-parallel SFT with 2 processes on CPU (gloo) through `accelerate launch` and the shipped DDP config."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sft_on_two_processes_trains_both_and_saves_once(tiny_model, sample_data, tmp_path):
    out = tmp_path / "sft"
    steps, batch = 3, 2
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "sft", "model": tiny_model, "data": str(sample_data / "sft" / "medical_sft.jsonl"),
        "max_length": 128, "per_device_train_batch_size": batch, "max_steps": steps, "logging_steps": 1,
        "save_strategy": "no", "report_to": "none", "report_prompts": "none", "output_dir": str(out),
    }))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / "ddp.yaml"),
         "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "medgpt.cli", "train", str(config)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks consumed data: an epoch took half the steps it takes one process
    kept = json.loads((out / "data_stats.json").read_text())["train"]["kept"]
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["epoch"] == pytest.approx(steps / math.ceil(kept / (2 * batch)), rel=1e-3)
    # one adapter, written once; logs and metadata from rank 0 only
    assert [p.name for p in out.rglob("adapter_model.safetensors")] == ["adapter_model.safetensors"]
    assert json.loads((out / "medgpt.json").read_text())["complete"] is True
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["step"] for row in logged if "loss" in row) == list(range(1, steps + 1))
    assert (out / "report.md").exists()


def test_an_fsdp_launch_that_would_not_shard_is_an_error(tiny_model, sample_data, tmp_path):
    """accelerate's launcher sets ACCELERATE_USE_FSDP=true for an FSDP config, and applies FSDP on GPUs only: on a
    CPU the run would train unsharded, so it stops before writing anything."""
    out = tmp_path / "sft"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "medgpt.cli", "train", "--model", tiny_model, "--data",
         str(sample_data / "sft" / "medical_sft.jsonl"), "--max_steps", "1", "--use_cpu", "true",
         "--output_dir", str(out), "--report_to", "none"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path, check=False,
    )
    assert proc.returncode == 2
    assert "medgpt train: error: launched with an FSDP config, but accelerate does not apply FSDP here" in proc.stderr
    assert not (out.exists() and any(out.rglob("*")))  # nothing written
