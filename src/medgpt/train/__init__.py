"""Training stages: one module per stage (`medgpt.train.<stage>`), each the stage-specific part only.

A stage module defines:

- `CONFIG_CLASS`: its TRL config (a TrainingArguments subclass); its fields are config keys;
- `STAGE_ARGS` (optional): one dataclass of the stage's own options, also config keys; `build_config` puts its
  instance at `cfg.stage_args`;
- `configure(cfg)` (optional): called by `build_config` once the config is built, to validate and settle what
  the stage's options mean (e.g. pt's block size becomes SFT packing options). Every check a stage makes of
  its options lives here, so a pipeline validates all of its stages before the first one starts, and the
  config stays fixed while the stage runs;
- `prepare_data(cfg, tokenizer) -> medgpt.train.prepare.Prepared`: the stage's records prepared into the
  memory-mapped cache (what `medgpt data prepare` builds and `run` then loads);
- `run(cfg: Config) -> dict`: train and save; returns the final metrics.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from medgpt.config import Config, build_stage_config, read_config
from medgpt.errors import UserError
from medgpt.stages import stage_facts


def stage_module(stage: str):
    """The module of a stage named in `medgpt.stages`."""
    stage_facts(stage)
    try:
        return importlib.import_module(f"medgpt.train.{stage}")
    except ModuleNotFoundError as exc:
        if exc.name == f"medgpt.train.{stage}":
            raise UserError(f"stage {stage!r} is not available in this version") from exc
        raise


def build_config(raw: dict[str, Any]) -> Config:
    """A flat dict of options -> the settled `Config` of the stage it names (`stage`, default sft)."""
    return build_stage_config(raw, stage_module(str(raw.get("stage", "sft"))))


def load_config(path: str | Path | None, overrides: list[str] | dict[str, Any] | None = None,
                **defaults: Any) -> Config:
    """YAML file (optional) + overrides (command line) -> the stage's settled `Config`. Later sources win."""
    return build_config(read_config(path, overrides, **defaults))


def run_training(cfg) -> dict:
    """Run the stage named in `cfg` and return its final metrics."""
    return stage_module(cfg.run.stage).run(cfg)
