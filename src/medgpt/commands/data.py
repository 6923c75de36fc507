"""`medgpt data check|convert|prepare|dedup`: see what a data set holds (and what training would drop, and why)
before spending GPU time on it, and move data between the formats other tools expect."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from medgpt.data.convert import FORMATS  # the standard library only: fast --help
from medgpt.data.readers import KINDS, ON_ERROR
from medgpt.errors import UserError
from medgpt.select import contamination, dedup


def _source_arguments(parser: argparse.ArgumentParser, kinds: tuple[str, ...]) -> None:
    parser.add_argument("--kind", choices=kinds, help="data kind (default: guessed from the first record)")
    parser.add_argument("--on-error", choices=ON_ERROR, default="fail",
                        help="fail: a bad record is an error; skip: drop and count it (default: fail)")
    parser.add_argument("--subset", help="hub data set configuration name")
    parser.add_argument("--split", default="train", help="hub data set split (default: train)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="validate and count records; token-length percentiles",
                           description="Validate and count records, list what would be dropped and where, and "
                                       "show token-length percentiles. Exits 1 when a record would be dropped "
                                       "(unless --on-error skip), so it can gate CI scripts.")
    check.add_argument("path", help="file, folder, comma-separated list, or hub data set name")
    _source_arguments(check, (*KINDS, "mcq"))
    check.add_argument("--tokenizer", help="tokenizer for lengths (default: the project default model)")
    check.add_argument("--no-tokenizer", action="store_true", help="skip token lengths")
    check.add_argument("--template", default="auto", help="chat template for sft/pref lengths (default: auto)")
    check.add_argument("--max-length", type=int, help="count records longer than this many tokens")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    convert = sub.add_parser("convert", help="convert sft/pref data to another format",
                             description="Convert sft/pref data to another format; writes OUT atomically and "
                                         "data_stats.json beside it.")
    convert.add_argument("input", help="file, folder, comma-separated list, or hub data set name")
    _source_arguments(convert, ("sft", "pref"))
    convert.add_argument("--to", choices=FORMATS, required=True,
                         help="sharegpt, openai (TRL conversational), alpaca (sft), "
                              "pref (question/response_chosen/response_rejected)")
    convert.add_argument("--out", required=True, help="output .jsonl file")
    prepare = sub.add_parser("prepare", help="encode a training config's data once into the prepared-data cache",
                             description="Read, validate, template and tokenize exactly what `medgpt train CONFIG` "
                                         "trains on (any stage; the preference and RL stages' conversational rows "
                                         "are tokenized by their trainer), in parallel, into memory-mapped Arrow "
                                         "files in the prepared-data cache; print the counts, token statistics and "
                                         "the cache folder. `medgpt train` then starts from the cache.")
    prepare.add_argument("config", help="the training config (YAML)")
    prepare.add_argument("--json", action="store_true", help="print the report as JSON")
    prepare.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value pairs, as for medgpt train")
    contamination.add_contamination_arguments(sub.add_parser(
        "contamination", help="find training items that copy or paraphrase eval items",
        description="Character n-gram (Chinese) / word 13-gram (English) overlap and embedding similarity "
                    "between training data and an eval set, listing which training items contaminate which eval items."))
    dedup.add_dedup_arguments(sub.add_parser(
        "dedup", help="remove exact and near-duplicate records (MinHash), counted in data_stats.json",
        description="Drop records whose normalized text repeats an earlier record's (exact), or whose shingles' "
                    "Jaccard similarity with an earlier record's is estimated by MinHash at or above --threshold "
                    "(near); write the kept records atomically to --out and the counts to data_stats.json beside it."))


def run(args: argparse.Namespace) -> int:
    actions = {"check": _check, "convert": _convert, "prepare": _prepare,
               "contamination": contamination.run_contamination, "dedup": dedup.run_dedup}
    return actions[args.action](args)


def _percentile(ordered: list[int], p: float) -> int:
    """Nearest-rank percentile of sorted values."""
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _token_lengths(records, kind: str, args: argparse.Namespace, folder: Path) -> dict | None:
    """Token lengths as training will see them (`medgpt.train.prepare.record_lengths`: the chat template applied
    for sft/pref, the longer of prompt+chosen and prompt+rejected; the plain tokenized text for pt), measured in
    parallel as the records stream in; None without records."""
    import os

    import numpy as np

    from medgpt.data.templates import get_template
    from medgpt.models import load_tokenizer
    from medgpt.train.prepare import record_lengths

    tokenizer = load_tokenizer(args.tokenizer)
    template = None if kind == "pt" else get_template(args.template, tokenizer)
    measured = record_lengths(records, kind, tokenizer, template, folder, len(os.sched_getaffinity(0)))
    if not len(measured):
        return None
    lengths = measured.with_format("numpy")[:]["length"]
    ordered = np.sort(lengths)
    report = {"tokenizer": getattr(tokenizer, "name_or_path", args.tokenizer),
              "template": None if kind == "pt" else args.template,
              **{f"p{p}": int(_percentile(ordered, p)) for p in (50, 90, 99)}, "max": int(ordered[-1])}
    if args.max_length:
        longer = np.flatnonzero(lengths > args.max_length)
        report |= {"max_length": args.max_length, "longer": len(longer),
                   "longer_examples": list(measured.select(longer[:5])["loc"])}
    return report


def _format(report: dict) -> str:
    from medgpt.data.stats import preview

    lines = [f"{report['path']} ({report['kind']}): read {report['read']}, kept {report['kept']}, "
             f"dropped {sum(report['dropped'].values())}, blank lines {report['blank']}"]
    width = max(map(len, report["dropped"]), default=0)
    for reason, count in report["dropped"].items():
        where = report["examples"][reason]
        lines.append(f"  {reason:<{width}}  {count:>6}  {', '.join(where)}" + (" ..." if count > len(where) else ""))
    if reasoning := report.get("reasoning"):
        lines.append(f"  reasoning: {reasoning['with']} record(s) with, {reasoning['without']} without")
    if report["skipped_files"]:
        lines.append(f"  skipped {len(report['skipped_files'])} file(s) that are not {report['kind']} data: "
                     + preview(report["skipped_files"]))
    if tokens := report.get("tokens"):
        template = f", template {tokens['template']}" if tokens["template"] else ""
        lines.append(f"tokens ({tokens['tokenizer']}{template}): p50 {tokens['p50']}, p90 {tokens['p90']}, "
                     f"p99 {tokens['p99']}, max {tokens['max']}")
        if "longer" in tokens:
            lines.append(f"  {tokens['longer']} longer than --max-length {tokens['max_length']}"
                         + (f": {', '.join(tokens['longer_examples'])}" if tokens["longer"] else ""))
    return "\n".join(lines)


def _counting_reasoning(records, counts):
    from medgpt.data.stats import has_reasoning

    for record in records:
        counts["with" if has_reasoning(record) else "without"] += 1
        yield record


def _check(args: argparse.Namespace) -> int:
    # Read with "skip" so that every problem is listed, then fail by exit code if asked to. The records stream
    # through: only the counts and the token lengths are kept.
    import collections
    import tempfile

    from medgpt.data.readers import detect_kind, iter_records
    from medgpt.data.records import to_mcq
    from medgpt.data.stats import DataStats

    kind = args.kind or detect_kind(args.path, args.subset, args.split)
    stats, reasoning = DataStats(), collections.Counter()
    records = iter_records(args.path, kind, stats, on_error="skip", subset=args.subset, split=args.split,
                           normalize=to_mcq if kind == "mcq" else None)
    if kind == "sft":
        records = _counting_reasoning(records, reasoning)
    tokens = None
    if args.no_tokenizer or kind == "mcq":  # eval mcq measures its own prompts
        collections.deque(records, maxlen=0)
    else:
        with tempfile.TemporaryDirectory(prefix="medgpt-check-") as tmp:
            tokens = _token_lengths(records, kind, args, Path(tmp))
    report = {"path": args.path, "kind": kind, **stats.to_dict()}
    if kind == "sft":
        report["reasoning"] = {"with": reasoning["with"], "without": reasoning["without"]}
    if tokens:
        report["tokens"] = tokens
    print(json.dumps(report, ensure_ascii=False, indent=2) if args.json else _format(report))
    dropped = sum(stats.dropped.values())
    if dropped and args.on_error == "fail":
        print(f"medgpt data check: {dropped} record(s) cannot be used (fix them, or pass --on-error skip "
              "to accept dropping them)", file=sys.stderr)
        return 1
    return 0


def _convert(args: argparse.Namespace) -> int:
    from medgpt.data.convert import convert_record
    from medgpt.data.rows import write_jsonl

    from medgpt.data.readers import detect_kind, iter_records
    from medgpt.data.stats import DataStats

    kind = args.kind or detect_kind(args.input, args.subset, args.split)
    if kind not in ("sft", "pref"):
        raise UserError(f"{args.input}: {kind} records have no other format to convert to")
    stats = DataStats()
    records = iter_records(args.input, kind, stats, on_error=args.on_error, subset=args.subset, split=args.split)
    out = write_jsonl(args.out, (convert_record(record, args.to) for record in records))  # converted as read
    stats_path = stats.write(out.parent)
    print(f"wrote {stats.kept} {kind} records as {args.to} to {out} ({stats.summary()}); counts in {stats_path}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from medgpt.models import open_tokenizer
    from medgpt.train import load_config, stage_module
    from medgpt.train.prepare import describe

    cfg = load_config(args.config, list(args.overrides))
    if cfg.data.streaming:
        raise UserError("data prepare: streaming: true reads the corpus as training consumes it; nothing to prepare")
    report = describe(stage_module(cfg.run.stage).prepare_data(cfg, open_tokenizer(cfg.model)))
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"prepared data: {report['cache']} ({'found in the cache' if report['cached'] else 'new'})")
    for split, counts in report["counts"].items():
        dropped = ", ".join(f"{reason}: {n}" for reason, n in counts["dropped"].items()) or "none"
        print(f"  {split}: read {counts['read']}, kept {counts['kept']}, truncated {counts['truncated']}, "
              f"dropped {sum(counts['dropped'].values())} ({dropped})")
    for split in ("train", "eval"):
        if (stats := report.get(split)) and "tokens" not in stats:
            print(f"  {split} rows {stats['rows']} (conversational: the trainer tokenizes them)")
        elif stats:
            print(f"  {split} rows {stats['rows']}: {stats['tokens']} tokens ({stats['labelled_tokens']} labelled), "
                  f"length p50 {stats['p50']}, p90 {stats['p90']}, p99 {stats['p99']}, max {stats['max']}")
    return 0
