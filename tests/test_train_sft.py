"""SFT end to end, merge equality, config validation, resume, packing isolation, a fast --help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medgpt.cli import main
from medgpt.errors import UserError
from medgpt.train import load_config, run_training

ROOT = Path(__file__).resolve().parents[1]
SFT_EXAMPLE = ROOT / "examples" / "sft_smollm2.yaml"


def losses(folder: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def tiny_sft(model: str, out: Path, sample_data: Path, **overrides) -> dict:
    options = {
        "model": model, "output_dir": str(out), "method": "full", "max_length": 256,
        "data": str(sample_data / "sft" / "medical_sft.jsonl"), "max_samples": 16, "val_size": 0,
        "num_train_epochs": 1, "max_steps": 12, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
        "logging_steps": 2, "save_steps": 100, "eval_strategy": "no", "report_to": "none", "warmup_steps": 0,
        "report_prompts": "none",
        **overrides,
    }
    return run_training(load_config(SFT_EXAMPLE, options))


def test_sft_tiny_full_loss_goes_down_and_outputs_are_complete(tiny_model, tmp_path, sample_data):
    out = tmp_path / "sft"
    tiny_sft(tiny_model, out, sample_data)
    curve = losses(out)
    assert len(curve) >= 5
    assert curve[-1] < curve[0] - 0.5, curve
    stats = json.loads((out / "data_stats.json").read_text())["train"]
    assert stats["read"] == stats["kept"] + sum(stats["dropped"].values())
    meta = json.loads((out / "medgpt.json").read_text())
    assert meta["complete"] and meta["stage"] == "sft" and meta["template"] == "chatml"
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))


def test_resume_continues_from_the_last_checkpoint(tiny_model, tmp_path, sample_data):
    out = tmp_path / "sft"
    tiny_sft(tiny_model, out, sample_data, max_steps=4, save_steps=2)
    assert (out / "checkpoint-4").is_dir()
    tiny_sft(tiny_model, out, sample_data, max_steps=6, save_steps=2, resume=True)
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 2 and steps[-1] == 6 and 4 in steps  # one log: the first run's rows kept, then steps 5-6


def test_merge_gives_the_adapter_logits(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from medgpt.models import load_tokenizer, merge_adapter

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    load_tokenizer(tiny_model).save_pretrained(adapter)
    ids = torch.tensor([[1, 2, 3, 400, 5000, 42, 7, 8]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(ids).logits

    merged_dir = merge_adapter(str(adapter), str(tmp_path / "merged"), base=tiny_model)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    with torch.no_grad():
        got = merged(ids).logits
    assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter really changes the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (merged_dir / "model.safetensors").exists() and (merged_dir / "tokenizer.json").exists()


def test_packed_samples_do_not_attend_to_each_other(tiny_model):
    """Padding-free packing relies on position ids restarting per sample; check the logits match unpacked runs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    a, b = torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[10, 11, 12]])
    packed = torch.cat([a, b], dim=1)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    with torch.no_grad():
        together = model(packed, position_ids=positions, use_cache=False).logits
        separate = torch.cat([model(a).logits, model(b).logits], dim=1)
        leaky = model(packed).logits
    torch.testing.assert_close(together, separate, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(leaky[:, 5:], separate[:, 5:], atol=1e-3)


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


def test_cli_reports_a_bad_data_line_without_traceback(tmp_path, capsys, tiny_model):
    data = tmp_path / "bad.jsonl"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + "{not json\n", encoding="utf-8")
    code = main(["train", str(SFT_EXAMPLE), "--model", tiny_model, "--data", str(data), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:2: invalid JSON" in err and "Traceback" not in err


def test_help_does_not_import_heavy_libraries():
    code = "import sys\nfrom medgpt.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("[]")
    assert "train" in done.stdout and "serve" in done.stdout


@pytest.mark.slow
def test_sft_bundled_model_lora_loss_goes_down(bundled_model, tmp_path, sample_data):
    out = tmp_path / "sft-bundled"
    run_training(load_config(SFT_EXAMPLE, {
        "output_dir": str(out), "max_samples": 8, "val_size": 0, "max_length": 256, "num_train_epochs": 4,
        "max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 2,
        "save_steps": 100, "eval_strategy": "no", "report_to": "none", "warmup_steps": 0, "report_prompts": "none",
    }))
    curve = losses(out)
    assert curve[-1] < curve[0] * 0.8, curve
    assert (out / "adapter_model.safetensors").exists()


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
