"""Configs and runs of the training stages shared by several test files: the fast options every tiny run uses,
topics and keyword preference pairs, a stage run that returns its metrics log (test_train.py and the session's
trained reward model in conftest.py), and PPO's config (test_train_ppo.py, test_train_ppo_losses.py)."""

from __future__ import annotations

import json
from pathlib import Path

from medgpt.train import build_config, run_training

MAX_NEW_TOKENS = 16
FAST = dict(template="chatml", per_device_train_batch_size=4, logging_steps=1, activation_checkpointing=False,
            report_to="none", report_prompts="none", save_strategy="no", seed=0, max_length=64,
            lr_scheduler_type="constant", dtype="fp32")  # the same numbers on CPUs with and without native bf16
TOPICS = ["fever", "cough", "rash", "headache", "back pain", "sore throat", "dizziness", "nausea",
          "insomnia", "fatigue", "earache", "toothache"]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def keyword_pairs(path: Path) -> str:
    """Separable preferences: the chosen reply sends the patient to a doctor, the rejected one does not."""
    return write_jsonl(path, [{"question": f"What should I do about my {t}?",
                               "response_chosen": f"See a doctor about the {t}.",
                               "response_rejected": f"Ignore the {t}."} for t in TOPICS])


def train(stage: str, model: str, out: Path, data: str, **options) -> list[dict]:
    """Run a stage (options set to None are left unset) and return its metrics log."""
    raw = {"stage": stage, "model": model, "data": data, "output_dir": str(out), **FAST, **options}
    cfg = build_config({k: v for k, v in raw.items() if v is not None})
    run_training(cfg)
    assert (out / "medgpt.json").exists() and (out / "final_metrics.json").exists()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def ppo_config(model: str, out, sample_data, **overrides):
    raw = {"stage": "ppo", "model": model, "template": "chatml", "data": str(sample_data / "sft" / "medical_sft.jsonl"),
           "output_dir": str(out), "reward_fn": "short", "max_new_tokens": MAX_NEW_TOKENS, "max_prompt_length": 128,
           "rollout_batch_size": 8, "per_device_train_batch_size": 8, "ppo_epochs": 2, "learning_rate": 3e-4,
           "logging_steps": 1, "save_strategy": "no", "report_prompts": "none", "seed": 42, **overrides}
    return build_config(raw)
