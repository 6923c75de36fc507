"""SFT training throughput: padded batches vs length grouping vs packing (padding-free), fp32 vs bf16.

Runs medgpt's SFT stage (LoRA) on the bundled SmolLM2-135M-Instruct and the shipped conversations for a
few steps per variant, counting the tokens of every batch the trainer actually trains on:

- non-padding tokens per second (the tokens that teach something), after one warm-up step;
- padding share: the part of the computed tokens that is padding (compute wasted).

Variants: `padded` (random batches padded to their longest sample), `grouped` (train_sampling_strategy
group_by_length: batches of similar lengths), `packed` (TRL best-fit-decreasing packing, padding-free),
each in bf16 (autocast) and fp32. Results: bench/results/train_throughput.json. Numbers, not pass/fail.

    python bench/train_throughput.py [--steps 3] [--batch-size 4] [--max-length 384] [--variants packed-bf16,padded-bf16]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads stealing shared cores

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "train_throughput.json"
SAMPLING = {"padded": {"packing": False}, "grouped": {"packing": False, "train_sampling_strategy": "group_by_length"},
            "packed": {"packing": True}}
VARIANTS = [f"{s}-{p}" for p in ("bf16", "fp32") for s in SAMPLING]


def measure(variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    """Train `args.steps + 1` steps of one variant; count every batch's tokens and time every step."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from medgpt.config import build_config
    from medgpt.models import load_tokenizer
    from medgpt.train import common, sft

    sampling, precision = variant.split("-")
    cfg = build_config({
        "stage": "sft", "model": args.model, "template": "chatml", "method": "lora", "lora_rank": 16,
        "data": str(ROOT / "src/medgpt/sample_data/sft/medical_sft.jsonl"), "max_length": args.max_length,
        "overlong": "truncate", "per_device_train_batch_size": args.batch_size, "max_steps": args.steps + 1,
        "learning_rate": 2e-4, "output_dir": str(workdir / variant), "save_strategy": "no", "report_to": "none",
        "logging_steps": 1, "seed": 0, "bf16": precision == "bf16", "report_prompts": "none", **SAMPLING[sampling],
    })
    tokenizer = load_tokenizer(cfg.model.model)
    train_ds, _, _ = sft.build_datasets(cfg, tokenizer)
    batches: list[tuple[int, int]] = []  # (computed tokens, non-padding tokens) per step
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)

    trainer = SFTTrainer(model=common.load_policy(cfg), args=cfg.train, train_dataset=train_ds,
                         processing_class=tokenizer, peft_config=common.peft_config(cfg), callbacks=[StepTimer()])
    inner = trainer.training_step

    def counted(model, inputs, *rest, **kwargs):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        batches.append((ids.numel(), int(mask.sum()) if mask is not None else ids.numel()))
        return inner(model, inputs, *rest, **kwargs)

    trainer.training_step = counted
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    del trainer
    gc.collect()
    computed = sum(c for c, _ in batches[1:])
    real = sum(r for _, r in batches[1:])
    seconds = sum(times[1:])
    return {
        "variant": variant, "sampling": sampling, "precision": precision, "measured_steps": len(times) - 1,
        "seconds_per_step": round(seconds / max(1, len(times) - 1), 3),
        "tokens_per_step": round(computed / max(1, len(batches) - 1), 1),
        "non_padding_tokens_per_second": round(real / seconds, 1) if seconds else None,
        "padding_share": round(1 - real / computed, 4) if computed else None,
        "losses": [round(x, 4) for x in losses], "torch_threads": torch.get_num_threads(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per variant (after one warm-up step)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; expected {', '.join(VARIANTS)}")

    import torch

    from medgpt.models import cpu_supports_bf16, cuda_available

    results = []
    with tempfile.TemporaryDirectory(prefix="medgpt-bench-") as workdir:
        for variant in variants:
            result = measure(variant, args, Path(workdir))
            results.append(result)
            print(f"{variant:<13} {result['non_padding_tokens_per_second']:>8} non-padding tokens/s  "
                  f"padding {100 * result['padding_share']:5.1f}%  {result['seconds_per_step']:.2f} s/step "
                  f"({result['tokens_per_step']:.0f} tokens)", flush=True)
    report = {
        "benchmark": "sft training throughput (LoRA)", "model": args.model, "steps": args.steps,
        "batch_size": args.batch_size, "max_length": args.max_length,
        "machine": {"cpus": os.cpu_count(), "cuda": cuda_available(), "cpu_bf16": cpu_supports_bf16(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
