"""Direct preference optimization with TRL's DPOTrainer.

`loss_type` picks the objective TRL offers (sigmoid = DPO, ipo, hinge, robust, apo_zero, sppo_hard, ... or a
list combined with `loss_weights`) and `beta` how far the policy may move from the reference. With LoRA the
reference is the same model with the adapter disabled, so no second copy is loaded; with full fine-tuning a
frozen copy of the starting model is. Logged: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies (train and eval).
"""

from __future__ import annotations

from trl import DPOConfig

from medgpt.config import Config
from medgpt.train import common, prefs

CONFIG_CLASS = DPOConfig

prepare_data = prefs.prepare_rows


def run(cfg: Config) -> dict:
    from trl import DPOTrainer

    trainer, stats = common.build_trainer(cfg, DPOTrainer, prefs.conversation_datasets,
                                          ref_model=prefs.reference_model(cfg))
    return common.train_and_save(trainer, cfg, stats)
