"""A reply read as it streams (`ReplyReader`) joins to `reply_parts` of the whole reply, however the text is cut
into chunks (tags split across chunks never reach the answer), and the prompt's think state is read from the
rendered prompt: Qwen3's official template (tests/fixtures/chat_templates/qwen3.jinja) closes the think block with
enable_thinking false and leaves it to the reply otherwise."""

from __future__ import annotations

import random

import pytest
from test_data_templates_reasoning import official

from medgpt.data.messages import reply_parts
from medgpt.data.templates import get_template
from medgpt.infer.reasoning import ReplyReader, prompt_think_state, read_reply, reply_reader

REPLIES = [
    "<think>\nFever over 38 C.\n</think>\n\nSee a doctor.",
    "<think>\n\n</think>\n\nAn answer after an empty think block.",
    "<think>a thought cut short",
    "<think>\nline one\n\nline two\n",
    "Plain answer, no reasoning at all.",
    "reasoning without an opening tag</think>\n\nthe answer",
    "\n<think>x</think>y",
    "<thi",
    "",
    "答案：<think>先想一想</think>\n\n发热",
    "<think>\n思考：体温 38.5°C。\n</think>\n\n建议就医。",
]


def chunked(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))) if len(text) > 1 else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("opened", [False, True])
def test_streamed_parts_join_to_reply_parts(opened):
    rng = random.Random(0)
    for text in REPLIES:
        if opened and "<think>" in text and not text.lstrip().startswith("<think>"):
            continue  # after an opened prompt, reasoning streams from the first character: a later <think> is late
        expected = reply_parts(text, opened)
        for _ in range(40):
            reader = ReplyReader(opened)
            got, order = ["", ""], []
            for chunk in [*chunked(text, rng), None]:
                reasoning, answer = reader.finish() if chunk is None else reader.feed(chunk)
                got[0] += reasoning
                got[1] += answer
                order += ["r"] * bool(reasoning) + ["a"] * bool(answer)
            assert (got[0], got[1]) == ((expected[0] or ""), expected[1]), (text, opened)
            assert order == sorted(order, key="ra".index), order  # all reasoning before any answer
            assert "<think>" not in got[1] and "</think>" not in got[1] or "</think>" in expected[1]


def test_one_character_at_a_time_holds_only_what_is_undecided():
    reader = ReplyReader()
    out = [reader.feed(ch) for ch in "<think>\nab\n</think>\n\ncd"]
    assert "".join(r for r, _ in out) == "ab" and "".join(a for _, a in out) == "cd"
    assert out[len("<think>\na") - 1] == ("a", "")  # reasoning streams as it comes
    plain = ReplyReader()
    assert [plain.feed(ch) for ch in "hi"] == [("", ""), ("", "")] and plain.finish() == ("", "hi")


def test_prompt_think_state_from_the_official_template():
    qwen3 = get_template("qwen3")
    question = [{"role": "user", "content": "发热怎么办？"}]
    thinking, not_thinking = official(question, True), official(question, True, enable_thinking=False)
    assert qwen3.render(question, add_generation_prompt=True) == thinking
    assert qwen3.render(question, add_generation_prompt=True, enable_thinking=False) == not_thinking
    assert prompt_think_state(qwen3, thinking) is None
    assert prompt_think_state(qwen3, not_thinking) == "closed"
    assert prompt_think_state(qwen3, thinking + "<think>\n") == "opened"  # DeepSeek-R1's generation prompt
    assert prompt_think_state(get_template("chatml"), thinking + "<think>\n") is None  # no reasoning format


def test_reply_reader_of_encoded_prompts(tokenizer):
    qwen3, chatml = get_template("qwen3"), get_template("chatml")
    question = [{"role": "user", "content": "What is a fever?"}]
    ids = qwen3.encode_prompt(tokenizer, question)
    reader = reply_reader(qwen3, tokenizer, ids)
    assert reader is not None and not reader.opened
    assert read_reply("<think>\nhot\n</think>\n\nA high temperature.", reader) == ("hot", "A high temperature.", True)
    assert read_reply("<think>\nhot and", reader) == ("hot and", "", False)  # cut inside its reasoning
    assert reply_reader(qwen3, tokenizer, qwen3.encode_prompt(tokenizer, question, enable_thinking=False)) is None
    assert reply_reader(chatml, tokenizer, chatml.encode_prompt(tokenizer, question)) is None
    assert read_reply("<think>x</think>y", None) == (None, "<think>x</think>y", True)


def test_web_page_folds_the_reasoning_and_leaves_it_out_of_the_history():
    from medgpt.infer.webui import history_messages, shown_reply

    shown = shown_reply("Is it </details> <b>a fever</b>?\nYes.", "See a doctor.")
    assert shown.startswith("<details><summary>Reasoning</summary>") and "<details open" not in shown
    assert shown.endswith("</details>\n\nSee a doctor.") and "&lt;/details&gt;" in shown  # escaped: one block
    assert shown_reply("", "Plain.") == "Plain."
    page = [{"role": "user", "content": "Fever?"}, {"role": "assistant", "content": shown + "\n\n*(cut at 9 tokens)*"}]
    assert history_messages(page) == [{"role": "user", "content": "Fever?"},
                                      {"role": "assistant", "content": "See a doctor."}]
