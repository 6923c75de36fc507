"""What every engine and every caller of one shares: the request and result types, the engine interface,
prompt rendering (messages, the default system prompt, the template) and the stop tokens.

Standard library only at import time, so the command line stays fast.
"""

from __future__ import annotations

import atexit
import queue
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from medgpt.data.messages import check_messages
from medgpt.errors import UserError
from medgpt.infer.reasoning import ReplyReader, reply_reader

# A retrieval hook (knowledge-base answers): turns the conversation into augmented messages and the
# sources it used; chat, serve and webui accept one and show or return the sources.
Augment = Callable[[list[dict]], tuple[list[dict], list[dict]]]


# Bounds of the sampling values (OpenAI's where it has them): anything outside is refused with a message naming
# the field, so no accepted value can overflow or poison the arithmetic of a batch it shares.
MAX_SEED = 2**63  # seeds are 0 <= seed < MAX_SEED (a torch.Generator takes 64-bit seeds)
MAX_TOP_K = 1000
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
MAX_STOPS, MAX_STOP_CHARS = 8, 256
REPETITION_PENALTY_RANGE = (0.05, 20.0)


@dataclass
class GenerationParams:
    """One request's generation settings; the defaults are greedy decoding, what evaluation and reports use.

    Chat-like commands start from `chat_defaults(engine)` instead (sampling with a repetition penalty)."""

    max_new_tokens: int = 256  # 0: only score the prompt (with Request.echo), generate nothing
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0  # transformers' semantics, over prompt and answer
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's semantics, over the answer's tokens
    frequency_penalty: float = 0.0  # OpenAI's semantics, over the answer's tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    logprobs: int | None = None  # None: no log-probs; k: each token's log-prob and the k most likely
    grammar: str | None = None  # xgrammar EBNF (root rule `root`): the answer is constrained to it

    def validate(self) -> GenerationParams:
        """Reject settings a user can get wrong, with a message naming the field instead of a library traceback."""
        low, high = REPETITION_PENALTY_RANGE
        checks = [
            (_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens must be an integer >= 0"),
            (_in(self.temperature, 0, 2), "temperature must be a number in [0, 2]"),
            (_in(self.top_p, 0, 1) and self.top_p > 0, "top_p must be a number in (0, 1]"),
            (_is_int(self.top_k) and 0 <= self.top_k <= MAX_TOP_K, f"top_k must be an integer in [0, {MAX_TOP_K}]"),
            (_in(self.repetition_penalty, low, high), f"repetition_penalty must be a number in [{low}, {high:g}]"),
            (_in(self.presence_penalty, -2, 2), "presence_penalty must be a number in [-2, 2]"),
            (_in(self.frequency_penalty, -2, 2), "frequency_penalty must be a number in [-2, 2]"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < MAX_SEED),
             "seed must be an integer in [0, 2**63)"),
            (isinstance(self.stop, list) and len(self.stop) <= MAX_STOPS, f"stop must be at most {MAX_STOPS} strings"),
            (isinstance(self.stop, list) and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS
                                                 for s in self.stop),
             f"stop must be non-empty strings of at most {MAX_STOP_CHARS} characters"),
            (isinstance(self.logit_bias, dict) and len(self.logit_bias) <= MAX_LOGIT_BIAS,
             f"logit_bias must map at most {MAX_LOGIT_BIAS} token ids to biases"),
            (isinstance(self.logit_bias, dict) and all(_is_int(k) and k >= 0 and _in(v, -100, 100)
                                                       for k, v in self.logit_bias.items()),
             "logit_bias must map token ids (integers >= 0) to numbers in [-100, 100]"),
            (self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be an integer in [0, {MAX_LOGPROBS}]"),
            (self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip() != ""),
             "grammar must be a non-empty grammar text"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in(value: Any, low: float, high: float) -> bool:
    """A real number (not a bool, not NaN or infinite) in [low, high]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


@dataclass
class TokenLogprob:
    """One token's log-probability: log-softmax of the model's raw logits (before temperature, penalties, bias and
    grammar; vLLM's default "raw_logprobs"), with the `k` most likely tokens of that position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    token_ids: list[int] = field(default_factory=list)  # the generated ids (after any stop cut)
    logprobs: list[TokenLogprob] | None = None  # one per generated token (the stop token that ended it included)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with Request.echo: one per prompt token, first None


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
    echo: bool = False  # also score the prompt: Completion.prompt_logprobs


class Engine(Protocol):
    """What chat, predict, serve, webui and evaluation use of an engine."""

    tokenizer: Any
    template: Any
    name: str  # what the server reports as the model id
    max_batch_size: int  # most requests in the running batch
    max_context: int  # the model's longest sequence (prompt + answer)
    system: str | None  # the default system prompt
    enable_thinking: bool | None  # the default of the template's thinking switch (None: the template's own)
    model_sampling: dict[str, Any]  # the sampling settings the model's generation config sets

    def encode(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
               enable_thinking: bool | None = None) -> list[int]: ...

    def submit(self, request: Request) -> Future[Completion]:
        """Start one request (thread-safe, returns at once); the engine batches running requests continuously.

        A request that fails (its input, or anything while decoding its row) fails only its own future; setting
        `request.cancelled` ends its row within one decoding step (the future then holds what was generated)."""
        ...

    def waiting(self) -> int: ...  # requests submitted and not started yet

    def running(self) -> int: ...  # requests in the running batch

    def close(self) -> None: ...  # stop the engine's scheduler and wait for it (closing twice does nothing)

    def __enter__(self) -> Engine: ...  # `with load_engine(...) as engine:` closes it at the end of the block

    def __exit__(self, *exc: object) -> None: ...

    def run(self, requests: list[Request]) -> list[Completion]: ...

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]: ...

    def stream(self, messages: list[dict], params: GenerationParams,
               system: str | None = None) -> TextStream: ...


class TextStream:
    """The text deltas of one answer as they are final (iterate it like any iterator of str); once it is
    exhausted, `completion` holds the whole answer with its token counts and finish reason ("length" = cut
    at max_new_tokens). `close()` stops the generation early. `reader` reads the reply's reasoning apart from
    its answer (None: the template has no reasoning format, or the prompt closed the think block)."""

    def __init__(self, chunks: Iterator[str], reader: ReplyReader | None = None):
        self._chunks = chunks  # a generator of deltas that returns the Completion
        self.completion: Completion | None = None
        self.reader = reader

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
    """What an engine has loaded, for people: model (its folder), adapter, template (and its thinking switch where
    it has a reasoning format), dtype, device."""
    folder, adapter = getattr(engine, "folder", None), getattr(engine, "adapter", None)
    facts = {"model": f"{Path(folder).name} ({folder})" if folder else str(getattr(engine, "name", "?")),
             "adapter": f"{Path(adapter).name} ({adapter})" if adapter else "none",
             "template": str(getattr(getattr(engine, "template", None), "name", "?"))}
    if facts["template"] == "auto":
        facts["template"] = "auto (the tokenizer's own chat template)"
    if getattr(getattr(engine, "template", None), "think", None):  # a reasoning format: the thinking switch
        facts["thinking"] = {None: "on (the template's default)", True: "on",
                             False: "off"}[getattr(engine, "enable_thinking", None)]
    facts.update({key: str(value) for key in ("dtype", "device") if (value := getattr(engine, key, None))})
    return facts


class BaseEngine:
    """What every engine shares: prompts through the template, validation, batches and streams over `submit`.

    The system prompt follows `medgpt.data.messages`' rule: a leading system message, else the `system` given
    with the call, else the engine's default `system`, else the template's own.
    """

    tokenizer: Any
    template: Any
    name: str = "medgpt"
    max_batch_size: int = 16
    max_context: int = 2048
    system: str | None = None
    enable_thinking: bool | None = None  # the prompts' thinking switch where a call gives none
    model_sampling: dict[str, Any] = {}  # what the model's generation config sets (see shipped_sampling)
    folder: str | None = None  # the base model's folder
    adapter: str | None = None  # the LoRA adapter's folder
    dtype: str | None = None
    device: str | None = None

    def encode(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
               enable_thinking: bool | None = None) -> list[int]:
        """Token ids of the prompt, rendered by the same template as training (with `tools` where it has a
        tool format; `enable_thinking`, else the engine's, as the template's thinking switch: Qwen3's false ends
        the prompt with an empty think block, a template without a reasoning format ignores it)."""
        messages = check_messages(messages, prompt=True)
        system = self.system if system is None else system
        think = self.enable_thinking if enable_thinking is None else enable_thinking
        return list(self.template.encode_prompt(self.tokenizer, messages, system=system, tools=tools,
                                                enable_thinking=think))

    def submit(self, request: Request) -> Future[Completion]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop the engine's scheduler and wait for it; closing twice does nothing."""

    def __enter__(self) -> BaseEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, requests: list[Request]) -> list[Completion]:
        """Submit every request, wait for all; results keep the input order; raises the first failure."""
        futures = [self.submit(request) for request in requests]
        wait(futures)
        return [future.result() for future in futures]

    def generate(self, batch: list[list[dict]], params: GenerationParams,
                 system: str | None = None) -> list[Completion]:
        params.validate()
        return self.run([Request(self.encode(m, system), params) for m in batch])

    def stream(self, messages: list[dict], params: GenerationParams, system: str | None = None) -> TextStream:
        """Text deltas as they are final; the returned stream's `completion` is set once it is exhausted."""
        params.validate()
        ids = self.encode(messages, system)
        return TextStream(self._deltas(Request(ids, params)), reply_reader(self.template, self.tokenizer, ids))

    def _deltas(self, request: Request) -> Iterator[str]:
        deltas: queue.Queue = queue.Queue()
        request.on_text = deltas.put
        future = self.submit(request)
        future.add_done_callback(lambda _: deltas.put(None))  # after the request's last on_text
        try:
            while (delta := deltas.get()) is not None:
                yield delta
        finally:  # the consumer stopped early (closed, interrupted): stop generating for it
            request.cancelled = True
        return future.result()


_OPEN: weakref.WeakSet = weakref.WeakSet()  # engines with a scheduler thread, until they are freed


def close_at_exit(engine: BaseEngine) -> None:
    """Close `engine` when the interpreter exits if nobody has by then, before the interpreter tears down: a
    scheduler thread still inside a torch op at teardown aborts the process ("terminate called without an active
    exception"). atexit runs after `threading` has joined the non-daemon threads (so the scheduler thread is a daemon
    and this, not that join, stops it) and last-registered first, so re-registering here, after torch is imported,
    closes the engines before torch's own exit hooks run."""
    _OPEN.add(engine)
    atexit.unregister(close_open_engines)
    atexit.register(close_open_engines)


def close_open_engines() -> None:
    """Close every engine still open (each waits for its scheduler thread's current step)."""
    for engine in list(_OPEN):
        engine.close()


def require_template(template: Any) -> Any:
    """The template an engine renders chat prompts with; `none` (plain text, no template) is refused."""
    if template is None:
        raise UserError("generation needs a chat template (not --template none)")
    return template


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
