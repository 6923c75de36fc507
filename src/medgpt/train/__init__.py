"""Training stages: one module per stage (`medgpt.train.<stage>`), each the stage-specific part only.

A stage module defines `CONFIG_CLASS` (its TRL config, a TrainingArguments subclass), optionally
`EXTRA_ARGS` (its own dataclasses of options) and `run(cfg: Config) -> dict` (final metrics).
"""

from __future__ import annotations

import importlib

from medgpt.errors import UserError

STAGES = ("pt", "sft", "rm", "ppo", "dpo", "orpo", "kto", "grpo")


def stage_module(stage: str):
    if stage not in STAGES:
        raise UserError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    try:
        return importlib.import_module(f"medgpt.train.{stage}")
    except ModuleNotFoundError as exc:
        if exc.name == f"medgpt.train.{stage}":
            raise UserError(f"stage {stage!r} is not available in this version") from exc
        raise


def run_training(cfg) -> dict:
    """Run the stage named in `cfg` and return its final metrics."""
    return stage_module(cfg.run.stage).run(cfg)
