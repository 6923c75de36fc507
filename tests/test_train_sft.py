"""SFT end to end, merge equality, resume, packing isolation, a bad data line reported without a traceback, and the
length-grouped sampler on prepared rows (the reference: transformers' own LengthGroupedSampler measuring each row
itself). The config's checks are in test_config.py, the fast --help in test_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medgpt.cli import main
from medgpt.train import build_config, common, load_config, run_training, sft

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

def test_cli_reports_a_bad_data_line_without_traceback(tmp_path, capsys, tiny_model):
    data = tmp_path / "bad.jsonl"
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    data.write_text(json.dumps(good) + "\n" + "{not json\n", encoding="utf-8")
    code = main(["train", str(SFT_EXAMPLE), "--model", tiny_model, "--data", str(data), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2
    assert f"{data}:2: invalid JSON" in err and "Traceback" not in err

@pytest.mark.slow
def test_sft_bundled_model_lora_loss_goes_down(bundled_model, tmp_path, sample_data):
    out = tmp_path / "sft-bundled"
    run_training(load_config(SFT_EXAMPLE, {
        "output_dir": str(out), "max_samples": 4, "val_size": 0, "max_length": 192, "num_train_epochs": 4,
        "max_steps": 6, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
        "save_steps": 100, "eval_strategy": "no", "report_to": "none", "warmup_steps": 0, "report_prompts": "none",
    }))
    curve = losses(out)
    assert curve[-1] < curve[0] * 0.8, curve
    assert (out / "adapter_model.safetensors").exists()


def test_length_grouped_batches_are_those_transformers_measures_itself(tiny_model, sample_data, tmp_path):
    """The sampler reads the rows' lengths from their Arrow offsets instead of decoding every row: the same lengths
    and, from the same seed, the same batches as transformers' sampler measuring each row of the same dataset."""
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
