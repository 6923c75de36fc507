"""`medgpt train [CONFIG.yaml] [--key value ...]`: one training stage."""

from __future__ import annotations

import argparse

from medgpt.stages import STAGES

USAGE = "medgpt train [CONFIG.yaml] [--key value ...]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Every word after `train` is collected by the CLI as an override (parse_known_args): the config
    # file, then --key value pairs, so options that start with -- are never mistaken for medgpt's own.
    parser.usage = USAGE
    parser.epilog = (
        "CONFIG.yaml holds `stage:` (" + ", ".join(STAGES) + ") and its options; --key value pairs "
        "override it (e.g. --learning_rate 1e-4 --max_steps 20). Every option of the stage's TRL config "
        "(a transformers TrainingArguments) is a valid key too."
    )
    parser.set_defaults(overrides=[])


def split_config(words: list[str]) -> tuple[str | None, list[str]]:
    if words and not words[0].startswith("--"):
        return words[0], words[1:]
    return None, words


def run(args: argparse.Namespace) -> int:
    from medgpt.files import is_main_process
    from medgpt.report import write_training_report
    from medgpt.train import load_config, run_training

    config_path, overrides = split_config(list(args.overrides))
    cfg = load_config(config_path, overrides)
    metrics = run_training(cfg)
    if not is_main_process():
        return 0
    write_training_report(cfg)
    print(f"{cfg.run.stage} finished: {cfg.output_dir}")
    for key in sorted(metrics):
        if isinstance(metrics[key], (int, float)):
            print(f"  {key}: {metrics[key]:.4g}")
    return 0
