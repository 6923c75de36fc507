"""A reasoning model's reply read apart: its reasoning (the think block) and its answer, whole or as it streams.

Only a template with a reasoning format (`Template.think`, Qwen3's) splits replies; with any other template a
reply is all answer. What the prompt did with the think block decides how the reply is read: a prompt that opened
one (DeepSeek-R1's `<｜Assistant｜><think>\\n`) makes the reply's start reasoning until `</think>`; a prompt that
closed one (Qwen3 with `enable_thinking: false`: an empty think block ends the prompt) makes the whole reply the
answer; otherwise the reply is read by `medgpt.data.messages.reply_parts` as it comes.

`ReplyReader.feed` hands out the reasoning and answer text as it becomes certain: a `<think>`/`</think>` split
across chunks is held back until it is whole, and a reply that does not open with `<think>` is held until a
`</think>` or its end says which it is. The pieces it hands out join to `reply_parts` of the whole text wherever
the reply has at most one `</think>` and at most one `<think>`, not after reasoning already handed out (after an
opened prompt: only at its start); a reply with more can only be read once it is whole.

Standard library only.
"""

from __future__ import annotations

from typing import Any

from medgpt.data.messages import reply_parts

OPEN, CLOSE = "<think>", "</think>"


def prompt_think_state(template: Any, prompt_text: str) -> str | None:
    """How a prompt leaves the think block: "opened", "closed", or None (the reply decides); None too for a
    template without a reasoning format."""
    think = getattr(template, "think", ()) or ()
    if not think:
        return None
    tail = prompt_text.rstrip()
    if tail.endswith(think[0].strip()):
        return "opened"
    if tail.endswith(think[1].strip()):
        return "closed"
    return None


def reply_reader(template: Any, tokenizer: Any, prompt_ids: list[int]) -> ReplyReader | None:
    """The reader of the reply to `prompt_ids` (rendered by `template`), None where the reply is all answer: a
    template without a reasoning format, or a prompt that closed the think block."""
    if not (getattr(template, "think", ()) or ()):
        return None
    tail = tokenizer.decode(prompt_ids[-16:], skip_special_tokens=False)
    state = prompt_think_state(template, tail)
    return None if state == "closed" else ReplyReader(opened=state == "opened")


def read_reply(text: str, reader: ReplyReader | None) -> tuple[str | None, str, bool]:
    """(reasoning, answer, complete) of a whole reply; without a reader, (None, text, True)."""
    return reader.parts(text) if reader is not None else (None, text, True)


def _partial_tag(text: str) -> int:
    """How many trailing characters of `text` could still become `<think>` or `</think>`."""
    for n in range(len(CLOSE) - 1, 0, -1):
        if text.endswith(CLOSE[:n]) or text.endswith(OPEN[:n]):
            return n
    return 0


class ReplyReader:
    """Reads one reply as its text arrives: `feed(delta)` and then `finish()` return (reasoning, answer) text
    that is certain by then; `parts(text)` is `reply_parts` with this prompt's `opened`."""

    def __init__(self, opened: bool = False):
        self.opened = opened
        self.text = ""
        self.sent = ["", ""]  # the reasoning and the answer handed out so far

    def parts(self, text: str) -> tuple[str | None, str, bool]:
        return reply_parts(text, self.opened)

    def feed(self, delta: str) -> tuple[str, str]:
        self.text += delta
        return self._emit(*self._certain())

    def finish(self) -> tuple[str, str]:
        reasoning, answer, _ = self.parts(self.text)
        return self._emit(reasoning or "", answer)

    def _certain(self) -> tuple[str, str]:
        """The reasoning and answer that no later text can change (where the reply keeps to one block)."""
        text = self.text
        if CLOSE in text:
            reasoning, answer, _ = self.parts(text)
            return reasoning or "", answer[:len(answer) - _partial_tag(answer)]
        if self.opened or text.lstrip().startswith(OPEN):
            body = text.split(OPEN)[-1].lstrip("\n")
            return body[:len(body) - _partial_tag(body)].rstrip("\n"), ""
        return "", ""  # not yet known whether this is reasoning (a `</think>` follows) or the answer

    def _emit(self, reasoning: str, answer: str) -> tuple[str, str]:
        out = []
        for k, whole in enumerate((reasoning, answer)):
            sent = self.sent[k]
            if len(whole) > len(sent) and whole.startswith(sent):
                out.append(whole[len(sent):])
                self.sent[k] = whole
            else:
                out.append("")
        return out[0], out[1]
