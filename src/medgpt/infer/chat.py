"""Multi-turn chat state shared by the terminal chat and the web page, and the terminal loop itself."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from medgpt.infer.base import Augment, Engine, GenerationParams

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

    def clear(self) -> None:
        self.history.clear()
        self.sources = []

    def reply(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`; the turn joins the history only when the answer is complete."""
        messages = [*self.history, {"role": "user", "content": text}]
        prompt, self.sources = self.augment(messages) if self.augment else (messages, [])
        answer = ""
        for delta in self.engine.stream(prompt, self.params, system=self.system):
            answer += delta
            yield delta
        self.history += [messages[-1], {"role": "assistant", "content": answer}]


def format_sources(sources: list[dict]) -> str:
    """One line per source: its name (`source`, else `title` or `id`) and a short excerpt."""
    lines = []
    for i, s in enumerate(sources, 1):
        name = s.get("source") or s.get("title") or s.get("id") or "?"
        excerpt = " ".join(str(s.get("text", "")).split())[:100]
        lines.append(f"[{i}] {name}" + (f": {excerpt}" if excerpt else ""))
    return "\n".join(lines)


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
        answer = session.reply(line)
        try:
            for delta in answer:
                print(delta, end="", file=out, flush=True)
        except KeyboardInterrupt:
            answer.close()
            print("\n(stopped; this turn is not kept)", file=out)
            continue
        print(file=out)
        if session.sources:
            print("sources:\n" + format_sources(session.sources), file=out)
