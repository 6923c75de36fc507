"""medgpt.train.grpo: completions that end at the template's stop tokens (ids from the real tokenizer), for
transformers' generation and for vLLM's. The prompts GRPO reads are checked in test_data_records.py."""

from __future__ import annotations

import pytest

from _stage_runs import FAST, TOPICS, write_jsonl

from medgpt.train import build_config


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


def test_enable_thinking_reaches_trls_chat_template_kwargs():
    """GRPOTrainer renders prompts with GRPOConfig.chat_template_kwargs: `enable_thinking` goes there, and a
    contradicting chat_template_kwargs is an error, not a silent choice."""
    from medgpt.errors import UserError

    cfg = build_config({"stage": "grpo", "template": "qwen3", "enable_thinking": False,
                        "chat_template_kwargs": {"custom": 1}})
    assert cfg.train.chat_template_kwargs == {"custom": 1, "enable_thinking": False}
    with pytest.raises(UserError, match="disagree"):
        build_config({"stage": "grpo", "enable_thinking": False, "chat_template_kwargs": {"enable_thinking": True}})
