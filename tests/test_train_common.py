"""medgpt.train.common: what a kill at the wrong moment leaves behind is never taken for finished work. A checkpoint
folder cut off while saving is passed over on resume, a finished run's medgpt.json beside a new run's partial
files is removed before the new run starts, and a run resumed after a kill logs each step once and, at max_steps,
trains nothing. (Temporary folders of killed writes: test_files.py; a pipeline stage killed while merging:
test_pipeline.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.train import build_config, common


def config(tmp_path: Path, **extra):
    return build_config({"stage": "sft", "output_dir": str(tmp_path / "out"), "report_to": "none", **extra})


def test_resume_passes_over_a_checkpoint_cut_off_while_saving(tmp_path, caplog):
    out = tmp_path / "out"
    for step, complete in ((2, True), (4, True), (6, False)):  # checkpoint-6: model written, state not yet
        folder = out / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert common.last_checkpoint(config(tmp_path, resume=True)) == str(out / "checkpoint-4")
    assert "incomplete checkpoint(s) checkpoint-6" in caplog.text
    assert common.last_checkpoint(config(tmp_path)) is None  # a fresh run resumes from nothing


def test_a_fresh_run_first_marks_a_finished_folder_unfinished(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "medgpt.json").write_text(json.dumps({"stage": "sft", "complete": True}))
    (out / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "loss": 2.0}}\n' for s in (1, 2, 3)))
    common.prepare_output(config(tmp_path, resume=True), resumed_at=2)
    assert (out / "medgpt.json").exists()  # resuming continues the same run
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    common.prepare_output(config(tmp_path))
    assert not (out / "medgpt.json").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_resume_after_a_kill_logs_each_step_once_and_at_max_steps_trains_nothing(tiny_model, tmp_path, sample_data):
    from medgpt.data.rows import read_log
    from medgpt.train import load_config, run_training

    out = tmp_path / "sft"
    options = {"model": tiny_model, "output_dir": str(out), "method": "lora", "max_length": 128,
               "data": str(sample_data / "sft" / "medical_sft.jsonl"), "max_samples": 16, "max_steps": 4,
               "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2,
               "save_total_limit": 3, "eval_strategy": "no", "report_to": "none", "report_prompts": "none"}
    example = Path(__file__).resolve().parents[1] / "examples" / "sft_smollm2.yaml"
    run_training(load_config(example, options))
    steps = [r["step"] for r in read_log(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]
    # killed after logging steps 3-4 but before checkpoint-4 and the final save were written
    import shutil

    shutil.rmtree(out / "checkpoint-4")
    (out / "medgpt.json").unlink()
    resumed = run_training(load_config(example, {**options, "resume": True}))
    rows = read_log(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # steps 3-4 logged once, by the resumed run
    losses = [r["loss"] for r in rows if "loss" in r]
    assert resumed["train_loss"] == pytest.approx(sum(losses) / 4)  # the whole run, not the resumed half
    adapter = (out / "adapter_model.safetensors").read_bytes()
    again = run_training(load_config(example, {**options, "resume": True}))  # checkpoint-4 is at max_steps
    assert (out / "adapter_model.safetensors").read_bytes() == adapter  # nothing trained
    assert again["global_step"] == 4 and again["train_loss"] == pytest.approx(resumed["train_loss"])
    assert [r["step"] for r in read_log(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_the_lora_config_names_the_models_layers_for_a_target_it_lacks(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from medgpt.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg = config(tmp_path, model=tiny_model, lora_target="q_proj,nonexistent")
    with pytest.raises(UserError, match=r"lora_target nonexistent: no layer of .*o_proj"):
        common.peft_config(cfg, model=model)
    assert common.peft_config(config(tmp_path, model=tiny_model, lora_target="q_proj"), model=model) is not None


def test_a_named_template_whose_markers_the_tokenizer_splits_is_an_error_unless_allowed(tiny_model, tmp_path,
                                                                                         caplog):
    from medgpt.errors import UserError
    from medgpt.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model)
    assert common.training_template(config(tmp_path, model=tiny_model, template="chatml"), tokenizer).name == "chatml"
    with pytest.raises(UserError, match=r"template 'qwen3': .*<think> -> '<' \+ 'think' \+ '>'.*allow_split_markers"):
        common.training_template(config(tmp_path, model=tiny_model, template="qwen3"), tokenizer)
    allowed = config(tmp_path, model=tiny_model, template="qwen3", allow_split_markers=True)
    assert common.training_template(allowed, tokenizer).name == "qwen3"
    assert "</think>" in caplog.text
