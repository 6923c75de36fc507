"""medgpt.config: the typed run configuration, read from the shipped SFT example plus overrides. Unknown keys are
errors with a suggestion, moved keys point to their new place, overrides are typed and win over the YAML, values
only a library would have refused are medgpt's errors, YAML's false means "no" only for strategies, and Liger's
kernels are refused on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from _stage_runs import FAST

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.train import build_config, load_config

ROOT = Path(__file__).resolve().parents[1]
SFT_EXAMPLE = ROOT / "examples" / "sft_smollm2.yaml"


def test_unknown_config_key_is_an_error_with_a_suggestion():
    with pytest.raises(UserError, match="learnin_rate.*did you mean learning_rate"):
        load_config(SFT_EXAMPLE, ["--learnin_rate", "1e-4"])


def test_older_reward_keys_are_read_or_pointed_to_their_new_place():
    from medgpt.train import build_config

    assert build_config({"stage": "grpo", "rewards": "length"}).stage_args.reward_fn == "length"
    with pytest.raises(UserError, match=r"length_target \(now reward_kwargs: \{target_chars: N\}\)"):
        build_config({"stage": "grpo", "length_target": 5})


def test_an_eval_split_evaluates_each_epoch_unless_the_config_says_otherwise():
    from medgpt.train import build_config

    assert build_config({"stage": "sft", "val_size": 0.1}).train.eval_strategy == "epoch"
    assert build_config({"stage": "sft", "val_size": 0.1, "eval_strategy": "no"}).train.eval_strategy == "no"
    assert build_config({"stage": "sft"}).train.eval_strategy == "no"


def test_overrides_are_typed_and_win_over_yaml():
    cfg = load_config(SFT_EXAMPLE, ["--lr", "1e-4", "--max_steps=3", "--packing", "--method", "full"])
    assert cfg.train.learning_rate == pytest.approx(1e-4) and cfg.train.max_steps == 3
    assert cfg.train.packing is True and cfg.run.method == "full"
    assert load_config(SFT_EXAMPLE, ["--eval_strategy", "no"]).train.eval_strategy == "no"
    with pytest.raises(UserError, match="max_steps: 'many' is not a valid int"):
        load_config(SFT_EXAMPLE, ["--max_steps", "many"])


@pytest.mark.parametrize("option, value, message", [
    ("lora_rank", "0", "lora_rank: 0 must be at least 1"),
    ("lora_dropout", "1.5", "lora_dropout: 1.5 must be at least 0 and below 1"),
    ("learning_rate", "-1", "learning_rate: -1.0 must be greater than 0"),
    ("num_train_epochs", "0", "num_train_epochs: 0.0 must be greater than 0"),
    ("per_device_train_batch_size", "0", "per_device_train_batch_size: 0 must be at least 1"),
    ("gradient_accumulation_steps", "0", "gradient_accumulation_steps: 0 must be at least 1"),
    ("max_steps", "0", "max_steps: 0 must be -1 (use num_train_epochs) or at least 1"),
    ("max_length", "0", "max_length: 0 must be at least 1"),
    ("val_size", "-0.1", "val_size: -0.1 must be at least 0"),
    ("quantization_bit", "3", "quantization_bit: 3 must be 4 or 8"),
    ("system", "false", "system: false is a yes/no value, but system takes a str"),
    ("max_steps", "true", "max_steps: true is a yes/no value, but max_steps takes a int"),
])
def test_bad_options_are_clear_errors_before_any_library_sees_them(option, value, message, capsys):
    """Values that only PEFT, torch or transformers would have refused (with a traceback) are medgpt's errors."""
    assert main(["train", str(SFT_EXAMPLE), f"--{option}", value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_yaml_false_means_no_only_for_strategies_and_invalid_yaml_says_where(tmp_path):
    assert load_config(None, {"eval_strategy": False}).train.eval_strategy == "no"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nlearning_rate: [1e-4,\nmax_steps: 2\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.yaml:4:1: invalid YAML: expected ',' or ']'"):
        load_config(bad)


def test_liger_kernels_on_a_cpu_are_an_error(tiny_model, tmp_path):
    raw = {"stage": "sft", "model": tiny_model, "data": "x.jsonl", "output_dir": str(tmp_path), **FAST}
    with pytest.raises(UserError, match="use_liger_kernel: Liger's kernels are Triton kernels for CUDA GPUs"):
        build_config({**raw, "use_liger_kernel": True})


def test_lora_target_as_a_yaml_list_is_the_comma_separated_names(tmp_path):
    config = tmp_path / "lora.yaml"
    config.write_text("stage: sft\nlora_target: [q_proj, v_proj]\nmodules_to_save: [lm_head]\n")
    cfg = load_config(config, [])
    assert (cfg.lora.lora_target, cfg.lora.modules_to_save) == ("q_proj,v_proj", "lm_head")


def test_an_eval_schedule_without_eval_data_and_a_max_length_over_the_context_are_one_line_errors(tiny_model):
    with pytest.raises(UserError, match=r"^eval_strategy steps: there is no eval data; set eval_data"):
        build_config({"stage": "sft", "eval_strategy": "steps"})
    assert build_config({"stage": "sft", "eval_strategy": "steps", "val_size": 0.1}).train.eval_strategy == "steps"
    with pytest.raises(UserError, match=r"^max_length 4096: above the model's context of 2048 tokens"):
        build_config({"stage": "sft", "model": tiny_model, "max_length": 4096})
    assert build_config({"stage": "sft", "model": tiny_model, "max_length": 4096, "rope_scaling": "linear"})
