"""medgpt's GPU path in one prepared run: training throughput, model FLOPs utilisation, peak memory against the
planner, QLoRA, full-parameter precision, and generation, each case in a fresh subprocess.

Models are built from their configs with random weights (throughput and memory do not depend on the weights'
values; the loss falling on the shipped medical conversations shows that training works), so nothing is
downloaded. Shapes come from the planner's built-in table (Qwen2.5 0.5B / 1.5B / 7B); `--tiny` swaps in a
2-layer model so the script runs on a CPU in a minute (the test suite does that).

Per case: non-padding tokens/s (after one warm-up step), MFU (6 x parameters x tokens/s for full training,
4 x for LoRA, whose frozen weights get no weight gradient, over the peak of a bf16 matmul measured here and,
on known GPUs, the datasheet's dense bf16 peak), `torch.cuda.max_memory_allocated` (peak RSS on CPU), the first
and last loss, and `medgpt plan`'s estimate of the same shape with its error. Cases:

- sft-lora-{1.5b,7b}: medgpt SFT, LoRA, bf16 autocast, padding-free packing (SDPA/FlashAttention varlen);
- baseline-lora-1.5b: the plain loop (transformers.Trainer + PEFT + DataCollatorForSeq2Seq, bf16, gradient
  checkpointing off) on the same records, LoRA, length and batch;
- sft-full-{1.5b,7b}: full parameters, fp32 master weights + bf16 autocast;
- sft-qlora-7b: 4-bit NF4 (bitsandbytes), batch 1 x 1024;
- dpo-lora-0.5b, grpo-lora-0.5b: a few steps of each;
- generate-0.5b: the transformers engine, 32 prompts x 64 new tokens batched against 4 one at a time.

    python bench/gpu_check.py [--tiny] [--cases sft-lora-1.5b,generate-0.5b] [--steps 6] [--out FILE]

On a GPU machine without network: `bash bench/gpu_wheels.sh` here fetches the wheels medgpt needs beyond torch
and transformers into bench/.wheels (git-ignored); there, `pip install --no-index --target /tmp/py
bench/.wheels/*.whl` and `PYTHONPATH=/tmp/py:src python3 bench/gpu_check.py`.
Results: bench/results/gpu.json (--tiny: bench/results/gpu_tiny.json). Numbers, not pass/fail.
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
RESULTS = ROOT / "bench" / "results"
SFT_DATA = ROOT / "src/medgpt/sample_data/sft/medical_sft.jsonl"
PREF_DATA = ROOT / "src/medgpt/sample_data/pref/medical_pref.jsonl"
MCQ_DATA = ROOT / "src/medgpt/sample_data/mcq/val"
SHAPES = {"0.5b": "Qwen/Qwen2.5-0.5B", "1.5b": "Qwen/Qwen2.5-1.5B", "7b": "Qwen/Qwen2.5-7B"}
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}
# name -> (kind, shape, method, batch, seq_len, extra config)
CASES: dict[str, tuple[str, str, str, int, int, dict]] = {
    "sft-lora-1.5b": ("sft", "1.5b", "lora", 4, 1024, {"packing": True}),
    "baseline-lora-1.5b": ("baseline", "1.5b", "lora", 4, 1024, {}),
    "sft-full-1.5b": ("sft", "1.5b", "full", 4, 1024, {"packing": True}),
    "sft-lora-7b": ("sft", "7b", "lora", 4, 1024, {"packing": True}),
    "sft-full-7b": ("sft", "7b", "full", 1, 1024, {"packing": True, "activation_checkpointing": True}),
    "sft-qlora-7b": ("sft", "7b", "qlora", 1, 1024, {"packing": True}),
    "dpo-lora-0.5b": ("dpo", "0.5b", "lora", 2, 512, {}),
    "grpo-lora-0.5b": ("grpo", "0.5b", "lora", 4, 256, {"num_generations": 4, "max_completion_length": 32}),
    "generate-0.5b": ("generate", "0.5b", "lora", 32, 64, {}),
}


# ---- models --------------------------------------------------------------------------------------


def build_model(shape: str, folder: Path, tiny: bool) -> Path:
    """A random-weight model of `shape` (bf16 on GPU) with the bundled tokenizer, saved as safetensors once."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medgpt.models import load_tokenizer
    from medgpt.plan import load_model_config

    tokenizer = load_tokenizer()
    if tiny:
        config = AutoConfig.for_model("qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    else:
        config, _ = load_model_config(SHAPES[shape])
    # the bundled tokenizer's vocabulary, so the shipped data trains on real token ids
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                     tokenizer.pad_token_id)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


# ---- measuring ------------------------------------------------------------------------------------


class Meter:
    """Times every optimizer step and counts every batch's non-padding tokens, through the trainer itself."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []

    def attach(self, trainer) -> None:
        import torch
        from transformers import TrainerCallback

        meter = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *args, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

            def on_step_end(self, *args, **kwargs):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                meter.times.append(time.perf_counter() - self.start)

        trainer.add_callback(StepTimer())
        inner = trainer.training_step

        def counted(model, inputs, *rest, **kwargs):
            if isinstance(inputs, (list, tuple)):  # GRPO: raw prompt rows, generated inside; counted from its log
                pass
            elif "input_ids" in inputs:
                mask = inputs.get("attention_mask")
                meter.tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            else:  # preference batches: chosen and rejected
                meter.tokens.append(sum(int(v.sum()) for k, v in inputs.items() if k.endswith("attention_mask")))
            return inner(model, inputs, *rest, **kwargs)

        trainer.training_step = counted

    def tokens_per_second(self, log: list[dict] | None = None) -> float | None:
        """After the warm-up step; gradient accumulation 1, so one batch per optimizer step. Without counted
        batches (GRPO), from the trainer's cumulative `num_tokens` (prompt + completion tokens) in its log."""
        seconds = sum(self.times[1:])
        if not seconds:
            return None
        if self.tokens:
            return round(sum(self.tokens[1:len(self.times)]) / seconds, 1)
        seen = [r["num_tokens"] for r in log or [] if "num_tokens" in r]
        return round((seen[-1] - seen[0]) / seconds, 1) if len(seen) > 1 else None


def _status_gib(field: str) -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 2**20


def peak_memory(rss_before: float) -> tuple[float, str]:
    """The case's peak: CUDA's max_memory_allocated, or on CPU the peak RSS above the RSS before it started."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    return _status_gib("VmHWM") - rss_before, "peak RSS (VmHWM) above the RSS before the case"


def stage_config(case: dict, folder: Path, out: Path) -> dict:
    kind = case["kind"]
    data = {"sft": SFT_DATA, "dpo": PREF_DATA, "grpo": MCQ_DATA}[kind]
    raw = {"stage": kind, "model": str(folder), "template": "chatml", "method": case["method"], "data": str(data),
           "max_length": case["seq_len"], "overlong": "truncate", "per_device_train_batch_size": case["batch"],
           "max_steps": case["steps"] + 1, "learning_rate": 2e-4 if case["method"] != "full" else 2e-5,
           "lora_rank": 16, "output_dir": str(out), "save_strategy": "no", "report_to": "none", "logging_steps": 1,
           "seed": 0, "report_prompts": "none", "dataloader_num_workers": 0, **case["extra"]}
    if kind == "grpo":
        raw.pop("max_length")
        raw.update(per_device_train_batch_size=case["batch"], generation_batch_size=case["batch"])
    if kind == "dpo":
        raw["overlong"] = "drop"
    return raw


def run_stage(case: dict, folder: Path, out: Path) -> dict:
    import torch

    from medgpt.data.rows import read_log
    from medgpt.train import build_config, common, run_training

    meter = Meter()
    train_and_save = common.train_and_save

    def measured(trainer, *args, **kwargs):
        meter.attach(trainer)
        return train_and_save(trainer, *args, **kwargs)

    common.train_and_save = measured
    cfg = build_config(stage_config(case, folder, out))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    run_training(cfg)
    log = read_log(out / common.METRICS_FILE)
    losses = [r["loss"] for r in log if "loss" in r]
    trainable = dtype_of_trainable(out)
    return {"tokens_per_second": meter.tokens_per_second(log), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "steps": len(meter.times), "trainable_dtype": trainable,
            "bf16_autocast": bool(cfg.train.bf16), "gradient_checkpointing": bool(cfg.train.activation_checkpointing)}


def dtype_of_trainable(out: Path) -> str | None:
    """The dtype the trained weights were saved in (adapter or full model): fp32 master weights save as fp32."""
    from safetensors import safe_open

    files = sorted(out.glob("*.safetensors"))
    if not files:
        return None
    with safe_open(str(files[0]), "pt") as f:
        key = next(iter(f.keys()))
        return str(f.get_tensor(key).dtype).removeprefix("torch.")


def run_baseline(case: dict, folder: Path, out: Path) -> dict:
    """The loop most user scripts run: transformers.Trainer + PEFT LoRA + DataCollatorForSeq2Seq."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medgpt.data.encode import encode_conversations
    from medgpt.data.readers import read_records
    from medgpt.data.templates import get_template
    from medgpt.models import load_tokenizer
    from medgpt.train import build_config

    cfg = build_config({**stage_config({**case, "kind": "sft"}, folder, out), "packing": False})
    tokenizer = load_tokenizer(str(folder))
    records, stats = read_records(str(SFT_DATA), "sft")
    rows = encode_conversations(records, tokenizer, get_template("chatml", tokenizer), cfg, stats)
    gpu = torch.cuda.is_available()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if gpu else torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=case["batch"],
                             max_steps=case["steps"] + 1, learning_rate=2e-4, logging_steps=1, report_to="none",
                             save_strategy="no", bf16=gpu, use_cpu=not gpu, seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    meter = Meter()
    meter.attach(trainer)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {"tokens_per_second": meter.tokens_per_second(), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "steps": len(meter.times), "bf16_autocast": gpu}


def run_generate(case: dict, folder: Path) -> dict:
    import torch

    from medgpt.data.records import read_prompts
    from medgpt.infer.base import GenerationParams, Request
    from medgpt.infer.engine import load_engine

    engine = load_engine(str(folder), template="chatml", max_batch_size=case["batch"])
    records, _ = read_prompts(str(SFT_DATA), "prompts")
    prompts = [engine.encode(r["prompt"]) for r in records[:case["batch"]]]
    # random weights rarely emit the end token: every row runs to max_new_tokens, a fixed amount of work
    params = GenerationParams(max_new_tokens=case["seq_len"])
    engine.run([Request(prompts[0], GenerationParams(max_new_tokens=4))])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    def timed(batch: list[list[int]]) -> float:
        start = time.perf_counter()
        done = engine.run([Request(p, params) for p in batch])
        return sum(c.completion_tokens for c in done) / (time.perf_counter() - start)

    batched = timed(prompts)
    single = sum(timed([p]) for p in prompts[:4]) / 4
    return {"tokens_per_second": round(batched, 1), "one_at_a_time_tokens_per_second": round(single, 1),
            "batched_over_one_at_a_time": round(batched / single, 2)}


def plan_estimate(case: dict, folder: Path, gpu: bool, checkpointing: bool) -> dict:
    from medgpt.plan import GIB, PlanArgs, estimate, load_architecture

    if case["kind"] in ("generate",):
        return {}
    method = {"qlora": "qlora4"}.get(case["method"], case["method"])
    stage = "sft" if case["kind"] == "baseline" else case["kind"]
    args = PlanArgs(model=str(folder), stage=stage, method=method, device="gpu" if gpu else "cpu",
                    batch_size=case["batch"], seq_len=case["seq_len"], lora_rank=16,
                    gradient_checkpointing=checkpointing)
    result, trainable = estimate(args.validate(), load_architecture(str(folder)))
    return {"plan_gib": round(result.peak / GIB, 3), "plan_parts_gib": result.gib(), "trainable_params": trainable}


def worker(case: dict) -> dict:
    """One case, in this (fresh) process."""
    import torch

    folder = build_model(case["shape"], Path(case["models"]) / case["shape"], case["tiny"])
    out = Path(case["workdir"]) / case["name"]
    gpu = torch.cuda.is_available()
    if case["method"] == "qlora" and not gpu:
        return {"skipped": "QLoRA needs bitsandbytes on a CUDA GPU"}
    rss_before = 0.0
    if not gpu:
        import trl  # noqa: F401  (imported before the baseline RSS is taken)

        Path("/proc/self/clear_refs").write_text("5")  # restart the peak RSS from here (Linux)
        rss_before = _status_gib("VmRSS")
    if case["kind"] == "generate":
        result = run_generate(case, folder)
    elif case["kind"] == "baseline":
        result = run_baseline(case, folder, out)
    else:
        result = run_stage(case, folder, out)
    peak, how = peak_memory(rss_before)
    checkpointing = result.get("gradient_checkpointing", False)  # as the trainer ran (TRL's default is on)
    result.update(peak_gib=round(peak, 3), peak_measure=how, **plan_estimate(case, folder, gpu, checkpointing))
    if result.get("plan_gib"):
        result["plan_error_pct"] = round(100 * (result["plan_gib"] - peak) / peak, 1)
    if gpu:
        result["reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 3)
    result["params"] = parameter_count(folder)
    return result


def parameter_count(folder: Path) -> int:
    from medgpt.plan import load_architecture

    arch = load_architecture(str(folder))
    return arch.layers * arch.layer_params + arch.vocab * arch.hidden + arch.output_params


def matmul_peak() -> dict:
    """bf16 (and fp32) matmul FLOP/s measured on this device: the ceiling MFU is taken against."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        size = 8192 if device == "cuda" else 1024 if dtype == torch.float32 else 512  # bf16 on AVX2 CPUs: ~1 GFLOP/s
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        runs = 20 if device == "cuda" else 2
        (a @ b).sum().item()
        start = time.perf_counter()
        for _ in range(runs):
            c = a @ b
        c.sum().item()
        out[name] = 2 * size**3 * runs / (time.perf_counter() - start)
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
        out["datasheet_bf16"] = next((v for k, v in DATASHEET_BF16.items() if k in gpu), None)
        out["device"] = gpu
    else:
        out["device"] = platform.processor() or platform.machine()
    return out


def mfu(row: dict, peak: dict, gpu: bool) -> None:
    """Model FLOPs utilisation: 6 (full) or 4 (LoRA: no weight gradients) FLOPs per parameter and token, over the
    measured matmul peak of the precision the case computes in (bf16 autocast, else fp32)."""
    if row.get("tokens_per_second") and row.get("params") and row.get("kind") not in ("generate",):
        per_token = (6 if row["method"] == "full" else 4) * row["params"]
        precision = "bf16" if row.get("bf16_autocast", gpu) else "fp32"
        row["mfu"] = round(per_token * row["tokens_per_second"] / peak[precision], 4)
        row["mfu_against"] = f"measured {precision} matmul peak"
        if gpu and peak.get("datasheet_bf16"):
            row["mfu_vs_datasheet_bf16"] = round(per_token * row["tokens_per_second"] / peak["datasheet_bf16"], 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2-layer shapes that run on a CPU in about a minute")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per training case (after one warm-up)")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/gpu.json or gpu_tiny.json)")
    parser.add_argument("--workdir", type=Path, help="where models and outputs go (default: /dev/shm or a temp dir)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    if unknown := [n for n in names if n not in CASES]:
        parser.error(f"unknown case(s) {', '.join(unknown)}; expected {', '.join(CASES)}")
    import torch

    peak = matmul_peak()
    base = args.workdir or Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir())
    workdir = Path(tempfile.mkdtemp(prefix="medgpt-gpu-check-", dir=base))
    rows = []
    for name in names:
        kind, shape, method, batch, seq_len, extra = CASES[name]
        if args.tiny:
            batch = batch if kind == "grpo" else min(batch, 2)  # GRPO: a whole group of generations per batch
            seq_len = min(seq_len, 128 if kind != "generate" else 8)
            extra = {**extra, "max_completion_length": 8} if kind == "grpo" else extra
        case = {"name": name, "kind": kind, "shape": shape, "method": method, "batch": batch, "seq_len": seq_len,
                "extra": extra, "steps": 1 if args.tiny else args.steps, "tiny": args.tiny,
                "models": str(workdir / "models"), "workdir": str(workdir)}
        started = time.time()
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(case)], text=True,
                              capture_output=True, cwd=ROOT)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        row = {"name": name, "kind": kind, "shape": SHAPES[shape] if not args.tiny else f"tiny ({shape} slot)",
               "method": method, "batch": batch, "seq_len": seq_len, "seconds": round(time.time() - started, 1)}
        if done.returncode or line is None:
            tail = (done.stderr or done.stdout).strip().splitlines()[-12:]
            row["error"] = "\n".join(tail)
            print(f"{name}: failed\n{row['error']}", file=sys.stderr, flush=True)
        else:
            row.update(json.loads(line[7:]))
            mfu(row, peak, torch.cuda.is_available())
        rows.append(row)
        print(table_row(row), flush=True)
    baseline = next((r for r in rows if r["name"] == "baseline-lora-1.5b" and r.get("tokens_per_second")), None)
    ours = next((r for r in rows if r["name"] == "sft-lora-1.5b" and r.get("tokens_per_second")), None)
    report = {"benchmark": "medgpt GPU check", "tiny": args.tiny, "matmul_peak_flops": peak,
              "machine": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                          "cpus": os.cpu_count()},
              "sft_lora_over_baseline": round(ours["tokens_per_second"] / baseline["tokens_per_second"], 2)
              if ours and baseline else None,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": rows}
    out = args.out or RESULTS / ("gpu_tiny.json" if args.tiny else "gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(f"results: {out}")
    return 0


def table_row(row: dict) -> str:
    def num(key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(row[key]) if isinstance(row.get(key), (int, float)) else "-"

    return (f"{row['name']:<20} tok/s {num('tokens_per_second'):>9}  MFU {num('mfu', '{:.1%}'):>6}  "
            f"peak {num('peak_gib', '{:.2f}')} GiB  plan {num('plan_gib', '{:.2f}')} GiB  "
            f"loss {num('first_loss', '{:.3f}')} -> {num('last_loss', '{:.3f}')}  {row.get('skipped', '')}")


if __name__ == "__main__":
    sys.exit(main())
