"""`medgpt doctor [CONFIG.yaml] [--key value ...]`: check a (multi-node) launch before training, under the same
launcher and config: `torchrun ... -m medgpt.cli doctor CONFIG.yaml` where training runs `... train CONFIG.yaml`."""

from __future__ import annotations

import argparse
import sys

USAGE = "medgpt doctor [CONFIG.yaml] [--key value ...] [--timeout S] [--allreduce-bytes N ...]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # as `medgpt train`: the config file and --key value overrides are collected by the CLI
    parser.usage = USAGE
    parser.epilog = ("Run it with the launcher, config and overrides of the training it precedes. Rank 0 prints one "
                     "table; the exit status is 1 when a rank is missing or differs from rank 0, naming its node.")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds every rank has to join (default: 60)")
    parser.add_argument("--allreduce-bytes", type=int, nargs="+", metavar="N",
                        help="all-reduce sizes to time, in bytes; the first gives the latency "
                             "(default: 8 1MiB 16MiB on CPUs, 8 16MiB 256MiB on GPUs)")
    parser.set_defaults(overrides=[])


def run(args: argparse.Namespace) -> int:
    from medgpt.commands.train import split_config
    from medgpt.errors import UserError
    from medgpt.train.doctor import NotJoined, run_doctor

    if args.timeout <= 0:
        raise UserError(f"--timeout {args.timeout:g}: must be > 0")
    if args.allreduce_bytes and min(args.allreduce_bytes) < 4:
        raise UserError("--allreduce-bytes: each size must be at least 4 (one float32)")
    config, overrides = split_config(list(args.overrides))
    try:
        report = run_doctor(config, overrides, timeout=args.timeout, allreduce_bytes=args.allreduce_bytes)
    except NotJoined as exc:
        print(f"medgpt doctor: FAIL: {exc}", file=sys.stderr)
        return 1
    launch = report.launch
    if launch.rank == 0:
        print(report.table())
    elif launch.local_rank == 0 and report.failed:  # each node's log says why its launch failed
        print("medgpt doctor: FAIL (rank 0 on node 0 prints the table): "
              + "; ".join(f"node {n} rank {r}: {t}" for level, n, r, t in report.problems if level == "FAIL"),
              file=sys.stderr)
    return 1 if report.failed else 0
