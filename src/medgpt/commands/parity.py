"""`medgpt parity --model M [--adapter A]`: the fine-tune against itself in every runtime (PEFT, merged, engine,
GGUF through transformers and llama.cpp, vLLM); a table, a JSON file, exit status 1 when a pair fails."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model folder or hub id (default: the bundled SmolLM2-135M-Instruct); may be "
                                        "a LoRA adapter folder")
    parser.add_argument("--adapter", help="LoRA adapter folder on top of --model")
    parser.add_argument("--template", help="chat template (default: the one saved with the model, else the "
                                           "tokenizer's own)")
    parser.add_argument("--prompts", help="jsonl of {\"query\"}, {\"question\"}, {\"prompt\"} or conversations "
                                          "(default: the shipped sample prompts)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--quants", default="f16,q8_0",
                        help="GGUF precisions to export and compare, comma-separated (default: f16,q8_0; '' none)")
    parser.add_argument("--gguf", action="append", default=[], help="an existing GGUF file to compare as well "
                                                                    "(repeatable)")
    parser.add_argument("--runtimes", help="comma-separated subset of adapter, engine, gguf, llama.cpp, vllm "
                                           "(default: all that apply)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="greedy continuation length (default: 32)")
    parser.add_argument("--output", default="parity.json", help="result JSON (default: parity.json)")
    parser.add_argument("--work-dir", help="where the GGUF files are exported (default: a temporary folder)")
    parser.add_argument("--trust-remote-code", action="store_true")


def run(args: argparse.Namespace) -> int:
    from medgpt.errors import UserError
    from medgpt.eval.parity import divergences, format_table, run_parity
    from medgpt.files import write_json

    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be at least 1")
    quants = tuple(q.strip() for q in args.quants.split(",") if q.strip())
    runtimes = tuple(r.strip() for r in args.runtimes.split(",") if r.strip()) if args.runtimes else None
    result = run_parity(args.model, args.adapter, args.prompts, quants=quants, gguf_files=tuple(args.gguf),
                        template=args.template, max_new_tokens=args.max_new_tokens, limit=args.limit,
                        runtimes=runtimes, trust_remote_code=args.trust_remote_code, work_dir=args.work_dir)
    write_json(args.output, result)
    print(format_table(result))
    for line in divergences(result):
        print(line)
    print(f"{'passed' if result['passed'] else 'FAILED'}; written: {args.output}")
    return 0 if result["passed"] else 1
