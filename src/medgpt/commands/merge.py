"""`medgpt merge --adapter A [--base M] --out DIR`: a standalone model from base + LoRA adapter."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder")
    parser.add_argument("--base", help="base model (default: the one named in the adapter's config)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--dtype", default="fp32", help="dtype of the saved weights: fp32, bf16, fp16")
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from medgpt.models import merge_adapter

    out = merge_adapter(args.adapter, args.out, base=args.base, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out}")
    return 0
