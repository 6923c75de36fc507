"""`parity: true` in a pipeline: the final model is checked across runtimes after training, RUN/parity.json is
written and the report shows the table."""

from __future__ import annotations

import json

import pytest

from medgpt.errors import UserError
from medgpt.pipeline import build_pipeline, run_pipeline


def config(model, sample_data, run_dir, prompts) -> dict:
    return {"output_dir": str(run_dir), "model": model, "per_device_train_batch_size": 2, "logging_steps": 1,
            "report_to": "none", "report_max_new_tokens": 4, "eval_sets": "none", "report_prompts": str(prompts),
            "parity": True, "template": "chatml",
            "stages": [{"stage": "sft", "data": str(sample_data / "sft" / "medical_sft.jsonl"), "max_length": 128,
                        "max_steps": 1}]}


@pytest.mark.slow
def test_parity_of_the_final_model_is_in_the_report(tiny_model, sample_data, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"query": "发烧怎么办？"}, ensure_ascii=False) + "\n", encoding="utf-8")
    run_dir = tmp_path / "run"
    run_pipeline(build_pipeline(config(tiny_model, sample_data, run_dir, prompts)))
    result = json.loads((run_dir / "parity.json").read_text())
    assert result["prompts"] == 1 and result["model"] == str(run_dir / "sft" / "merged")
    ran = {p["candidate"] for p in result["pairs"] if not p["skipped"]}
    assert {"medgpt engine (model, fp32)", "GGUF f16 (transformers GGUF loader)",
            "GGUF q8_0 (transformers GGUF loader)"} <= ran  # llama.cpp and vLLM where installed
    md = (run_dir / "report.md").read_text()
    assert "## Parity across runtimes" in md
    assert "| model (transformers, fp32) vs GGUF f16 (transformers GGUF loader) | f16 |" in md


def test_parity_must_be_a_boolean(tiny_model, sample_data, tmp_path):
    raw = config(tiny_model, sample_data, tmp_path / "run", tmp_path / "p.jsonl")
    with pytest.raises(UserError, match="parity 'yes': expected true or false"):
        build_pipeline({**raw, "parity": "yes"})
