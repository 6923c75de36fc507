"""SFT with 2 processes on CPU (gloo) through `accelerate launch` and the shipped configs: DDP, DeepSpeed ZeRO-3
(where deepspeed is installed), and FSDP, which accelerate does not apply on CPUs."""

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


STEPS, BATCH = 3, 2


def accelerate_sft(config_file: str, tiny_model: str, data: Path, folder: Path, *flags: str):
    """`accelerate launch --config_file examples/accelerate/<config_file> --num_processes 2 [flags] -m medgpt.cli
    train` of a 3-step LoRA SFT on the tiny model; returns (the finished process, its output_dir)."""
    out = folder / "sft"
    config = folder / "sft.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "sft", "model": tiny_model, "data": str(data), "max_length": 128,
        "per_device_train_batch_size": BATCH, "max_steps": STEPS, "logging_steps": 1, "save_strategy": "no",
        "report_to": "none", "report_prompts": "none", "output_dir": str(out),
        "data_cache_dir": str(folder / "prepared"),
    }))
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(ROOT / "examples" / "accelerate" / config_file),
         "--num_processes", "2", "--main_process_port", str(free_port()), *flags, "-m", "medgpt.cli", "train",
         str(config)],
        capture_output=True, text=True, timeout=600, env=env, cwd=folder, check=False,
    )
    return proc, out


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


@pytest.fixture(scope="module")
def ddp_run(tiny_model, sample_data, tmp_path_factory):
    return accelerate_sft("ddp.yaml", tiny_model, sample_data / "sft" / "medical_sft.jsonl",
                          tmp_path_factory.mktemp("ddp"))


@pytest.mark.slow
def test_sft_on_two_processes_trains_both_and_saves_once(ddp_run):
    proc, out = ddp_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    # both ranks consumed data: an epoch took half the steps it takes one process
    kept = json.loads((out / "data_stats.json").read_text())["train"]["kept"]
    metrics = json.loads((out / "final_metrics.json").read_text())
    assert metrics["epoch"] == pytest.approx(STEPS / math.ceil(kept / (2 * BATCH)), rel=1e-3)
    # one adapter, written once; logs and metadata from rank 0 only
    assert [p.name for p in out.rglob("adapter_model.safetensors")] == ["adapter_model.safetensors"]
    assert json.loads((out / "medgpt.json").read_text())["complete"] is True
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(row["step"] for row in logged if "loss" in row) == list(range(1, STEPS + 1))
    assert (out / "report.md").exists()
    # the data was prepared once (by the main process; the other rank waited and mapped the same files)
    assert [p.name[:4] for p in (out.parent / "prepared").iterdir()] == ["sft-"]
    assert proc.stderr.count("preparing sft data") == 1, proc.stderr[-3000:]


@pytest.mark.slow
def test_deepspeed_zero3_lora_on_cpus_trains_as_ddp_and_saves_a_plain_adapter(ddp_run, tiny_model, sample_data,
                                                                               tmp_path):
    """The shipped ZeRO-3 config on 2 CPU processes (DeepSpeed's CPU accelerator; --mixed_precision no: fp32 as
    medgpt trains on CPUs). The reference: the DDP run of the same config, which ZeRO-3 must match in fp32."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    from medgpt.infer.engine import load_engine
    from medgpt.models import merge_adapter

    proc, out = accelerate_sft("deepspeed_zero3.yaml", tiny_model, sample_data / "sft" / "medical_sft.jsonl",
                               tmp_path, "--mixed_precision", "no")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_proc, ddp_out = ddp_run
    assert ddp_proc.returncode == 0
    assert losses(out) == pytest.approx(losses(ddp_out), rel=1e-6)
    adapter, reference = load_file(out / "adapter_model.safetensors"), load_file(ddp_out / "adapter_model.safetensors")
    assert adapter.keys() == reference.keys()
    assert all(adapter[k].allclose(reference[k], atol=1e-6) for k in adapter)
    merged = merge_adapter(str(out), str(tmp_path / "merged"))  # what merge, serve and eval load
    with load_engine(str(merged), dtype="fp32") as engine:
        assert engine.name


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
