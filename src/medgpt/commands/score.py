"""`medgpt score --model RM ...`: score (prompt, response) pairs with a reward model trained by stage rm,
one pair from the command line or a file of them; on preference pairs, also the pairwise accuracy."""

from __future__ import annotations

import argparse
import json
import sys

from medgpt.data.readers import ON_ERROR  # the standard library only: fast --help
from medgpt.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="reward model folder (output of a `stage: rm` run)")
    parser.add_argument("--prompt", help="a user message to score --response against")
    parser.add_argument("--response", help="the assistant response to score")
    parser.add_argument("--system", help="system prompt for --prompt")
    parser.add_argument("--input", help="jsonl/json/csv/parquet of {prompt, response} pairs (or question/answer), "
                                        "or preference pairs (both responses scored, pairwise accuracy reported)")
    parser.add_argument("--output", help="write the scored rows here as jsonl (default: print them)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="fail: a bad row is an error; skip: drop and count it (default: fail)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default: 8)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the hardware has it), fp32, bf16, fp16")


def run(args: argparse.Namespace) -> int:
    single = args.prompt is not None or args.response is not None
    if single == bool(args.input):
        raise UserError("give either --prompt and --response, or --input FILE")
    if single and (not args.prompt or not args.response):
        raise UserError("--prompt and --response go together, and neither may be empty")
    from medgpt.train.rewards import RewardModel

    scorer = RewardModel(args.model, dtype=args.dtype, batch_size=args.batch_size)
    if single:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}]
        print(f"{scorer.score([prompt], [args.response])[0]:.4f}")
        return 0
    return _score_file(scorer, args)


def _score_file(scorer, args: argparse.Namespace) -> int:
    from medgpt.data.records import read_scored
    from medgpt.data.rows import write_jsonl

    records, stats = read_scored(args.input, "scored", on_error=args.on_error)
    if not records:
        raise UserError(f"{args.input}: no pairs to score ({stats.summary()})")
    pairs = [(r["prompt"], r[key]) for r in records for key in (("chosen", "rejected") if "chosen" in r else ("response",))]
    scores = iter(scorer.score([p for p, _ in pairs], [c for _, c in pairs], progress=True))
    rows, wins, prefs = [], 0, 0
    for record in records:
        row = {k: v for k, v in record.items() if k != "_loc"}
        if "chosen" in record:
            row["chosen_score"], row["rejected_score"] = next(scores), next(scores)
            prefs += 1
            wins += row["chosen_score"] > row["rejected_score"]
        else:
            row["score"] = next(scores)
        rows.append(row)
    if args.output:
        write_jsonl(args.output, rows)
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))
    summary = f"scored {len(rows)} row(s) from {args.input} ({stats.summary()})"
    if prefs:
        summary += f"; pairwise accuracy {wins / prefs:.3f} ({wins}/{prefs} chosen above rejected)"
    print(summary + (f"; written to {args.output}" if args.output else ""), file=sys.stderr)
    return 0
