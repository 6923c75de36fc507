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
    """One request's generation settings; the defaults are greedy decoding, what evaluation and reports use.

    Chat-like commands start from `chat_defaults(engine)` instead (sampling with a repetition penalty)."""

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


# The sampling settings of a chat whose model's generation config sets none: greedy decoding makes small models
# repeat themselves until the token limit. bench/chat_defaults.py (English and Chinese medical questions on the
# bundled SmolLM2-135M-Instruct, 512 new tokens): greedy loops in 10 of 16 answers, sampling without a repetition
# penalty in 2, these values in none (bench/results/chat_defaults.json).
CHAT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}
MODEL_ORIGIN = "the model's generation_config"
MEDGPT_ORIGIN = "medgpt's chat default"


def shipped_sampling(config: Any) -> dict[str, Any]:
    """The sampling settings a model's generation config sets (a transformers GenerationConfig, or the parsed
    generation_config.json): do_sample, temperature, top_p, top_k, repetition_penalty; unset ones are left out."""
    keys = ("do_sample", *CHAT_SAMPLING)
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    return {key: get(key) for key in keys if get(key) is not None}


def read_sampling(folder: str | Path) -> dict[str, Any]:
    """`shipped_sampling` of a model folder's generation_config.json ({} when it has none)."""
    import json

    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return shipped_sampling(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, AttributeError) as exc:
        raise UserError(f"{path}: not a JSON object ({exc})") from exc


def chat_origins(engine: Any) -> dict[str, str]:
    """Where each chat default of `engine` comes from: MODEL_ORIGIN or MEDGPT_ORIGIN, per sampling field."""
    shipped = getattr(engine, "model_sampling", None) or {}
    origins = {key: MODEL_ORIGIN if key in shipped else MEDGPT_ORIGIN for key in CHAT_SAMPLING}
    if shipped.get("do_sample") is False:  # the model asks for greedy decoding
        origins["temperature"] = MODEL_ORIGIN
    return origins


def chat_defaults(engine: Any, max_new_tokens: int = 512) -> GenerationParams:
    """The generation settings a chat starts from: each sampling field as the model's generation config sets it,
    else medgpt's CHAT_SAMPLING; `do_sample: false` there means greedy (temperature 0)."""
    shipped = getattr(engine, "model_sampling", None) or {}
    values = {**CHAT_SAMPLING, **{k: v for k, v in shipped.items() if k in CHAT_SAMPLING}}
    if shipped.get("do_sample") is False:
        values["temperature"] = 0.0
    try:
        return GenerationParams(max_new_tokens=max_new_tokens, **values).validate()
    except (UserError, TypeError) as exc:
        raise UserError(f"{getattr(engine, 'name', 'the model')}: its generation_config.json: {exc}") from exc


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
    model_sampling: dict[str, Any]  # the sampling settings the model's generation config sets

    def encode(self, messages: list[dict], system: str | None = None) -> list[int]: ...

    def run(self, requests: list[Request]) -> list[Completion]: ...

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]: ...

    def stream(self, messages: list[dict], params: GenerationParams,
               system: str | None = None) -> TextStream: ...


class TextStream:
    """The text deltas of one answer as they are final (iterate it like any iterator of str); once it is
    exhausted, `completion` holds the whole answer with its token counts and finish reason ("length" = cut
    at max_new_tokens). `close()` stops the generation early."""

    def __init__(self, chunks: Iterator[str]):
        self._chunks = chunks  # a generator of deltas that returns the Completion
        self.completion: Completion | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._chunks)
        except StopIteration as end:
            self.completion = end.value
            raise

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close:
            close()


def engine_facts(engine: Any) -> dict[str, str]:
    """What an engine has loaded, for people: model (its folder), adapter, template, dtype, device."""
    folder, adapter = getattr(engine, "folder", None), getattr(engine, "adapter", None)
    facts = {"model": f"{Path(folder).name} ({folder})" if folder else str(getattr(engine, "name", "?")),
             "adapter": f"{Path(adapter).name} ({adapter})" if adapter else "none",
             "template": str(getattr(getattr(engine, "template", None), "name", "?"))}
    if facts["template"] == "auto":
        facts["template"] = "auto (the tokenizer's own chat template)"
    facts.update({key: str(value) for key in ("dtype", "device") if (value := getattr(engine, key, None))})
    return facts


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
    model_sampling: dict[str, Any] = {}  # what the model's generation config sets (see shipped_sampling)
    folder: str | None = None  # the base model's folder
    adapter: str | None = None  # the LoRA adapter's folder
    dtype: str | None = None
    device: str | None = None

    def encode(self, messages: list[dict], system: str | None = None) -> list[int]:
        """Token ids of the prompt, rendered by the same template as training."""
        messages, system = split_system(check_messages(messages), self.system if system is None else system)
        return list(self.template.encode_prompt(self.tokenizer, messages, system=system))

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]:
        params.validate()
        return self.run([Request(self.encode(m, system), params) for m in batch])

    def stream(self, messages: list[dict], params: GenerationParams, system: str | None = None) -> TextStream:
        """Text deltas as they are final; the returned stream's `completion` is set once it is exhausted."""
        params.validate()
        return TextStream(self._deltas(Request(self.encode(messages, system), params)))

    def _deltas(self, request: Request) -> Iterator[str]:
        deltas: queue.Queue = queue.Queue()
        request.on_text = deltas.put
        result: list[Completion] = []
        failure: list[BaseException] = []

        def work() -> None:
            try:
                result.extend(self.run([request]))
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
        return result[0]

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
