"""medgpt.train.lm_head: the plain LM head trains exactly like TRL's chunked log-prob head (the reference:
`trl.trainer.utils.add_fused_lm_head`), and `lm_head_loss: auto` picks a head per device and stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from _stage_runs import FAST

from medgpt.errors import UserError
from medgpt.train import build_config


def head_run(stage: str, model: str, out: Path, head: str) -> list[dict]:
    """Two logged steps of `stage` with `lm_head_loss: head`; the trainer's log rows."""
    from trl import DPOTrainer, SFTTrainer

    from medgpt.train import common, lm_head, prefs, sft

    data = Path(__file__).resolve().parents[1] / "src/medgpt/sample_data" / (
        "pref/medical_pref.jsonl" if stage == "dpo" else "sft/medical_sft.jsonl")
    cfg = build_config({"stage": stage, "model": model, "data": str(data), "output_dir": str(out),
                        "max_samples": 4, "max_steps": 2, "learning_rate": 1e-2, "lora_dropout": 0.0,
                        "lm_head_loss": head, **{**FAST, "max_length": 256, "per_device_train_batch_size": 2}})
    if stage == "sft":
        trainer, _ = common.build_trainer(cfg, SFTTrainer, sft.build_datasets)
    else:
        trainer, _ = common.build_trainer(cfg, DPOTrainer, prefs.conversation_datasets)
    assert lm_head.choose(cfg, trainer.model.get_base_model()) == head
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row]


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_plain_lm_head_trains_exactly_like_trls_chunked_head(stage, tiny_model, tmp_path):
    """The reference is TRL's own chunked log-prob head (`trl.trainer.utils.add_fused_lm_head`): the plain head
    (the logits of the labelled positions) gives the same loss, to 1e-5, and the same metrics, step by step
    (each step's update follows the previous step's gradient, so the gradients agree too)."""
    chunked = head_run(stage, tiny_model, tmp_path / "chunked", "chunked")
    plain = head_run(stage, tiny_model, tmp_path / "plain", "plain")
    assert len(chunked) == len(plain) == 2
    keys = {"loss", "entropy", "mean_token_accuracy", "rewards/margins", "logps/chosen", "logits/chosen"}
    for a, b in zip(chunked, plain):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5)
        for key in keys & a.keys():
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
    assert chunked[-1]["loss"] != chunked[0]["loss"]  # the steps trained


def test_lm_head_auto_is_plain_on_a_cpu_and_bad_values_are_errors(tiny_model, tmp_path):
    from medgpt.train import lm_head

    raw = {"stage": "sft", "model": tiny_model, "data": "x.jsonl", "output_dir": str(tmp_path), **FAST}
    cfg = build_config(raw)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert cfg.train.use_cpu and lm_head.choose(cfg, model) == "plain"
    assert lm_head.choose(build_config({**raw, "stage": "kto"}), model) == "chunked"  # TRL's head stays
    with pytest.raises(UserError, match="stage kto keeps TRL's head"):
        lm_head.choose(build_config({**raw, "stage": "kto", "lm_head_loss": "plain"}), model)
    with pytest.raises(UserError, match="lm_head_loss 'fast': expected one of auto, plain, chunked"):
        build_config({**raw, "lm_head_loss": "fast"})
