"""`medgpt plan --model M --stage S --method X`: memory per device for a training setup, from the config alone."""

from __future__ import annotations

import argparse
import json

from medgpt.plan import DEVICES, PLAN_METHODS  # medgpt.plan imports only the standard library at the top
from medgpt.stages import STAGES, stage_facts

ROWS = (("weights", "weights"), ("gradients", "gradients"), ("optimizer", "optimizer states"),
        ("activations", "activations"), ("reference_model", "reference model"), ("reward_model", "reward model"),
        ("overhead", "CUDA context and slack"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="model folder, hub id, or a built-in name such as Qwen/Qwen2.5-7B "
                             "(only the config is read)")
    parser.add_argument("--stage", choices=STAGES, default="sft")
    parser.add_argument("--method", choices=PLAN_METHODS, default="lora")
    parser.add_argument("--device", choices=DEVICES, default="gpu",
                        help="gpu: fp32 trained weights (master weights) with bf16 autocast, LoRA's frozen base in "
                             "bf16; cpu: fp32 weights + bf16 autocast")
    parser.add_argument("--pure-bf16", action="store_true",
                        help="as the training key pure_bf16: bf16 weights, gradients and AdamW states, 8 bytes per "
                             "trained parameter less; updates smaller than half a bf16 step (0.2-0.4%% of the "
                             "weight) are lost")
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch per device (default: 1)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--gpus", type=int, default=1, help="number of GPUs (data parallel)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="DeepSpeed ZeRO stage")
    parser.add_argument("--gpu-memory", type=float, nargs="+", default=[24, 40, 80], metavar="GIB",
                        help="GPU sizes to find the largest micro-batch for (default: 24 40 80)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-target", default="all-linear", help="all-linear or comma-separated module names")
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None,
                        help="hold a reference model (default: dpo, kto, ppo yes; grpo no, as TRL's beta=0)")
    parser.add_argument("--reward-model", action=argparse.BooleanOptionalAction, default=None,
                        help="hold a reward model of the same architecture (default: ppo yes, others no)")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--json", action="store_true", help="print JSON (sizes in GiB)")


def run(args: argparse.Namespace) -> int:
    from medgpt.plan import PlanArgs, plan

    result = plan(PlanArgs(model=args.model, stage=args.stage, method=args.method, device=args.device,
                           batch_size=args.batch_size, seq_len=args.seq_len,
                           gradient_checkpointing=args.gradient_checkpointing, gpus=args.gpus, zero=args.zero,
                           lora_rank=args.lora_rank, lora_target=args.lora_target, lora_dropout=args.lora_dropout,
                           reference=args.reference, reward_model=args.reward_model, pure_bf16=args.pure_bf16,
                           trust_remote_code=args.trust_remote_code),
                  gpu_memory=args.gpu_memory)
    report = result.to_dict()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    a, sizes = result.arch, report["per_device_gib"]
    pairs = " (x2: chosen + rejected)" if stage_facts(args.stage).paired else ""
    print(f"{a.name}  [{a.source}]")
    print(f"{args.stage}, {args.method}, device {args.device}: {a.params / 1e9:.3f} B params, "
          f"{result.trainable / 1e6:,.2f} M trainable ({100 * result.trainable / a.params:.2f}%)")
    print(f"micro-batch {args.batch_size}{pairs} x {args.seq_len} tokens, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, {args.gpus} GPU(s), ZeRO {args.zero}")
    p = result.precision
    frozen = f"{'NF4' if p.quantization_bit == 4 else 'int8'} linear layers, {p.frozen} rest" \
        if p.quantization_bit else p.frozen
    print(f"precision: trained parameters {p.trainable}, frozen weights {frozen}, autocast {p.autocast or 'none'}\n")
    print(f"{'per device':<24}{'GiB':>9}")
    for key, label in ROWS:
        if sizes[key] or key in ("weights", "gradients", "optimizer", "activations"):
            print(f"  {label:<22}{sizes[key]:>9.2f}")
        if key == "activations":
            for part, gib in report["activations_gib"].items():
                print(f"    {part.replace('_', ' '):<20}{gib:>9.2f}")
    print(f"  {'peak':<22}{sizes['peak']:>9.2f}   (gradients and activations overlap: the larger one counts)")
    print()
    for gib, batch in result.fits.items():
        if batch:
            print(f"{gib:g} GiB GPU: fits up to micro-batch {batch} at {args.seq_len} tokens")
        else:
            pure = ", --pure-bf16" if args.method == "full" and not args.pure_bf16 and not args.zero else ""
            print(f"{gib:g} GiB GPU: does not fit even micro-batch 1 (try --gradient-checkpointing, qlora4{pure}, "
                  "or more --gpus with --zero 3)")
    for note in result.notes:
        print(f"note: {note}")
    return 0
