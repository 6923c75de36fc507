"""`medgpt.data.messages` and reasoning: only an assistant message carries `reasoning`, a string; `split_think` reads
a `<think>` block as Qwen3's official template does (its expressions, applied to the same strings, give the same
parts); `without_reasoning` removes both forms."""

from __future__ import annotations

import pytest

from medgpt.data.messages import check_messages, split_think, without_reasoning
from medgpt.errors import UserError


def test_only_an_assistant_message_carries_reasoning():
    check_messages([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning": "r"}])
    for bad in ({"role": "user", "content": "Q", "reasoning": "r"}, {"role": "assistant", "content": "A",
                                                                      "reasoning": ["r"]}):
        with pytest.raises(UserError, match="only an assistant message may carry reasoning"):
            check_messages([bad])


@pytest.mark.parametrize("content", ["<think>\nr\n</think>\n\nA", "<think>r</think>A", "r</think>A", "no think",
                                     "x<think>\n\nr\n\n</think>\n\n\nA", "<think>a</think>b</think>c"])
def test_split_think_reads_as_the_official_template(content):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # the two expressions of tests/fixtures/chat_templates/qwen3.jinja that read a <think> block from the content
    official = ImmutableSandboxedEnvironment().from_string(
        "{{ c.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') }}\x00"
        "{{ c.split('</think>')[-1].lstrip('\\n') }}").render(c=content).split("\x00")
    assert split_think(content) == (tuple(official) if "</think>" in content else None)


def test_without_reasoning():
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning": "r"},
                {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>\nr2\n</think>\n\nA2"}]
    assert without_reasoning(messages) == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                                           {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]


def test_reply_parts_splits_a_generated_reply():
    """The reading of vLLM's qwen3/deepseek_r1 reasoning parsers: the thought before `</think>`, the answer after."""
    from medgpt.data.messages import reply_parts

    assert reply_parts("<think>\nweigh A and B\n</think>\n\nAnswer: B") == ("weigh A and B", "Answer: B", True)
    # a prompt that opened the block (deepseek-r1 style): the reply starts inside the reasoning
    assert reply_parts("weigh\n</think>\n\nB", opened=True) == ("weigh", "B", True)
    # cut inside its reasoning: unanswered, not scored on half a thought
    assert reply_parts("<think>\nthe dose is") == ("the dose is", "", False)
    assert reply_parts("the dose is", opened=True) == ("the dose is", "", False)
    assert reply_parts("Answer: C") == (None, "Answer: C", True)
    assert reply_parts("<think>\n\n</think>\n\nC") == ("", "C", True)
