"""Kahneman-Tversky optimization with TRL's KTOTrainer, on unpaired feedback: each example is one
response labelled desirable or not. Preference pairs give one desirable (chosen) and one undesirable
(rejected) example each; `{"prompt", "completion", "label"}` rows are taken as they are. `beta`,
`desirable_weight` and `undesirable_weight` come from the config (weight the rarer label up when the counts
differ). As in DPO, with LoRA the reference is the adapter-disabled model. KTO estimates its KL term from
the other examples of a batch, so per_device_train_batch_size must be at least 2.
"""

from __future__ import annotations

from functools import partial

from trl import KTOConfig

from medgpt.config import Config
from medgpt.train import common, prefs
from medgpt.data.records import to_unpaired

CONFIG_CLASS = KTOConfig

prepare_data = partial(prefs.prepare_rows, kind="unpaired", normalize=to_unpaired, responses=("completion",),
                       carry=("label",))
unpaired_datasets = partial(prefs.conversation_datasets, prepare_data=prepare_data)


def run(cfg: Config) -> dict:
    from trl import KTOTrainer

    trainer, stats = common.build_trainer(cfg, KTOTrainer, unpaired_datasets,
                                          ref_model=prefs.reference_model(cfg))
    return common.train_and_save(trainer, cfg, stats)
