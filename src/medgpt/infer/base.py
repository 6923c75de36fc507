"""What every engine and every caller of one shares: the request and result types, the engine interface,
prompt rendering (messages, the default system prompt, the template) and the stop tokens.

Standard library only at import time, so the command line stays fast.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medgpt.errors import UserError

# A retrieval hook (knowledge-base answers): turns the conversation into augmented messages and the
# sources it used; chat, serve and webui accept one and show or return the sources.
Augment = Callable[[list[dict]], tuple[list[dict], list[dict]]]


@dataclass
class GenerationParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> GenerationParams:
        """Reject settings a user can get wrong, with a message instead of a library traceback."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (all(isinstance(s, str) and s for s in self.stop), "stop must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


@dataclass
class Request:
    """One prompt (token ids) with its own parameters; `on_text` receives text deltas as they are final."""

    prompt_ids: list[int]
    params: GenerationParams
    on_text: Callable[[str], None] | None = None
    cancelled: bool = False  # set by a server whose client went away: the row stops at the next step


class Engine(Protocol):
    """What chat, predict, serve, webui and evaluation use of an engine."""

    tokenizer: Any
    template: Any
    name: str  # what the server reports as the model id
    max_batch_size: int  # most requests the server hands to one `run`
    system: str | None  # the default system prompt

    def encode(self, messages: list[dict], system: str | None = None) -> list[int]: ...

    def run(self, requests: list[Request]) -> list[Completion]: ...

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]: ...

    def stream(self, messages: list[dict], params: GenerationParams,
               system: str | None = None) -> Iterator[str]: ...


def check_messages(messages: Any) -> list[dict]:
    """Canonical messages: a non-empty list of {"role", "content": str} ending with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise UserError("messages must be a non-empty list of {role, content}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UserError(f"messages[{i}]: expected {{role: system|user|assistant, content: string}}")
    if messages[-1]["role"] != "user":
        raise UserError("the last message must come from the user")
    return messages


def split_system(messages: list[dict], system: str | None) -> tuple[list[dict], str | None]:
    """A leading system message wins over the default system prompt."""
    if messages and messages[0]["role"] == "system":
        return messages[1:], messages[0]["content"]
    return messages, system


class BaseEngine:
    """What every engine shares: prompts through the template, validation, streaming over `run`.

    The system prompt of a prompt is decided here only: a leading system message, else the `system` given
    with the call, else the engine's default `system`, else the template's own.
    """

    tokenizer: Any
    template: Any
    name: str = "medgpt"
    max_batch_size: int = 16
    system: str | None = None

    def encode(self, messages: list[dict], system: str | None = None) -> list[int]:
        """Token ids of the prompt, rendered by the same template as training."""
        messages, system = split_system(check_messages(messages), self.system if system is None else system)
        return list(self.template.encode_prompt(self.tokenizer, messages, system=system))

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]:
        params.validate()
        return self.run([Request(self.encode(m, system), params) for m in batch])

    def stream(self, messages: list[dict], params: GenerationParams, system: str | None = None) -> Iterator[str]:
        params.validate()
        deltas: queue.Queue = queue.Queue()
        request = Request(self.encode(messages, system), params, on_text=deltas.put)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self.run([request])
            except BaseException as exc:  # re-raised in the consumer below
                failure.append(exc)
            finally:
                deltas.put(None)

        threading.Thread(target=work, daemon=True).start()
        try:
            while (delta := deltas.get()) is not None:
                yield delta
        finally:  # the consumer stopped early (closed, interrupted): stop generating for it
            request.cancelled = True
        if failure:
            raise failure[0]

    def run(self, requests: list[Request]) -> list[Completion]:
        """Generate for many requests together; results keep the input order."""
        raise NotImplementedError


def require_template(template: Any) -> Any:
    """The template an engine renders chat prompts with; `none` (plain text, no template) is refused."""
    if template is None:
        raise UserError("generation needs a chat template (not --template none)")
    return template


def resolve_template(name: str | None, model: str | None, adapter: str | None, tokenizer):
    """The template named, else the one recorded beside the adapter or model (medgpt.json), else the tokenizer's."""
    from medgpt.data.templates import get_template
    from medgpt.models import read_meta, recorded_template, resolve_model

    metas = []
    if adapter and Path(adapter).expanduser().is_dir():
        metas.append(read_meta(Path(adapter).expanduser()))
    if model and name is None:
        metas.append(read_meta(resolve_model(model)))
    return get_template(recorded_template(name, *metas), tokenizer)


def stop_tokens(tokenizer, template, model=None) -> tuple[set[int], list[str]]:
    """The ids and strings that end a response: eos (the tokenizer's and the model's generation config's) and
    the template's stop words, as single token ids where the vocabulary has them, else as strings."""
    ids: set[int] = set()
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, eos):
        ids.update(v for v in (value if isinstance(value, list) else [value]) if v is not None)
    strings = []
    for word in getattr(template, "stop_words", None) or []:
        token = tokenizer.convert_tokens_to_ids(word) if word in tokenizer.get_vocab() else None
        if token is not None and token != tokenizer.unk_token_id:
            ids.add(token)
        else:
            strings.append(word)
    return ids, strings
