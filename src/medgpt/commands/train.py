"""`medgpt train CONFIG.yaml [--key value ...]`: one training stage."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config with `stage:` (pt, sft, rm, ppo, dpo, orpo, kto, grpo)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--key value pairs overriding the YAML, e.g. --learning_rate 1e-4 --max_steps 20")
    parser.epilog = "Every key of the stage's TRL config is accepted too (see `medgpt train CONFIG --help-keys`)."


def run(args: argparse.Namespace) -> int:
    from medgpt.config import load_config
    from medgpt.train import run_training

    config_path = args.config
    overrides = list(args.overrides)
    if config_path and config_path.startswith("--"):
        overrides, config_path = [config_path, *overrides], None
    cfg = load_config(config_path, overrides)
    metrics = run_training(cfg)
    print(f"{cfg.run.stage} finished: {cfg.output_dir}")
    for key in sorted(metrics):
        if isinstance(metrics[key], (int, float)):
            print(f"  {key}: {metrics[key]:.4g}")
    return 0
