"""`medgpt.data.messages`: the checks of canonical messages and the one system-prompt rule, as every stage applies
it. The reference for what a stage trains on is the text the trainer itself renders: SFT's token ids decoded,
and for the TRL stages the rows rendered by transformers' `apply_chat_template` with the chat template set on the
tokenizer (Jinja, not medgpt's renderer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medgpt.data.messages import check_messages, check_tools, split_system, with_system
from medgpt.errors import UserError
from medgpt.train import build_config

OWN, CONFIGURED = "Own rule: answer in one line.", "Configured rule: be brief."
QUESTIONS = ("What lowers a fever?", "How is asthma treated?")


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def data_files(tmp_path: Path) -> dict[str, str]:
    """The same two records as conversations and as preference pairs: the first with its own system prompt."""
    systems = (OWN, "")
    sft = [{"messages": ([{"role": "system", "content": s}] if s else [])
            + [{"role": "user", "content": q}, {"role": "assistant", "content": "Rest and fluids."}]}
           for s, q in zip(systems, QUESTIONS)]
    pref = [{"system": s, "question": q, "response_chosen": "See a doctor.", "response_rejected": "Ignore it."}
            for s, q in zip(systems, QUESTIONS)]
    return {"conversations": write_jsonl(tmp_path / "sft.jsonl", sft), "pairs": write_jsonl(tmp_path / "pref.jsonl", pref)}


def config(stage: str, model: str, data: str, tmp_path: Path, **options):
    return build_config({"stage": stage, "model": model, "data": data, "template": "chatml", "system": CONFIGURED,
                         "output_dir": str(tmp_path / stage), "report_to": "none", **options})


def rendered_texts(stage: str, model: str, files: dict[str, str], tmp_path: Path) -> list[str]:
    """What the stage's trainer sees of each record, as text."""
    from medgpt.models import load_tokenizer
    from medgpt.train import grpo, kto, ppo, prefs, sft

    tokenizer = load_tokenizer(model)
    if stage == "sft":
        train, _, _ = sft.build_datasets(config(stage, model, files["conversations"], tmp_path), tokenizer)
        return [tokenizer.decode(row["input_ids"]) for row in train]
    if stage == "ppo":
        cfg = config(stage, model, files["conversations"], tmp_path, reward_fn="length")
        prompts, _ = ppo.read_rollout_prompts(cfg, tokenizer)
        return [tokenizer.decode(p["ids"]) for p in prompts]
    build = {"grpo": grpo.prompt_datasets, "kto": kto.unpaired_datasets}.get(stage, prefs.conversation_datasets)
    data = files["conversations"] if stage == "grpo" else files["pairs"]
    train, _, _ = build(config(stage, model, data, tmp_path), tokenizer)
    return [tokenizer.apply_chat_template(row["prompt"], tokenize=False) for row in train]


@pytest.mark.parametrize("stage", ["sft", "dpo", "orpo", "kto", "rm", "grpo", "ppo"])
def test_every_stage_gives_a_record_its_own_system_prompt_else_the_configured_one(stage, tiny_model, tmp_path):
    texts = rendered_texts(stage, tiny_model, data_files(tmp_path), tmp_path)
    by_question = {q: [t for t in texts if q in t] for q in QUESTIONS}
    assert all(by_question.values())
    for text in by_question[QUESTIONS[0]]:  # its own system prompt wins
        assert f"<|im_start|>system\n{OWN}<|im_end|>" in text and CONFIGURED not in text
    for text in by_question[QUESTIONS[1]]:  # none of its own: the configured one fills in
        assert f"<|im_start|>system\n{CONFIGURED}<|im_end|>" in text and OWN not in text


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_the_length_filter_measures_exactly_the_trained_text(stage, tiny_model, tmp_path):
    """A record exactly max_length tokens long (counted on what the trainer renders) is kept; one token less of
    budget drops it."""
    from medgpt.data.stats import DataStats
    from medgpt.models import load_tokenizer
    from medgpt.train import prefs, sft

    tokenizer = load_tokenizer(tiny_model)
    files = data_files(tmp_path)
    if stage == "sft":
        train, _, _ = sft.build_datasets(config(stage, tiny_model, files["conversations"], tmp_path), tokenizer)
        lengths = [len(row["input_ids"]) for row in train]
    else:
        train, _, _ = prefs.conversation_datasets(config(stage, tiny_model, files["pairs"], tmp_path), tokenizer)
        lengths = [max(len(tokenizer(tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False),
                                     add_special_tokens=False)["input_ids"]) for key in ("chosen", "rejected"))
                   for row in train]
    data = files["conversations"] if stage == "sft" else files["pairs"]
    for budget, kept in ((max(lengths), 2), (max(lengths) - 1, 1)):
        cfg = config(stage, tiny_model, data, tmp_path, max_length=budget)
        build = sft.build_datasets if stage == "sft" else prefs.conversation_datasets
        rows, _, stats = build(cfg, tokenizer)
        assert len(rows) == kept, (budget, lengths)
        assert isinstance(stats["train"], DataStats) and sum(stats["train"].dropped.values()) == 2 - kept


def test_split_system_and_with_system_follow_one_rule():
    own = [{"role": "system", "content": OWN}, {"role": "user", "content": "Hi"}]
    bare = own[1:]
    assert split_system(own, CONFIGURED, "default") == (OWN, bare)
    assert split_system(bare, CONFIGURED, "default") == (CONFIGURED, bare)
    assert split_system(bare, None, "default") == ("default", bare)
    assert split_system(bare, "", "default") == ("", bare)  # "": no system prompt at all
    assert with_system(own, CONFIGURED) == own and with_system(bare, CONFIGURED)[0]["content"] == CONFIGURED
    assert with_system(bare, None) == bare == with_system(bare, "")


@pytest.mark.parametrize("messages, error", [
    ([], "non-empty list"),
    ([{"role": "doctor", "content": "x"}], "message 0: expected"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "message 1: a system message may only"),
    ([{"role": "user", "content": "x", "tool_calls": []}], "only an assistant message may carry tool_calls"),
    ([{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}}]}], "tool call 0"),
])
def test_bad_messages_get_their_error(messages, error):
    with pytest.raises(UserError, match=error):
        check_messages(messages)


def test_a_prompt_ends_with_the_user_or_a_tool_result():
    check_messages([{"role": "user", "content": "x"}], prompt=True)
    with pytest.raises(UserError, match="last message must come from the user"):
        check_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], prompt=True)
    assert check_tools([]) is None
    with pytest.raises(UserError, match="tools: tool 0"):
        check_tools([{"type": "function"}])
