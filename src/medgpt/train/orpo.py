"""Odds-ratio preference optimization with TRL's ORPOTrainer (`trl.experimental.orpo`).

ORPO adds to the SFT loss on the chosen response a term (weighted by `beta`) that raises the odds of the
chosen response over the rejected one, so it needs no reference model and can start from a base model.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO lives in trl.experimental on purpose

from trl.experimental.orpo import ORPOConfig  # noqa: E402

from medgpt.config import Config  # noqa: E402
from medgpt.train import common, prefs  # noqa: E402

CONFIG_CLASS = ORPOConfig

prepare_data = prefs.prepare_rows


def run(cfg: Config) -> dict:
    from trl.experimental.orpo import ORPOTrainer

    trainer, stats = common.build_trainer(cfg, ORPOTrainer, prefs.conversation_datasets)
    return common.train_and_save(trainer, cfg, stats)
