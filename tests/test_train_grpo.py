"""medgpt.train.grpo: the prompts GRPO reads (multiple-choice rows with their answer letter, open questions with
their reference reply), and completions that end at the template's stop tokens (ids from the real tokenizer),
for transformers' generation and for vLLM's."""

from __future__ import annotations

import pytest
from _stage_runs import FAST, TOPICS, write_jsonl

from medgpt.data.records import read_prompts
from medgpt.errors import UserError
from medgpt.train import build_config


def test_grpo_reader_builds_mcq_and_open_prompts(sample_data, tmp_path):
    records, stats = read_prompts(str(sample_data / "mcq" / "val" / "physician_val.csv"), "prompts")
    assert stats.kept == len(records) == 24
    first = records[0]
    assert first["answer"] in "ABCD" and first["options"] == "ABCD"
    assert "\nA. " in first["prompt"][0]["content"] and first["prompt"][0]["content"].endswith("字母。")
    open_rows, _ = read_prompts(str(sample_data / "sft" / "medical_sft.jsonl"), "prompts", max_samples=3)
    assert all(r["prompt"][-1]["role"] == "user" and r["reference"] and r["answer"] is None for r in open_rows)
    bad = tmp_path / "bad.csv"
    bad.write_text("question,A,B,answer\nQ?,yes,no,C\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.csv:2: wrong type: \"answer\" is 'C', expected one of A, B"):
        read_prompts(str(bad), "prompts")


def test_grpo_ends_completions_at_the_template_stop_tokens(tiny_model, tmp_path):
    """chatml stops at <|im_end|> and <|im_start|>; the tiny model's own eos is <|im_end|> only. TRL's GRPOTrainer
    ends and masks completions at `eos_token_ids`, which must hold both (ids from the real tokenizer)."""
    from transformers import AutoTokenizer

    from medgpt.train import grpo

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    expected = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|im_start|>")}
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query": f"Tell me about {t}."} for t in TOPICS[:4]])
    raw = {"stage": "grpo", "model": tiny_model, "data": prompts, "output_dir": str(tmp_path / "out"), **FAST,
           "max_length": None, "num_generations": 4, "max_completion_length": 8, "max_steps": 1, "use_vllm": False}
    trainer, _ = grpo.build(build_config({k: v for k, v in raw.items() if v is not None}))
    assert set(trainer.eos_token_ids) == expected and len(expected) == 2
    assert set(trainer.generation_config.eos_token_id) == expected
    assert trainer.args.generation_kwargs is None  # transformers generation: no vLLM sampling keys

    vllm = build_config({k: v for k, v in {**raw, "template": "alpaca"}.items() if v is not None})
    vllm.train.use_vllm, vllm.train.generation_kwargs = True, {"min_tokens": 1}
    ids, strings = grpo.stops(vllm)  # alpaca's stop words are several tokens each for this tokenizer
    assert strings == ["</s>", "### Instruction:"]
    assert all(len(tokenizer.encode(w, add_special_tokens=False)) > 1 for w in strings)
    assert vllm.train.generation_kwargs == {"stop_token_ids": ids, "stop": strings, "min_tokens": 1}
    assert ids == [tokenizer.eos_token_id]
