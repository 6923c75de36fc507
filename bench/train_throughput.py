"""Training throughput, paired against the loops users run: medgpt's SFT and DPO with their default config, and in
the same invocation the baselines below, alternating A B A B (each run in a fresh process, so each has its own
peak RSS), on the same records, LoRA (r=8, alpha 16, all-linear), max length, batch size and steps. LoRA
dropout: medgpt's default (0, PEFT's default) against the reference project's 0.05 in the SFT baseline;
`--baseline-lora-dropout 0` runs the control with the same dropout on both sides (DPO switches dropout off).

- SFT baseline: `transformers.Trainer` + PEFT LoRA + `DataCollatorForSeq2Seq`, fp32, gradient checkpointing
  off (the plain loop most scripts and the reference project run; `baseline_sft` below, ~40 lines).
- DPO baseline: TRL's `DPOTrainer` called directly with its defaults on the same pairs, except precision: fp32
  for both (TRL's default bf16 autocast is what medgpt's precision check refuses on a CPU without native bf16).

Each run trains one warm-up step and then the measured steps. Reported per run: non-padding tokens/s (tokens of
the measured steps' batches that are not padding, over the wall time from the end of the warm-up step to the end
of the last step), peak RSS, and the share of the machine's matmul peak (measured here, fp32 and bf16) that the
useful matmul FLOPs reach (LoRA: 4 x parameters per token, forward and the backward to the activations, no
weight gradients for the frozen base; DPO adds the reference forward, 2 x parameters per token); per pair the
ratio medgpt / baseline, and its median. Results: bench/results/train_throughput_cpu-bf16.json on a CPU whose
bf16 matmuls measure faster than fp32 (medgpt then trains under bf16 autocast, the baselines in fp32),
train_throughput_cpu-fp32.json on the others (both in fp32). Numbers, not pass/fail.

    python bench/train_throughput.py                       # every shape, 3 pairs
    python bench/train_throughput.py --shapes sft-2x256 --pairs 3
    python bench/train_throughput.py --medgpt-set dtype=fp32                        # control: no bf16 autocast
    python bench/train_throughput.py --shapes dpo-2x384 --medgpt-set activation_checkpointing=true
    python bench/train_throughput.py --profile sft-2x256   # torch.profiler table of one medgpt run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "train_throughput_cpu-{precision}.json"  # by medgpt's CPU precision
DATA = {"sft": ROOT / "src/medgpt/sample_data/sft/medical_sft.jsonl",
        "dpo": ROOT / "src/medgpt/sample_data/pref/medical_pref.jsonl"}
# name -> (stage, batch size, max length, measured steps)
SHAPES = {"sft-2x256": ("sft", 2, 256, 12), "sft-4x512": ("sft", 4, 512, 3), "dpo-2x384": ("dpo", 2, 384, 6)}
RECORDS = 64
LORA = {"lora_rank": 8, "lora_alpha": 16, "lora_target": "all-linear"}  # medgpt keeps its default lora_dropout (0)
REFERENCE_DROPOUT = 0.05  # the reference project's lora_dropout
BASELINE_DROPOUT = REFERENCE_DROPOUT  # the SFT baseline's; --baseline-lora-dropout 0 runs the equal control
MEDGPT_SET: dict[str, str] = {}  # --medgpt-set KEY=VALUE: medgpt options other than its defaults (a control)
SEED = 42


def medgpt_config(stage: str, batch: int, length: int, steps: int, out: str, model: str, **extra):
    """medgpt's default config for the stage, with only the shape, the data and the output folder set (and the
    options of --medgpt-set, which may not change what the benchmark holds equal)."""
    from medgpt.train import build_config

    fixed = {"stage": stage, "model": model, "data": str(DATA[stage]), "max_samples": RECORDS,
             "overlong": "truncate", "max_length": length, "per_device_train_batch_size": batch,
             "max_steps": steps, "output_dir": out, "report_to": "none", "seed": SEED, **LORA, **extra}
    if clash := sorted(MEDGPT_SET.keys() & fixed.keys()):
        raise SystemExit(f"--medgpt-set {', '.join(clash)}: the benchmark sets this for both systems")
    return build_config({**fixed, **MEDGPT_SET})


def peft_lora():
    from peft import LoraConfig

    return LoraConfig(r=LORA["lora_rank"], lora_alpha=LORA["lora_alpha"], lora_dropout=BASELINE_DROPOUT,
                      target_modules="all-linear", task_type="CAUSAL_LM")


def baseline_sft(cfg, rows, callbacks):
    """The plain loop: transformers Trainer + PEFT LoRA + DataCollatorForSeq2Seq, fp32, no checkpointing."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from medgpt.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(cfg.model.model)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.model), dtype=torch.float32)
    model = get_peft_model(model, peft_lora())
    args = TrainingArguments(
        output_dir=str(cfg.output_dir), per_device_train_batch_size=cfg.train.per_device_train_batch_size,
        max_steps=cfg.train.max_steps, learning_rate=2e-4, logging_steps=5, report_to="none",
        save_strategy="no", use_cpu=True, gradient_checkpointing=False, seed=SEED)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), data_collator=collator,
                   callbacks=callbacks)


def baseline_dpo(cfg, train_ds, tokenizer, callbacks):
    """TRL's DPOTrainer with its defaults (gradient checkpointing on, its fused LM head), fp32."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from medgpt.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model.model), dtype=torch.float32)
    args = DPOConfig(output_dir=str(cfg.output_dir), per_device_train_batch_size=cfg.train.per_device_train_batch_size,
                     max_steps=cfg.train.max_steps, max_length=cfg.train.max_length, report_to="none",
                     save_strategy="no", use_cpu=True, bf16=False, seed=SEED)
    return DPOTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                      peft_config=peft_lora(), callbacks=callbacks)


def build(system: str, stage: str, cfg, callbacks):
    """The trainer of one run: medgpt's (its stage's own set-up) or the baseline, on the same records."""
    from trl import DPOTrainer, SFTTrainer

    from medgpt.models import open_tokenizer
    from medgpt.train import common, prefs, sft

    if system == "medgpt":
        if stage == "sft":
            trainer, _ = common.build_trainer(cfg, SFTTrainer, sft.build_datasets)
        else:
            trainer, _ = common.build_trainer(cfg, DPOTrainer, prefs.conversation_datasets,
                                              ref_model=prefs.reference_model(cfg))
        trainer.add_callback(callbacks[0])
        return trainer
    if stage == "sft":
        train_ds, _, _ = sft.build_datasets(cfg, open_tokenizer(cfg.model))
        return baseline_sft(cfg, train_ds.to_list(), callbacks)
    tokenizer = open_tokenizer(cfg.model)
    train_ds, _, _ = prefs.conversation_datasets(cfg, tokenizer)
    return baseline_dpo(cfg, train_ds, tokenizer, callbacks)


def worker(system: str, shape: str, model: str, profile: Path | None = None, turns: bool = False) -> dict:
    """One run in this process: warm-up step + measured steps; returns its numbers. With `turns`, each step
    waits for a line on stdin and reports `STEP seconds tokens` on stdout, so the driver can alternate the
    steps of two runs (their processes are alive together; only one computes at a time)."""
    import torch
    from transformers import TrainerCallback

    stage, batch, length, steps = SHAPES[shape]
    times: list[float] = []
    tokens: list[int] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if turns:
                sys.stdin.readline()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.start)
            if turns:
                print(f"STEP {times[-1]:.4f} {tokens[-1]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="medgpt-bench-") as out:
        cfg = medgpt_config(stage, batch, length, steps + 1, out, model)
        trainer = build(system, stage, cfg, [StepClock()])
        inner = trainer.training_step

        def counted(model_, inputs, *rest, **kwargs):
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            return inner(model_, inputs, *rest, **kwargs)

        trainer.training_step = counted
        if turns:
            print("READY", flush=True)
        if profile:
            from torch.profiler import ProfilerActivity, profile as torch_profile

            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                trainer.train()
            profile.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
        else:
            trainer.train()
        args = trainer.args
        head = "trainer default"
        if system == "medgpt":
            from medgpt.train import lm_head

            head = lm_head.choose(cfg, trainer.accelerator.unwrap_model(trainer.model).get_base_model())
    dropout = cfg.lora.lora_dropout if system == "medgpt" else BASELINE_DROPOUT
    return {"system": system, "shape": shape, "lora_dropout": dropout, "step_seconds": [round(t, 3) for t in times[1:]],
            "step_tokens": tokens[1:], "non_padding_tokens_per_second": round(sum(tokens[1:]) / sum(times[1:]), 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "gradient_checkpointing": bool(args.gradient_checkpointing), "bf16": bool(args.bf16),
            "torch_threads": torch.get_num_threads(), "lm_head_loss": head,
            "train_sampling_strategy": str(getattr(args, "train_sampling_strategy", "random"))}


class Turns:
    """A worker process the driver hands steps to, one at a time."""

    def __init__(self, system: str, shape: str, model: str):
        cmd = [sys.executable, __file__, "--worker", system, "--shapes", shape, "--model", model,
               "--baseline-lora-dropout", str(BASELINE_DROPOUT),
               *[a for k, v in MEDGPT_SET.items() for a in ("--medgpt-set", f"{k}={v}")]]
        self.system = system
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.expect("READY")

    def expect(self, word: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(word):
                return line
        raise SystemExit(f"{self.system}: the worker ended before {word} (exit {self.proc.wait()})")

    def step(self) -> tuple[float, int]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        _, seconds, tokens = self.expect("STEP").split()
        return float(seconds), int(tokens)

    def finish(self) -> dict:
        self.proc.stdin.close()
        result = json.loads(self.expect("RESULT").split(" ", 1)[1])
        self.proc.wait()
        return result


def paired(shape: str, model: str, pairs: int) -> tuple[dict, list[dict]]:
    """Both systems' workers alive together, their steps alternated A B B A A B ... (the order flips every
    step, so neither always runs first); the measured steps are cut into `pairs` blocks, and each block gives
    each system's tokens/s over the same stretch of time."""
    steps = SHAPES[shape][3]
    if steps % pairs:
        raise SystemExit(f"{shape}: {steps} measured steps do not split into {pairs} pairs")
    workers = {"baseline": Turns("baseline", shape, model)}
    workers["medgpt"] = Turns("medgpt", shape, model)
    loads = []
    for step in range(steps + 1):  # step 0: the warm-up
        for system in ("baseline", "medgpt") if step % 2 == 0 else ("medgpt", "baseline"):
            workers[system].step()
        loads.append(os.getloadavg()[0])
    results = {system: w.finish() for system, w in workers.items()}
    per = steps // pairs
    blocks = []
    for pair in range(pairs):
        block = {"pair": pair, "load_average": round(statistics.mean(loads[1 + pair * per:1 + (pair + 1) * per]), 2)}
        for system, r in results.items():
            window = slice(pair * per, (pair + 1) * per)
            block[system] = round(sum(r["step_tokens"][window]) / sum(r["step_seconds"][window]), 2)
        block["ratio"] = round(block["medgpt"] / block["baseline"], 3)
        blocks.append(block)
    return results, blocks


def matmul_peak() -> dict:
    """This machine's matmul GFLOP/s with torch's threads: fp32 on 1024 x 1024, bf16 on 1024 where bf16 is
    fast, else on 256 (a second at most)."""
    from medgpt.cpu import matmul_speed, measure_matmul

    quick = matmul_speed()
    bf16_size = 1024 if quick["bf16"] > 0.5 * quick["fp32"] else 256
    return {"fp32_gflops": round(measure_matmul("fp32", 1024, 1.0), 1),
            "bf16_gflops": round(measure_matmul("bf16", bf16_size, 1.0), 2), "bf16_size": bf16_size,
            "auto_precision_check": quick}


def flops_per_token(stage: str, model: str) -> float:
    from medgpt.plan import load_architecture

    params = load_architecture(model).params
    return (6 if stage == "dpo" else 4) * params


def machine() -> dict:
    import torch

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    lines = cpuinfo.splitlines()
    name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {"cpu": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "simd_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4"))),
            "cuda": torch.cuda.is_available(), "torch": torch.__version__, "python": platform.python_version()}


def summarize(entry: dict) -> dict:
    """Statistics of one shape that a changing machine load disturbs least: the median over steps of the ratio
    of the two systems' tokens/s in adjacent steps (run back to back, so under the same load), and each
    system's best step (its tokens/s when the machine left it alone the most)."""
    base, ours = entry["baseline"], entry["medgpt"]
    rate = {name: [t / s for t, s in zip(r["step_tokens"], r["step_seconds"])] for name, r in
            (("baseline", base), ("medgpt", ours))}
    entry["step_ratios"] = [round(m / b, 3) for m, b in zip(rate["medgpt"], rate["baseline"])]
    entry["median_step_ratio"] = round(statistics.median(entry["step_ratios"]), 3)
    entry["best_step_tokens_per_second"] = {k: round(max(v), 2) for k, v in rate.items()}
    entry["best_step_ratio"] = round(max(rate["medgpt"]) / max(rate["baseline"]), 3)
    entry["overall_ratio"] = round(ours["non_padding_tokens_per_second"] / base["non_padding_tokens_per_second"], 3)
    entry["peak_rss_ratio"] = round(ours["peak_rss_mib"] / base["peak_rss_mib"], 3)
    for r in (base, ours):  # the useful matmul FLOP/s over each measured peak (a bf16 run is bound by bf16's)
        gflops = r["non_padding_tokens_per_second"] * entry["flops_per_token"] / 1e9
        for kind in ("fp32", "bf16"):
            r[f"matmul_peak_share_{kind}"] = round(gflops / entry["matmul_peak"][f"{kind}_gflops"], 4)
    return entry


def result_key(shape: str) -> str:
    """The results file's key of SHAPE: a baseline run with another dropout than the reference's, or medgpt with
    options of --medgpt-set, is a control."""
    key = shape
    if BASELINE_DROPOUT != REFERENCE_DROPOUT and SHAPES[shape][0] == "sft":
        key += f"@baseline-dropout-{BASELINE_DROPOUT:g}"
    return key + "".join(f"@medgpt-{k}={v}" for k, v in sorted(MEDGPT_SET.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--pairs", type=int, default=3, help="A B pairs per shape")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/train_throughput_cpu-"
                                                 "bf16.json or _cpu-fp32.json, by this CPU's bf16 speed)")
    parser.add_argument("--baseline-lora-dropout", type=float, default=REFERENCE_DROPOUT,
                        help="the SFT baseline's lora_dropout (default: the reference project's); other values "
                             "are recorded as SHAPE@baseline-dropout-VALUE")
    parser.add_argument("--medgpt-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a medgpt option instead of its default, e.g. dtype=fp32 (a control, recorded as "
                             "SHAPE@medgpt-KEY=VALUE); repeatable")
    parser.add_argument("--worker", choices=("medgpt", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", metavar="SHAPE", help="profile one medgpt run of SHAPE (torch.profiler)")
    parser.add_argument("--summarize", action="store_true", help="recompute the summaries of the results file")
    args = parser.parse_args()
    if args.out is None:
        from medgpt.cpu import cpu_supports_bf16

        args.out = Path(str(RESULTS).format(precision="bf16" if cpu_supports_bf16() else "fp32"))
    global BASELINE_DROPOUT
    BASELINE_DROPOUT = args.baseline_lora_dropout
    for item in args.medgpt_set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            parser.error(f"--medgpt-set {item!r}: expected KEY=VALUE")
        MEDGPT_SET[key.strip()] = value.strip()
    if MEDGPT_SET and not args.worker:  # a bad option is reported here, not by a worker after the peak is measured
        from medgpt.errors import UserError

        try:
            medgpt_config("sft", 2, 64, 1, tempfile.gettempdir(), args.model)
        except UserError as exc:
            parser.error(f"--medgpt-set: {exc}")
    if args.summarize:
        if not args.out.exists():
            parser.error(f"--summarize: {args.out} does not exist (run the benchmark first)")
        report = json.loads(args.out.read_text())
        for entry in report["shapes"].values():
            summarize(entry)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    if args.worker:
        print("RESULT", json.dumps(worker(args.worker, args.shapes, args.model, turns=True)), flush=True)
        return 0
    if args.profile:
        target = args.out.with_name(f"train_profile_{args.profile}.txt")
        target.parent.mkdir(parents=True, exist_ok=True)
        result = worker("medgpt", args.profile, args.model, profile=target)
        print(json.dumps(result), f"\nprofile: {target}")
        return 0
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; expected {', '.join(SHAPES)}")
    peak = matmul_peak()
    print(f"matmul peak: fp32 {peak['fp32_gflops']} GFLOP/s, bf16 {peak['bf16_gflops']} GFLOP/s", flush=True)
    report = {"benchmark": "training throughput, medgpt defaults vs the baseline loops (LoRA r=8 all-linear)",
              "model": args.model, "records": RECORDS, "machine": machine(), "matmul_peak": peak,
              "load_average_start": os.getloadavg(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "shapes": {}}
    keys = {shape: result_key(shape) for shape in shapes}
    if args.out.exists() and (earlier := json.loads(args.out.read_text())).get("model") == args.model:
        report["shapes"] = {k: v for k, v in earlier.get("shapes", {}).items() if k not in keys.values()}  # kept
    for shape in shapes:
        stage, batch, length, steps = SHAPES[shape]
        per_token = flops_per_token(stage, args.model)
        results, blocks = paired(shape, args.model, args.pairs)
        ratios = [b["ratio"] for b in blocks]
        for b in blocks:
            print(f"{shape} pair {b['pair']}: baseline {b['baseline']} tok/s, medgpt {b['medgpt']} tok/s, "
                  f"ratio {b['ratio']}, load {b['load_average']}", flush=True)
        key = keys[shape]
        report["shapes"][key] = {
            "stage": stage, "batch_size": batch, "max_length": length, "measured_steps": steps,
            "flops_per_token": per_token, "medgpt_options": dict(MEDGPT_SET), "ratio_per_pair": ratios,
            "median_ratio": statistics.median(ratios),
            "pairs": blocks, "matmul_peak": peak, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **results}
        summarize(report["shapes"][key])
        print(f"{shape}: median ratio {statistics.median(ratios):.2f} ({ratios})", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(args.out)
    report["load_average_end"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
