"""Reward modelling on preference pairs with TRL's RewardTrainer.

The model gets a sequence-classification head (one score per sequence) and learns to score the chosen
response above the rejected one (Bradley-Terry loss). With LoRA the new `score` head is trained in full and
saved with the adapter (PEFT puts it in modules_to_save for the SEQ_CLS task). Evaluation reports pairwise
accuracy (`eval_accuracy`) on the eval split. `medgpt score` and the GRPO `reward_model` reward load the
result.
"""

from __future__ import annotations

import logging

from trl import RewardConfig

from medgpt.config import Config
from medgpt.train import common, prefs

log = logging.getLogger(__name__)

CONFIG_CLASS = RewardConfig


def configure(cfg: Config) -> None:
    """RewardTrainer drops overlong pairs without counting them, so medgpt drops (and counts) them itself."""
    if cfg.data.overlong == "truncate":
        log.warning("stage rm cannot truncate pairs (RewardTrainer would drop them uncounted): "
                    "pairs longer than max_length are dropped and counted instead")
        cfg.data.overlong = "drop"

prepare_data = prefs.prepare_rows


def run(cfg: Config) -> dict:
    from trl import RewardTrainer

    trainer, stats = common.build_trainer(cfg, RewardTrainer, prefs.conversation_datasets, task_type="SEQ_CLS",
                                          load=lambda cfg: common.load_policy(cfg, head="seq_cls"))
    return common.train_and_save(trainer, cfg, stats)
