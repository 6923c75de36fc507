"""Multi-turn chat state shared by the terminal chat and the web page, and the terminal loop itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from medgpt.infer.base import Augment, Completion, Engine, GenerationParams, engine_facts
from medgpt.infer.reasoning import read_reply

THOUGHT = "│ "  # opens each line of the reasoning the terminal shows before the answer
THINKING, ANSWERING = "(reasoning)\n" + THOUGHT, "(answer)\n"
HELP = "commands: /clear (forget the conversation), /system TEXT (set the system prompt), /exit (quit)"
EXIT = {"/exit", "/quit", "exit", "quit"}


@dataclass
class ChatSession:
    """The history of one conversation; `augment` (retrieval) sees the messages before each answer."""

    engine: Engine
    params: GenerationParams
    system: str | None = None
    augment: Augment | None = None
    history: list[dict] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)  # of the last answer
    completion: Completion | None = None  # the last answer: token count and finish reason ("length" = cut)
    unanswered: bool = False  # the last reply ended inside its reasoning

    def clear(self) -> None:
        self.history.clear()
        self.sources = []
        self.completion = None

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to `text` (without its reasoning, see `reply_parts`)."""
        parts = self.reply_parts(text)
        try:
            for kind, delta in parts:
                if kind == ANSWER:
                    yield delta
        finally:
            parts.close()

    def reply_parts(self, text: str) -> Iterator[tuple[str, str]]:
        """Stream the reply to `text` as (REASONING or ANSWER, delta), all reasoning first (a template without a
        reasoning format: all answer); the turn joins the history only when the reply is complete."""
        messages = [*self.history, {"role": "user", "content": text}]
        prompt, self.sources = self.augment(messages) if self.augment else (messages, [])
        self.completion = None
        raw = ""
        stream = self.engine.stream(prompt, self.params, system=self.system)
        reader = getattr(stream, "reader", None)
        try:
            for delta in stream:
                raw += delta
                if reader is None:
                    yield ANSWER, delta
                    continue
                yield from labelled(reader.feed(delta))
            if reader is not None:
                yield from labelled(reader.finish())
        finally:  # stopped early (Ctrl-C, a closed page): stop generating
            getattr(stream, "close", lambda: None)()
        self.completion = getattr(stream, "completion", None)
        reasoning, answer, complete = read_reply(raw, reader)
        self.unanswered = not complete
        turn = {"role": "assistant", "content": answer, **({"reasoning": reasoning} if reasoning else {})}
        self.history += [messages[-1], turn]


REASONING, ANSWER = "reasoning", "answer"


def labelled(parts: tuple[str, str]) -> Iterator[tuple[str, str]]:
    """A reader's (reasoning, answer) deltas as labelled pieces, the empty ones left out."""
    for kind, text in zip((REASONING, ANSWER), parts):
        if text:
            yield kind, text


def cut_note(completion: Completion | None) -> str:
    """"cut at N tokens" for an answer that ended at max_new_tokens rather than on its own, else ""."""
    if completion is None or completion.finish_reason != "length":
        return ""
    return f"cut at {completion.completion_tokens} tokens"


def format_sources(sources: list[dict]) -> str:
    """One line per source: the number the prompt gave it (`n`), its name (`source`, else `title` or `id`) and a
    short excerpt."""
    lines = []
    for i, s in enumerate(sources, 1):
        i = s.get("n", i)
        name = s.get("source") or s.get("title") or s.get("id") or "?"
        excerpt = " ".join(str(s.get("text", "")).split())[:100]
        lines.append(f"[{i}] {name}" + (f": {excerpt}" if excerpt else ""))
    return "\n".join(lines)


def describe_engine(engine: Engine) -> str:
    """One line of what is loaded (model, adapter, template, dtype, device), for the terminal."""
    return ", ".join(f"{key} {value}" for key, value in engine_facts(engine).items())


def describe_params(params: GenerationParams, origins: dict[str, str] | None = None) -> str:
    """One line of the sampling settings in effect and where each came from, for the terminal and the logs."""
    if params.temperature == 0:
        parts = ["greedy"]
    else:
        parts = [f"temperature {params.temperature:g}", f"top-p {params.top_p:g}"]
        parts += [f"top-k {params.top_k}"] if params.top_k else []
    parts.append(f"repetition penalty {params.repetition_penalty:g}")
    parts.append(f"max new tokens {params.max_new_tokens}")
    from_where = sorted(set((origins or {}).values()))
    return ", ".join(parts) + (f" (from {'; '.join(from_where)})" if from_where else "")


def run_chat(session: ChatSession, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """The terminal loop: read a line, stream the answer; /clear, /system, /exit; Ctrl-D ends it too."""
    import sys

    out = out or sys.stdout
    print(HELP, file=out)
    while True:
        try:
            line = read("\nyou> ").strip()
        except EOFError:
            print(file=out)
            return
        if not line:
            continue
        if line in EXIT:
            return
        if line == "/clear":
            session.clear()
            print("(history cleared)", file=out)
            continue
        if line.startswith("/system"):
            session.system = line[len("/system"):].strip() or None
            session.clear()
            print(f"(system prompt {'set' if session.system else 'reset'}; history cleared)", file=out)
            continue
        if line.startswith("/"):
            print(HELP, file=out)
            continue
        print("assistant> ", end="", file=out, flush=True)
        answer = session.reply_parts(line)
        shown = None
        try:
            for kind, delta in answer:
                if kind != shown:
                    print(THINKING if kind == REASONING else ("\n" + ANSWERING if shown else ""), end="", file=out)
                    shown = kind
                print(delta.replace("\n", "\n" + THOUGHT) if kind == REASONING else delta, end="", file=out,
                      flush=True)
        except KeyboardInterrupt:
            answer.close()
            print("\n(stopped; this turn is not kept)", file=out)
            continue
        print(file=out)
        if session.unanswered:
            print("(no answer: the reply ended inside its reasoning)", file=out)
        if note := cut_note(session.completion):
            print(f"({note}: the answer reached the max new tokens limit; --max-new-tokens raises it)", file=out)
        if session.sources:
            print("sources:\n" + format_sources(session.sources), file=out)
