"""Training stages: one module per stage (`medgpt.train.<stage>`), each the stage-specific part only.

A stage module defines:

- `CONFIG_CLASS`: its TRL config (a TrainingArguments subclass); its fields are config keys;
- `STAGE_ARGS` (optional): one dataclass of the stage's own options, also config keys; `build_config` puts its
  instance at `cfg.stage_args`;
- `configure(cfg)` (optional): called by `build_config` once the config is built, to validate and settle what
  the stage's options mean (e.g. pt's block size becomes SFT packing options). Every check a stage makes of
  its options lives here, so a pipeline validates all of its stages before the first one starts, and the
  config stays fixed while the stage runs;
- `run(cfg: Config) -> dict`: train and save; returns the final metrics.
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
