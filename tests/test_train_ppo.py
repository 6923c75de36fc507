"""PPO on the tiny model (medgpt.train.ppo): the reward goes up, an interrupted run resumes exactly where it
stopped, replies end at stop tokens and multi-token stop strings (checked against the real tokenizer's own
decoding), unscored replies are left out of the update, and bad options are user errors. PPO's formulas (GAE, the
KL controller, the clipped losses) are checked in test_train_ppo_losses.py, the reward functions in
test_train_rewards.py."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from _stage_runs import MAX_NEW_TOKENS, ppo_config

from medgpt.errors import UserError
from medgpt.train import ppo
from medgpt.train.rewards import REWARD_FUNCTIONS


def short_answers(completion_ids, **_):
    """1 for a reply that ends at once, falling to 0 for one cut off at MAX_NEW_TOKENS."""
    return [1 - len(ids) / MAX_NEW_TOKENS for ids in completion_ids]


def odd_tokens(completion_ids, **_):
    """The share of a reply's token ids that are odd: a reward that changes with every sampled token, so two runs
    agree on it only when they sampled the same replies."""
    return [sum(t % 2 for t in ids) / max(1, len(ids)) for ids in completion_ids]


class Interrupted(Exception):
    pass


@pytest.fixture
def one_thread():
    """PPO on the tiny model is many small ops: one thread beats two contending ones, and is repeatable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stopping_model(tiny_model, tmp_path_factory) -> str:
    """The tiny model, able to end its replies.

    Its <|im_end|> embedding is the zero padding row and its logits are nearly flat over 49k tokens, so it
    never stops. A random <|im_end|> row (tied to the output layer) gives that token a logit that varies
    with the context, as in a trained model: when to stop is then something LoRA can learn.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-stopping")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    embeddings = model.get_input_embeddings().weight
    row = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(1)) * 0.5
    with torch.no_grad():
        embeddings[tokenizer.eos_token_id] = row
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_ppo_learns_to_give_short_answers(stopping_model, sample_data, tmp_path, monkeypatch, one_thread):
    monkeypatch.setitem(REWARD_FUNCTIONS, "short", short_answers)
    out = tmp_path / "ppo"
    result = ppo.run(ppo_config(stopping_model, out, sample_data, max_steps=12))

    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert {"reward", "kl", "entropy", "value_loss", "policy_loss", "clip_frac", "approx_kl"} <= rows[0].keys()
    rewards = [r["reward"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.25, rewards
    assert rows[-1]["response_length"] < rows[0]["response_length"]
    assert rows[-1]["kl"] > 0  # it moved away from the reference, which the penalty measures
    assert result["global_step"] == 12

    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer_config.json").exists()
    meta = json.loads((out / "medgpt.json").read_text())
    assert (meta["stage"], meta["complete"], meta["template"]) == ("ppo", True, "chatml")
    assert list((out / "runs").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_interrupted_ppo_resumes_where_it_stopped(tiny_model, sample_data, tmp_path, monkeypatch, one_thread, caplog):
    """A run cut off in step 3 and resumed from checkpoint-2 logs the same step 3 as an uninterrupted run. The
    reward depends on every sampled token, so equal rewards mean equal samples (a constant reward would not)."""
    calls = []

    def odd_then_crash(completion_ids, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted
        return odd_tokens(completion_ids)

    small = {"max_steps": 3, "rollout_batch_size": 4, "per_device_train_batch_size": 4, "max_new_tokens": 8,
             "save_strategy": "steps", "save_steps": 1, "report_to": "none", "reward_fn": "odd"}
    monkeypatch.setitem(REWARD_FUNCTIONS, "odd", odd_tokens)
    ppo.run(ppo_config(tiny_model, tmp_path / "whole", sample_data, **small))
    whole = metrics(tmp_path / "whole")
    assert all(r["reward_std"] > 0 for r in whole) and len({r["reward"] for r in whole}) == 3  # it varies

    out = tmp_path / "cut"
    monkeypatch.setitem(REWARD_FUNCTIONS, "odd", odd_then_crash)
    with pytest.raises(Interrupted):
        ppo.run(ppo_config(tiny_model, out, sample_data, **small))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "medgpt.json").exists()

    monkeypatch.setitem(REWARD_FUNCTIONS, "odd", odd_tokens)
    with caplog.at_level(logging.INFO, logger="medgpt"):
        ppo.run(ppo_config(tiny_model, out, sample_data, resume=True, **small))
    assert any("resumed from" in r.getMessage() and "checkpoint-2" in r.getMessage() for r in caplog.records)
    resumed = metrics(out)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in ("reward", "reward_std", "kl", "policy_loss", "value_loss", "learning_rate", "kl_coef"):
        assert resumed[2][key] == pytest.approx(whole[2][key], rel=1e-3, abs=1e-6), key
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert json.loads((out / "medgpt.json").read_text())["complete"] is True


def test_cut_response_at_stop_tokens_and_multi_token_stop_strings(tiny_model):
    """Cut points checked against the real tokenizer's own decoding: alpaca's "### Instruction:" is three tokens
    in SmolLM2's vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    reply, stop, rest = encode("Rest and drink fluids.\n\n"), encode("### Instruction:"), encode(" more")
    assert len(stop) == 3
    eos, strings = tokenizer.eos_token_id, ["</s>", "### Instruction:"]
    kept, n, done = ppo.cut_response(reply + stop + rest + [eos, eos], tokenizer, {eos}, strings)
    assert (kept, n, done) == (reply + stop, len(reply), True)
    assert tokenizer.decode(kept).endswith("### Instruction:") and "###" not in tokenizer.decode(kept[:n])
    assert ppo.cut_response(reply + [eos, eos], tokenizer, {eos}, strings) == (reply + [eos], len(reply), True)
    assert ppo.cut_response(reply + rest, tokenizer, {eos}, strings) == (reply + rest, len(reply + rest), False)
    glued = encode("fluids.###")  # the stop string starts inside a token: the reply ends before that token
    kept, n, done = ppo.cut_response(glued + encode(" Instruction:"), tokenizer, {eos}, strings)
    assert done and "###" not in tokenizer.decode(kept[:n]) and tokenizer.decode(kept).endswith("Instruction:")


def test_rollout_stops_on_stop_strings_and_leaves_unscored_replies_out(tiny_model, sample_data, tmp_path,
                                                                        monkeypatch, one_thread):
    """One rollout on the tiny model whose sampled rows are fixed: a row ending in a multi-token stop string, one
    ending in eos, one cut off at the length limit. Rewards see each reply without its stop; the row no reward
    applies to (both functions return None) is masked out of the update; a single None is left out of the sum."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    first, stop, second, third = (encode("Rest and drink fluids.\n\n"), encode("### Instruction:"),
                                  encode("Take it with food."), encode("word " * 16))
    rows = [first + stop + encode(" more"), second + [eos], third]
    width = len(third)  # the longest: generate() pads the others after their stop
    rows = [r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows]
    seen: dict = {}
    monkeypatch.setitem(REWARD_FUNCTIONS, "first", lambda completions, **_: [1.0, None, None])
    monkeypatch.setitem(REWARD_FUNCTIONS, "second", lambda completions, **_: (
        seen.setdefault("texts", [c[0]["content"] for c in completions]) and [0.5, 0.25, None]))
    cfg = ppo_config(tiny_model, tmp_path, sample_data, template="alpaca", allow_split_markers=True, reward_fn="first,second",
                     rollout_batch_size=3, per_device_train_batch_size=3, max_new_tokens=4)
    agent = ppo.PPO(cfg)
    assert agent.stop_strings == ["</s>", "### Instruction:"] and agent.stop_ids == [eos]
    policy = agent.unwrapped.policy
    real = ppo.generate(policy, tokenizer, [agent.prompts[0]["ids"]], agent.args, agent.stop_ids, agent.stop_strings)
    assert len(real) == 1 and 1 <= len(real[0][0]) <= 4  # transformers takes the stop strings

    def fixed(input_ids, attention_mask, generation_config, **kwargs):
        seen.update(stop_strings=generation_config.stop_strings, tokenizer=kwargs.get("tokenizer"))
        return torch.cat([input_ids, torch.tensor(rows, device=input_ids.device)], 1)

    monkeypatch.setattr(policy, "generate", fixed)
    batch, stats = agent.rollout()
    assert seen["stop_strings"] == agent.stop_strings and seen["tokenizer"] is agent.tokenizer
    assert seen["texts"] == [tokenizer.decode(first), "Take it with food.", tokenizer.decode(third)]
    assert batch.mask.sum(1).tolist() == [len(first) + len(stop), len(second) + 1, 0]
    assert batch.scores.tolist() == [1.5, 0.25, 0.0]
    assert stats["scored"] == pytest.approx(2 / 3) and stats["finished"] == pytest.approx(2 / 3)
    assert stats["reward"] == pytest.approx((1.5 + 0.25) / 2)
    assert stats["response_length"] == pytest.approx((len(first) + len(stop) + len(second) + 1 + len(third)) / 3)
    assert batch.advantages[2].abs().sum() == 0 and batch.returns[2].abs().sum() == 0


@pytest.mark.parametrize("change, message", [
    ({"reward_fn": None}, "ppo needs a reward"),
    ({"mini_batch_size": 6, "per_device_train_batch_size": 4}, "not a multiple"),
    ({"rollout_batch_size": 2, "mini_batch_size": 4, "per_device_train_batch_size": 4}, "smaller than mini_batch_size"),
    ({"kl_coeff": 0.1}, "kl_coeff (did you mean kl_coef?)"),
])
def test_bad_ppo_options_are_user_errors(sample_data, tmp_path, change, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        ppo_config("unused", tmp_path, sample_data, **change)
