"""`medgpt train [CONFIG.yaml] [--key value ...]`: one training stage."""

from __future__ import annotations

import argparse
import os

USAGE = "medgpt train [CONFIG.yaml] [--key value ...]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every word after `train` is collected by the CLI as an override (parse_known_args): the config
    # file, then --key value pairs, so options that start with -- are never mistaken for medgpt's own.
    parser.usage = USAGE
    parser.epilog = (
        "CONFIG.yaml holds `stage:` (pt, sft, rm, ppo, dpo, orpo, kto, grpo) and its options; --key value pairs "
        "override it (e.g. --learning_rate 1e-4 --max_steps 20). Every option of the stage's TRL config "
        "(a transformers TrainingArguments) is a valid key too."
    )
    parser.set_defaults(overrides=[])


def split_config(words: list[str]) -> tuple[str | None, list[str]]:
    if words and not words[0].startswith("--"):
        return words[0], words[1:]
    return None, words


def run(args: argparse.Namespace) -> int:
    from medgpt.config import load_config
    from medgpt.train import run_training

    config_path, overrides = split_config(list(args.overrides))
    cfg = load_config(config_path, overrides)
    metrics = run_training(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"{cfg.run.stage} finished: {cfg.output_dir}")
    for key in sorted(metrics):
        if isinstance(metrics[key], (int, float)):
            print(f"  {key}: {metrics[key]:.4g}")
    return 0
