"""Planner vs measurement: peak memory of real training runs on this CPU against `medgpt plan --device cpu`.

Each case trains a few steps through medgpt's own stages (SFT and DPO, full and LoRA, the tiny random model
and the bundled SmolLM2-135M) in a fresh subprocess. The measurement is the peak resident set size
through the end of the training loop (VmHWM, reset just before the stage starts) minus the resident size
at that moment, after every import and with the data already written; `process_peak_mib` adds what the
stage's final save takes afterwards. glibc is told to serve large allocations from mmap and to return freed
memory at once (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), so resident memory follows what is live
instead of what the allocator keeps cached. Every sequence is exactly `seq_len` tokens (long records,
truncated), so the planner is asked about exactly the shapes that ran.

    python bench/memory.py                   # all cases -> bench/results/memory.json
    python bench/memory.py --only tiny       # cases whose name contains "tiny"
    python bench/memory.py --reestimate      # keep the measurements, recompute the planner's side
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory.json"
MIB = 2**20

CASES = [
    # name, model, stage, method, micro-batch, seq_len, gradient checkpointing
    ("tiny-sft-full", "tiny", "sft", "full", 4, 512, False),
    ("tiny-sft-lora", "tiny", "sft", "lora", 4, 512, False),
    ("tiny-dpo-full", "tiny", "dpo", "full", 2, 512, False),
    ("tiny-dpo-lora", "tiny", "dpo", "lora", 2, 512, False),
    ("smollm2-sft-full", "bundled", "sft", "full", 2, 256, False),
    ("smollm2-sft-lora", "bundled", "sft", "lora", 2, 256, False),
    ("smollm2-sft-lora-gc", "bundled", "sft", "lora", 2, 256, True),
    ("smollm2-dpo-full", "bundled", "dpo", "full", 1, 256, False),
    ("smollm2-dpo-lora", "bundled", "dpo", "lora", 1, 256, False),
]
LORA_DROPOUT = 0.05  # the recorded cases ran with it (it adds a mask per adapted layer: the harder count)
STEPS = 2  # the optimizer states exist from the end of step 1, so step 2 reaches the steady-state peak


def write_data(folder: Path, stage: str) -> Path:
    """Records several times longer than any seq_len used here; training truncates them to seq_len."""
    corpus = (ROOT / "src/medgpt/sample_data/pt/medical_corpus.txt").read_text(encoding="utf-8").splitlines()
    text = " ".join(corpus)
    rows = []
    for i in range(16):
        start = (i * 7) % len(corpus)
        answer = " ".join(corpus[start:] + corpus[:start])
        if stage == "sft":
            rows.append({"conversations": [{"from": "human", "value": f"Summarize note {i}."},
                                           {"from": "gpt", "value": answer}]})
        else:
            rows.append({"question": f"Summarize note {i}.", "response_chosen": answer,
                         "response_rejected": text[::-1]})
    path = folder / f"{stage}.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def peak_rss() -> int:
    """The process's peak resident set size since the last reset (VmHWM), in bytes."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def worker(case: dict) -> dict:
    """Run one case in this process and return the measured peak (called in a fresh subprocess).

    The peak is taken at the end of the training loop (before the stage saves the model and its files):
    the planner is about training, and on a GPU the final save happens in host memory.
    """
    import psutil
    import torch  # noqa: F401  (imported before the baseline)
    import trl  # noqa: F401
    from transformers import TrainerCallback

    from medgpt.train import build_config, common, run_training, stage_module

    stage_module(case["stage"])  # import the stage (and its TRL trainer) before the baseline
    seen: dict[str, int] = {}

    class TrainingPeak(TrainerCallback):
        def on_train_end(self, *args, **kwargs):
            seen["peak"] = peak_rss()

    train_and_save = common.train_and_save

    def measured(trainer, *args, **kwargs):
        trainer.add_callback(TrainingPeak())
        return train_and_save(trainer, *args, **kwargs)

    common.train_and_save = measured
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), case["stage"])
        cfg = build_config({
            "stage": case["stage"], "model": case["model_path"], "method": case["method"], "data": str(data),
            "max_steps": STEPS, "per_device_train_batch_size": case["batch_size"], "max_length": case["seq_len"],
            "overlong": "truncate", "gradient_checkpointing": case["gradient_checkpointing"],
            "lora_dropout": case["lora_dropout"],
            "output_dir": str(Path(tmp) / "out"), "save_strategy": "no", "report_to": "none", "logging_steps": 1,
            "dataloader_num_workers": 0, "seed": 0,
        })
        baseline = psutil.Process().memory_info().rss
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current size
        start = time.time()
        metrics = run_training(cfg)
        seconds = time.time() - start
    return {"baseline_rss_mib": baseline / MIB, "peak_rss_mib": seen["peak"] / MIB,
            "measured_mib": (seen["peak"] - baseline) / MIB, "process_peak_mib": (peak_rss() - baseline) / MIB,
            "train_seconds": round(seconds, 1), "train_loss": metrics.get("train_loss")}


def estimate(case: dict) -> dict:
    from medgpt.plan import GIB, PlanArgs, plan

    result = plan(PlanArgs(model=case["model_path"], stage=case["stage"], method=case["method"], device="cpu",
                           batch_size=case["batch_size"], seq_len=case["seq_len"],
                           gradient_checkpointing=case["gradient_checkpointing"],
                           lora_dropout=case["lora_dropout"]), gpu_memory=[])
    parts = {k: v * GIB / MIB for k, v in result.estimate.gib().items()}
    return {"estimate_mib": parts.pop("peak"), "estimate_parts_mib": {k: round(v, 1) for k, v in parts.items() if v},
            "activation_parts_mib": {k: round(v / MIB, 1) for k, v in result.estimate.detail.items()}}


def model_paths() -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_model

    from medgpt.models import resolve_model

    tiny = Path(tempfile.gettempdir()) / "medgpt-bench-tiny-llama"
    if not (tiny / "config.json").exists():
        build_tiny_model(tiny)
    return {"tiny": str(tiny), "bundled": resolve_model()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--reestimate", action="store_true", help="recompute the estimates of the saved results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    paths = model_paths()
    if args.reestimate:
        previous = json.loads(RESULTS.read_text())["cases"]
        write_report([compare({**row, "model_path": paths[row["model"]]}, row) for row in previous])
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    for name, model, stage, method, batch, seq_len, gc in CASES:
        if args.only and args.only not in name:
            continue
        case = {"name": name, "model": model, "model_path": paths[model], "stage": stage, "method": method,
                "batch_size": batch, "seq_len": seq_len, "gradient_checkpointing": gc, "lora_dropout": LORA_DROPOUT}
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], env=env, text=True,
                              capture_output=True, cwd=ROOT)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if done.returncode or line is None:
            print(f"{name}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(compare(case, json.loads(line[7:])))
    write_report(rows)


def compare(case: dict, measured: dict) -> dict:
    """One result row: the case, its measurement, the planner's estimate and the relative error."""
    row = {**{k: v for k, v in case.items() if k != "model_path"}, **measured, **estimate(case)}
    row["error_pct"] = round(100 * (row["estimate_mib"] - row["measured_mib"]) / row["measured_mib"], 1)
    print(f"{row['name']:<22} measured {row['measured_mib']:8.1f} MiB   estimate {row['estimate_mib']:8.1f} MiB   "
          f"error {row['error_pct']:+6.1f}%", flush=True)
    return row


def write_report(rows: list[dict]) -> None:
    errors = [abs(r["error_pct"]) for r in rows]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "steps": STEPS, "mean_abs_error_pct": round(sum(errors) / len(errors), 1) if errors else None,
              "max_abs_error_pct": max(errors, default=None), "cases": rows}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(RESULTS)
    print(f"mean |error| {report['mean_abs_error_pct']}%, max {report['max_abs_error_pct']}% -> {RESULTS}")


if __name__ == "__main__":
    main()
