"""bench/gpu_check.py runs end to end on a CPU with --tiny shapes, so the prepared GPU check cannot rot unseen:
every case it can run here finishes with throughput, a peak, the planner's estimate and losses, and the one it
cannot (QLoRA without CUDA) says why."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_with_tiny_shapes(tmp_path):
    out = tmp_path / "gpu_tiny.json"
    cases = "sft-lora-1.5b,generate-0.5b,sft-qlora-7b"  # the baseline and preference cases: on a GPU run
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--cases", cases,
                           "--out", str(out), "--workdir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {r["name"]: r for r in report["cases"]}
    assert set(rows) == set(cases.split(","))
    assert not [r["error"] for r in rows.values() if "error" in r]
    assert rows["sft-qlora-7b"]["skipped"].startswith("QLoRA needs bitsandbytes")
    row = rows["sft-lora-1.5b"]
    assert (row["tokens_per_second"] or 0) > 0 and row["peak_gib"] > 0, row
    assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"]), row
    assert 0 < row["mfu"] < 1, row  # against the measured matmul peak of the precision used
    assert row["plan_gib"] > 0 and "plan_error_pct" in row, row
    assert rows["sft-lora-1.5b"]["trainable_dtype"] == "float32"  # the adapter is trained (and saved) in fp32
    generate = rows["generate-0.5b"]
    assert generate["tokens_per_second"] > 0 and generate["one_at_a_time_tokens_per_second"] > 0
    assert report["sft_lora_over_baseline"] is None  # the ratio needs the baseline case, run on a GPU
    assert report["matmul_peak_flops"]["fp32"] > 0
