"""medgpt.train.sft: the trainer on prepared rows. Its length-grouped sampler reads the rows' lengths from the
Arrow offsets instead of decoding every row; the reference is transformers' own LengthGroupedSampler measuring
each row of the same dataset itself: the same lengths and, from the same seed, the same batches."""

from __future__ import annotations

import torch

from medgpt.train import build_config, common, sft


def test_length_grouped_batches_are_those_transformers_measures_itself(tiny_model, sample_data, tmp_path):
    from transformers.trainer_pt_utils import LengthGroupedSampler

    cfg = build_config({"stage": "sft", "model": tiny_model, "data": str(sample_data / "sft" / "medical_sft.jsonl"),
                        "template": "chatml", "max_length": 256, "per_device_train_batch_size": 4,
                        "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "out"), "report_to": "none",
                        "data_cache_dir": str(tmp_path / "cache")})
    trainer, _ = common.build_trainer(cfg, sft.PreparedSFTTrainer, sft.build_datasets)
    assert cfg.train.train_sampling_strategy == "group_by_length"
    ours = trainer._get_train_sampler()
    reference = LengthGroupedSampler(8, dataset=trainer.train_dataset, model_input_name="input_ids")
    assert ours.lengths == reference.lengths and len(set(ours.lengths)) > 10
    torch.manual_seed(0)
    batches = list(ours)
    torch.manual_seed(0)
    assert batches == list(reference)
