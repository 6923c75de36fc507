"""medgpt.train, every stage on the tiny model: each stage's own learning signal (pt, rm, dpo, orpo, kto, grpo),
read from metrics.jsonl. PT's blocks are checked in test_train_pt.py, the rewards in test_train_rewards.py,
`medgpt score` in test_commands_score.py, the LM head the loss reads in test_train_lm_head.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _stage_runs import TOPICS, keyword_pairs, train, write_jsonl


def series(rows: list[dict], key: str) -> list[float]:
    return [row[key] for row in rows if key in row]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_pt_loss_goes_down(tiny_model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"The patient with {t} should rest and drink water.\n" for t in TOPICS), encoding="utf-8")
    rows = train("pt", tiny_model, tmp_path / "out", str(corpus), method="full", block_size=32, max_length=None,
                 max_steps=6, learning_rate=1e-2, val_size=2)
    losses = series(rows, "loss")
    assert mean(losses[-2:]) < losses[0] - 1.0
    final = json.loads((tmp_path / "out" / "final_metrics.json").read_text())
    assert final["eval_perplexity"] == pytest.approx(2.718281828 ** final["eval_loss"], rel=1e-3)


def test_rm_learns_pairwise_preference(reward_model):
    from transformers import AutoTokenizer

    from medgpt.data.templates import get_template

    folder, rows = reward_model
    before, *_, after = series(rows, "eval_accuracy")
    margins = series(rows, "eval_margin")
    assert after == 1.0 and margins[-1] > margins[0] + 1.0
    assert mean(series(rows, "accuracy")[-3:]) == 1.0
    # the named template was rendered by TRL and is saved with the model
    assert AutoTokenizer.from_pretrained(folder).chat_template == get_template("chatml").chat_template()


@pytest.mark.slow
def test_dpo_margins_grow(tiny_model, tmp_path):
    long = write_jsonl(tmp_path / "long.jsonl", [{"question": "Tell me everything.", "response_chosen": "word " * 100,
                                                  "response_rejected": "no"}])
    data = f"{keyword_pairs(tmp_path / 'pairs.jsonl')},{long}"
    rows = train("dpo", tiny_model, tmp_path / "out", data, max_steps=8, learning_rate=5e-3, beta=0.1,
                 loss_type="sigmoid")
    stats = json.loads((tmp_path / "out" / "data_stats.json").read_text())["train"]
    assert (stats["read"], stats["kept"], stats["dropped"]) == (13, 12, {"longer than max_length": 1})
    assert stats["examples"]["longer than max_length"] == [f"{long}:1"]
    margins = series(rows, "rewards/margins")
    assert margins[0] == pytest.approx(0.0, abs=1e-3)  # the adapter starts at zero: policy == reference
    assert mean(margins[-2:]) > 0.5
    assert mean(series(rows, "rewards/accuracies")[-2:]) == 1.0


@pytest.mark.slow
def test_orpo_odds_ratio_term_raises_the_odds_of_the_chosen_reply(tiny_model, tmp_path):
    """TRL's ORPO logs `log_odds_chosen` (the mean log odds ratio of chosen over rejected), `log_odds_ratio` (the
    mean log-sigmoid of it, the term `beta` weighs) and `rewards/margins` (beta times the log-probability gap).
    The untrained model has no preference (log-sigmoid(0) = -ln 2); the supervised loss on the chosen reply alone
    (beta 0) raises its odds a little, the odds-ratio term clearly more."""
    data = keyword_pairs(tmp_path / "pairs.jsonl")
    runs = {beta: train("orpo", tiny_model, tmp_path / f"beta{beta}", data, method="full", max_steps=8,
                        learning_rate=3e-3, beta=beta) for beta in (0.0, 0.5)}
    rows = runs[0.5]
    losses, odds = series(rows, "loss"), series(rows, "log_odds_chosen")
    assert mean(losses[-2:]) < losses[0] - 1.0
    assert series(rows, "log_odds_ratio")[0] == pytest.approx(-math.log(2), abs=0.1)
    assert mean(series(rows, "log_odds_ratio")[-2:]) > series(rows, "log_odds_ratio")[0] + 0.2
    assert mean(odds[-2:]) > odds[0] + 0.5
    assert mean(series(rows, "rewards/margins")[-2:]) > 0.2 and series(rows, "rewards/accuracies")[-1] == 1.0
    assert mean(odds[-2:]) > mean(series(runs[0.0], "log_odds_chosen")[-2:]) + 0.2


@pytest.mark.slow
def test_kto_loss_goes_down_on_pairs_and_unpaired_rows(tiny_model, tmp_path):
    pairs = keyword_pairs(tmp_path / "pairs.jsonl")
    unpaired = write_jsonl(tmp_path / "unpaired.jsonl", [
        {"prompt": f"Is my {t} serious?", "completion": f"See a doctor about the {t}." if good else f"Ignore the {t}.",
         "label": good} for t, good in zip(TOPICS[:8], [True, False] * 4)])
    rows = train("kto", tiny_model, tmp_path / "out", f"{pairs},{unpaired}", method="full", max_steps=8,
                 learning_rate=3e-3, beta=0.1)
    losses = series(rows, "loss")
    assert losses[0] == pytest.approx(0.5, abs=1e-3)  # policy == reference at the start
    assert mean(losses[-2:]) < 0.45
    assert mean(series(rows, "rewards/margins")[-2:]) > 0.5


def stopping_model(folder: Path, tokenizer_from: str) -> str:
    """A tiny random Phi (its LM head has a bias) that ends a reply after each token with probability 0.15,
    so sampled replies differ in length, as a pretrained model's do (a uniform random model never stops)."""
    import math

    import torch
    from transformers import AutoTokenizer, PhiConfig, PhiForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    model = PhiForCausalLM(PhiConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=512, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[tok.eos_token_id] = math.log(0.15 / 0.85 * len(tok))
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_grpo_mean_reward_goes_up(tiny_model, tmp_path):
    model = stopping_model(tmp_path / "model", tiny_model)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"query": f"Tell me about {t}."} for t in TOPICS])
    rows = train("grpo", model, tmp_path / "out", prompts, max_length=None, reward_fn="length",
                 reward_kwargs={"target_chars": 5}, num_generations=4, max_completion_length=8, max_steps=10,
                 learning_rate=1e-2, method="full")
    rewards = series(rows, "reward")
    assert mean(rewards[-3:]) > mean(rewards[:3]) + 0.15  # shorter replies: the model learns to stop early
