"""An OpenAI-compatible HTTP API (plus the seed's `/chat`) over one engine.

`/v1/chat/completions`, `/v1/completions` (log-likelihood scoring with `echo` + `logprobs`), `/v1/models`,
`/metrics` (Prometheus), `/health`. Every request goes to `engine.submit`; the engine batches them continuously
and one request's failure fails only that request. Every error is an OpenAI error object
`{"error": {"message", "type", "param", "code"}}`, and anything the server cannot honour is a 400 naming the field.

The `Guard` middleware checks the API key before the body is read and bounds the body while reading it; the
handlers parse the body themselves (`parse_body`), so bad JSON, invalid UTF-8, lone surrogates and deep nesting
are 400s rather than library errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import State
from starlette.exceptions import HTTPException as StarletteHTTPException

from medgpt.errors import UserError
from medgpt.infer.base import Augment, Completion, Engine, GenerationParams, Request, TokenLogprob
from medgpt.infer.tool_calls import parse_tool_calls, tool_call_grammar

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 8  # text longer than max_prompt_tokens * this is refused before it is tokenized
MAX_JSON_DEPTH = 32
MAX_PROMPTS = 64  # prompts in one /v1/completions request
OPEN_PATHS = ("/health",)  # the only paths served without the API key


@dataclass
class ServerSettings:
    """Limits and defaults of the API; the default system prompt is the engine's (`load_engine(system=...)`)."""

    defaults: GenerationParams = field(default_factory=GenerationParams)  # for fields a request leaves out
    max_tokens_cap: int = 1024  # a larger max_tokens is refused with 400
    max_prompt_tokens: int = 4096  # longer prompts are refused with 400
    max_queue: int = 256  # waiting requests beyond this are refused with 429
    max_n: int = 8  # choices per request
    max_body_bytes: int = 4 * 2**20  # larger bodies are refused with 413 while they are read
    api_key: str | None = None
    docs: bool = False  # serve /docs, /redoc and /openapi.json (behind the key when there is one)


class ApiError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            status, "server_error" if status >= 500 else "invalid_request_error")

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.kind, self.param, self.code), status_code=self.status,
                            headers=self.headers)


class ClientGone(Exception):
    """The client closed the connection while its request was generating."""


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request bodies ----------------------------------------------------------------------------------------


class Strict(BaseModel):
    """Unknown fields are refused (OpenAI's "Unrecognized request argument"), not silently dropped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text of an object


class ToolCallIn(Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    def text(self, i: int) -> str:
        """Plain text; OpenAI content parts of type text are joined; null only on an assistant's tool-call turn."""
        where = f"messages.{i}.content"
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise ApiError(400, f"{where}: null content is only allowed on an assistant turn with tool_calls", where)
        if isinstance(self.content, str):
            return self.content
        for k, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ApiError(400, f"{where}.{k}: only text content parts ({{type: text, text: str}}) are supported",
                               f"{where}.{k}")
        return "".join(part["text"] for part in self.content)

    def engine_message(self, i: int) -> dict:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text(i)}
        if self.tool_calls:
            calls = []
            for k, call in enumerate(self.tool_calls):
                arguments = json_value(call.function.arguments)
                if not isinstance(arguments, dict):
                    where = f"messages.{i}.tool_calls.{k}.function.arguments"
                    raise ApiError(400, f"{where}: expected the JSON text of an object", where)
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
            message["tool_calls"] = calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(Strict):
    include_usage: bool = False


class FunctionDef(Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class JsonSchemaFormat(Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(Strict):
    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: Any = None  # str, [str], [int] or [[int]]: checked in `prompts`
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class SeedChatRequest(SamplingFields):
    """The seed's `/chat`: one message and the earlier turns as [user, assistant] pairs (or messages)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    message: str = Field(min_length=1)
    history: list[tuple[str, str] | Message] = []
    system: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def check_json(value: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not text (lone surrogates)."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", where or None)
        keys = list(item) if isinstance(item, dict) else []
        for text in [item] * isinstance(item, str) + keys:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(400, f"{where or 'the request body'}: a string holds a lone surrogate "
                                    "(\\ud800-\\udfff), which is not text", where or None) from None
        if isinstance(item, dict):
            stack += [(v, depth + 1, f"{where}.{k}" if where else str(k)) for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(v, depth + 1, f"{where}.{k}" if where else str(k)) for k, v in enumerate(item)]


def field_path(data: Any, loc: tuple) -> list:
    """The part of a pydantic error location that is a path in the request (not the union member's type name)."""
    path, here = [], data
    for part in loc:
        if isinstance(here, dict) and part in here or isinstance(here, list) and isinstance(part, int) \
                and part < len(here):
            path.append(part)
            here = here[part]
        elif isinstance(here, dict) and isinstance(part, str) and part.isidentifier() and len(path) == len(loc) - 1:
            path.append(part)  # a missing field
        else:
            break
    return path


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """The request body as `model`, or an ApiError that says what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    check_json(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in field_path(data, first["loc"])) or None
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"unrecognized request argument: {where} (this server does not support it)",
                           where) from None
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], where) from None


# ---- generation settings -----------------------------------------------------------------------------------

API_NAMES = {"max_new_tokens": "max_tokens"}


def checked(params: GenerationParams, names: dict[str, str] | None = None) -> GenerationParams:
    """`params.validate()` with its UserError as a 400 naming the request field."""
    try:
        return params.validate()
    except (UserError, TypeError, ValueError, OverflowError) as exc:
        word = str(exc).split(" ", 1)[0].split("[", 1)[0].rstrip(":,")
        fields = {f.name for f in dataclasses.fields(GenerationParams)}
        param = {**API_NAMES, **(names or {})}.get(word, word) if word in fields else None
        raise ApiError(400, str(exc).replace(word, param, 1) if param else str(exc), param) from None


def base_params(body: SamplingFields, settings: ServerSettings, engine: Engine, max_tokens: int | None,
                max_tokens_name: str, logprobs: int | None, logprobs_name: str) -> GenerationParams:
    """The request's sampling fields over the server's defaults; max_new_tokens is settled per prompt later."""
    if not 1 <= body.n <= settings.max_n:
        raise ApiError(400, f"n must be between 1 and {settings.max_n} on this server (--max-n)", "n")
    if max_tokens is not None and max_tokens > settings.max_tokens_cap:
        raise ApiError(400, f"{max_tokens_name} is {max_tokens}; this server generates at most "
                            f"{settings.max_tokens_cap} tokens per answer (--max-tokens-cap)", max_tokens_name)
    bias: dict[int, float] = {}
    vocab = len(engine.tokenizer)
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
            raise ApiError(400, f"logit_bias: {key!r} is not a token id of this model (0..{vocab - 1})", "logit_bias")
        bias[int(key)] = value
    d = settings.defaults
    stop = [body.stop] if isinstance(body.stop, str) else list(d.stop if body.stop is None else body.stop)
    pick = lambda value, default: default if value is None else value  # noqa: E731
    params = dataclasses.replace(
        d, max_new_tokens=max(1, pick(max_tokens, d.max_new_tokens)), stop=stop, seed=pick(body.seed, d.seed),
        temperature=pick(body.temperature, d.temperature), top_p=pick(body.top_p, d.top_p),
        top_k=pick(body.top_k, d.top_k), repetition_penalty=pick(body.repetition_penalty, d.repetition_penalty),
        presence_penalty=pick(body.presence_penalty, d.presence_penalty),
        frequency_penalty=pick(body.frequency_penalty, d.frequency_penalty), logit_bias=bias, logprobs=logprobs)
    checked(params, {"logprobs": logprobs_name})
    if params.seed is not None and body.n > 1:
        checked(dataclasses.replace(params, seed=params.seed + body.n - 1))  # the seeds of the other choices
    return params


def fit_length(params: GenerationParams, prompt_len: int, settings: ServerSettings, engine: Engine,
               max_tokens: int | None, name: str, prompt_param: str) -> GenerationParams:
    """Refuse a prompt over the limits; a max_tokens left out becomes what still fits in the model's context."""
    if prompt_len > settings.max_prompt_tokens:
        raise ApiError(400, f"the prompt is {prompt_len} tokens; this server takes at most "
                            f"{settings.max_prompt_tokens} (--max-prompt-tokens)", prompt_param,
                       "context_length_exceeded")
    room = engine.max_context - prompt_len
    if max_tokens is None:
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens: no room left in this model's context of "
                                f"{engine.max_context}", prompt_param, "context_length_exceeded")
        return dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, settings.max_tokens_cap, room))
    if max_tokens > room:
        raise ApiError(400, f"this model's context is {engine.max_context} tokens; the prompt ({prompt_len}) plus "
                            f"{name} ({max_tokens}) is more", name, "context_length_exceeded")
    return dataclasses.replace(params, max_new_tokens=max_tokens)


def json_grammar(fmt: ResponseFormat) -> str | None:
    """xgrammar EBNF text of a response_format (None for text). The JSON is written compactly (`{"a": 1, "b": 2}`,
    xgrammar's any_whitespace=False): free whitespace lets a model pad an answer with blanks until max_tokens."""
    import xgrammar

    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return str(xgrammar.Grammar.from_json_schema(json.dumps({"type": "object"}), any_whitespace=False))
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(400, "response_format.json_schema.schema: required for type json_schema",
                       "response_format.json_schema.schema")
    try:
        return str(xgrammar.Grammar.from_json_schema(json.dumps(fmt.json_schema.schema_), any_whitespace=False))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ApiError(400, f"response_format.json_schema.schema: not a JSON schema this server can enforce: "
                            f"{str(exc).splitlines()[0][:300]}", "response_format.json_schema.schema") from None


@dataclass
class ToolUse:
    """What a chat request asks of tools: the tools shown, the template's format, and whether calls are parsed."""

    tools: list[dict]
    tool_format: str
    choice: str  # auto | required | the function name
    parallel: bool


def tool_use(body: ChatCompletionRequest, engine: Engine) -> tuple[ToolUse | None, str | None]:
    """The request's tool use and the grammar it needs (for required / a named function)."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice: the request has no tools", "tool_choice")
        return None, None
    if choice == "none":
        return None, None
    tool_format = getattr(engine.template, "tool_format", None)
    if tool_format is None:
        from medgpt.data.templates import TEMPLATES

        with_tools = ", ".join(name for name, t in TEMPLATES.items() if t.tool_format)
        raise ApiError(400, f"tools: the chat template {engine.template.name!r} has no tool format; serve the model "
                            f"with --template NAME of the format it was trained with: {with_tools}", "tools")
    tools = [t.model_dump(exclude_none=True) for t in body.tools]
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise ApiError(400, f"tool_choice: expected {{type: function, function: {{name}}}} naming one of the "
                                f"tools ({', '.join(names)})", "tool_choice")
        choice = name
    use = ToolUse(tools, tool_format, choice or "auto", body.parallel_tool_calls is not False)
    if use.choice == "auto":
        return use, None
    chosen = tools if use.choice == "required" else [t for t in tools if t["function"]["name"] == use.choice]
    try:
        return use, tool_call_grammar(tool_format, chosen)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ApiError(400, f"tools: a function's parameters are not a JSON schema this server can enforce: "
                            f"{str(exc).splitlines()[0][:300]}", "tools") from None


# ---- generation --------------------------------------------------------------------------------------------


class Tracked:
    """One engine request with the times the metrics need."""

    def __init__(self, prompt_ids: list[int], params: GenerationParams, echo: bool = False,
                 on_text: Callable[[str], None] | None = None):
        self.started = time.monotonic()
        self.first: float | None = None
        self.forward = on_text
        self.request = Request(prompt_ids, params, on_text=self.on_text, echo=echo)

    def on_text(self, delta: str) -> None:  # called from the engine's thread
        if self.first is None:
            self.first = time.monotonic()
        if self.forward is not None:
            self.forward(delta)


def choices_of(prompt_ids: list[int], params: GenerationParams, n: int, echo: bool = False,
               on_text: Callable[[int], Callable[[str], None]] | None = None, start: int = 0) -> list[Tracked]:
    """n engine requests for one prompt; with a seed, choice k samples with seed + k."""
    return [Tracked(prompt_ids, params if params.seed is None else dataclasses.replace(params, seed=params.seed + k),
                    echo, on_text(start + k) if on_text else None) for k in range(n)]


def submit(state: State, tracked: list[Tracked]) -> list:
    if state.engine.waiting() + len(tracked) > state.settings.max_queue:
        raise ApiError(429, f"too many requests are waiting (at most {state.settings.max_queue}, --max-queue); "
                            "retry shortly")
    return [state.engine.submit(t.request) for t in tracked]


def generation_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserError):
        return ApiError(400, str(exc))
    log.error("generation failed: %r", exc)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}")


def record(state: State, tracked: list[Tracked], results: list[Completion]) -> None:
    metrics: Metrics = state.metrics
    for t, result in zip(tracked, results):
        metrics.prompt_tokens.inc(result.prompt_tokens)
        metrics.completion_tokens.inc(result.completion_tokens)
        if t.first is not None:
            metrics.ttft.observe(t.first - t.started)
            if result.completion_tokens > 1:
                metrics.tpot.observe((time.monotonic() - t.first) / (result.completion_tokens - 1))


async def generate(http: HttpRequest, tracked: list[Tracked]) -> list[Completion]:
    """Submit, wait, and cancel every row when the client leaves (polled while waiting) or one of them fails."""
    state = http.app.state
    futures = submit(state, tracked)
    waiter = asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    finished = False
    try:
        while True:
            done, _ = await asyncio.wait([waiter], timeout=0.25)
            if done:
                results = waiter.result()
                finished = True
                record(state, tracked, results)
                return results
            if await http.is_disconnected():
                raise ClientGone
    except (ClientGone, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise generation_error(exc) from exc
    finally:
        if not finished:  # the engine resolves the cancelled rows' futures itself, with what they generated
            for t in tracked:
                t.request.cancelled = True
            waiter.add_done_callback(lambda f: f.cancelled() or f.exception())


def check_chars(texts: list[str], settings: ServerSettings, param: str) -> None:
    limit = settings.max_prompt_tokens * CHARS_PER_TOKEN
    if sum(map(len, texts)) > limit:
        raise ApiError(400, f"the prompt is longer than {limit} characters; this server takes at most "
                            f"{settings.max_prompt_tokens} tokens (--max-prompt-tokens)", param,
                       "context_length_exceeded")


async def encode_chat(state: State, messages: list[dict], system: str | None = None,
                      tools: list[dict] | None = None) -> tuple[list[int], list[dict]]:
    """Prompt ids of a conversation (retrieval applied) and the sources retrieved."""
    texts = [m["content"] for m in messages] + [json.dumps(m["tool_calls"]) for m in messages if m.get("tool_calls")]
    check_chars(texts + ([json.dumps(tools)] if tools else []), state.settings, "messages")
    sources: list[dict] = []
    if state.augment:
        messages, sources = await asyncio.to_thread(state.augment, messages)
    kwargs = {"tools": tools} if tools else {}
    try:
        ids = await asyncio.to_thread(state.engine.encode, messages, None, **kwargs)
    except UserError as exc:
        raise ApiError(400, f"messages: {exc}", "messages") from None
    return ids, sources


# ---- responses ---------------------------------------------------------------------------------------------


def usage(results: list[Completion], n: int = 1) -> dict:
    """Token counts; each prompt counts once however many choices (n) it got."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


def chat_logprobs(tokenizer: Any, logprobs: list[TokenLogprob] | None, k: int) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(tokenizer, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top[:k]]}
                        for t in logprobs], "refusal": None}


def completion_logprobs(tokenizer: Any, prompt_ids: list[int], result: Completion, echo: bool,
                        k: int) -> dict:
    """OpenAI's completions log-probs: tokens, token_logprobs, top_logprobs, text_offset (prompt first with echo).

    Each top_logprobs entry holds the k most likely tokens and the chosen one (as OpenAI and vLLM return it)."""
    rows: list[tuple[int, TokenLogprob | None]] = []
    if echo:
        rows += list(zip(prompt_ids, result.prompt_logprobs or [None] * len(prompt_ids)))
    rows += [(t.token_id, t) for t in result.logprobs or []]
    tokens, token_logprobs, tops, offsets, offset = [], [], [], [], 0
    for token_id, scored in rows:
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if scored is None:
            token_logprobs.append(None)
            tops.append(None)
            continue
        token_logprobs.append(scored.logprob)
        top = {token_text(tokenizer, i): lp for i, lp in scored.top[:k]}
        top.setdefault(text, scored.logprob)
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def chat_message(result: Completion, use: ToolUse | None) -> tuple[dict, str]:
    """The assistant message of a result, tool calls parsed out per the template's format, and its finish."""
    if use is None:
        return {"role": "assistant", "content": result.text}, result.finish_reason
    content, calls = parse_tool_calls(result.text, use.tool_format, use.tools)
    if use.choice not in ("auto", "required"):
        calls = [c for c in calls if c.name == use.choice]
    if not calls:
        return {"role": "assistant", "content": result.text}, result.finish_reason
    calls = calls if use.parallel else calls[:1]
    return {"role": "assistant", "content": content, "tool_calls": [c.openai() for c in calls]}, "tool_calls"


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- the app -----------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps in one process do not clash)."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("medgpt_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.errors = Counter("medgpt_errors", "HTTP requests answered with an error", ["status"], registry=r)
        self.prompt_tokens = Counter("medgpt_prompt_tokens", "prompt tokens of finished generations", registry=r)
        self.completion_tokens = Counter("medgpt_generation_tokens", "tokens generated", registry=r)
        Gauge("medgpt_queue_length", "requests submitted and not started", registry=r).set_function(engine.waiting)
        Gauge("medgpt_running_requests", "requests in the running batch", registry=r).set_function(engine.running)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.ttft = Histogram("medgpt_time_to_first_token_seconds", "time from submission to the first text",
                              buckets=buckets, registry=r)
        self.tpot = Histogram("medgpt_time_per_output_token_seconds", "time per generated token after the first",
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                              registry=r)


class Guard:
    """ASGI middleware: the API key before anything is read, then the body read in full within max_body_bytes
    (Content-Length checked first, then the bytes counted as they arrive); every answer counted in the metrics."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics, endpoints: set[str]):
        self.app, self.settings, self.metrics, self.endpoints = app, settings, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status: list[int] = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            refusal = self.check_key(scope) or await self.read_body(scope, receive)
            if isinstance(refusal, ApiError):
                await refusal.response()(scope, receive, counted_send)
            elif refusal is not None:
                body, rest = refusal
                replayed = False

                async def replay():
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await rest()

                await self.app(scope, replay, counted_send)
        finally:
            code = status[0] if status else 499  # no answer: the client left first
            self.metrics.requests.labels(endpoint, str(code)).inc()
            if code >= 400:
                self.metrics.errors.labels(str(code)).inc()

    def check_key(self, scope) -> ApiError | None:
        key = self.settings.api_key
        if not key or scope["path"] in OPEN_PATHS:
            return None
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), key.encode("utf-8")):
            return ApiError(401, "a valid API key is required: Authorization: Bearer KEY",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return None

    async def read_body(self, scope, receive):
        """(body, receive for the rest) or an ApiError (413, 400) or None when the client left."""
        limit = self.settings.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit} bytes (--max-body-bytes)",
                           code="request_too_large")
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            if not length.strip().isdigit():
                return ApiError(400, "Content-Length is not a number")
            if int(length) > limit:
                return too_big
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_big
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks), receive


def create_app(engine: Engine, settings: ServerSettings | None = None, augment: Augment | None = None,
               model_name: str | None = None) -> FastAPI:
    """The API app; `augment` (retrieval) rewrites each conversation and its sources come back with the answer.

    Everything a handler needs is on `app.state`: settings, engine, metrics, augment and the model name."""
    settings = settings or ServerSettings()
    docs = settings.docs
    app = FastAPI(title="medgpt", docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.settings = settings
    app.state.engine = engine
    app.state.augment = augment
    app.state.model_name = model_name or engine.name
    app.state.metrics = Metrics(engine)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientGone, client_gone)
    app.add_exception_handler(Exception, server_error)
    for path, handler, methods in ROUTES:
        app.add_api_route(path, handler, methods=methods)
    endpoints = {path for path, _, _ in ROUTES} | {"/docs", "/redoc", "/openapi.json"}
    app.add_middleware(Guard, settings=settings, metrics=app.state.metrics, endpoints=endpoints)
    return app


async def api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
    return exc.response()


async def http_error(request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                       str(exc.detail))
    return ApiError(exc.status_code, message, headers=exc.headers).response()


async def client_gone(request: HttpRequest, exc: ClientGone) -> Response:
    return Response(status_code=499)


async def server_error(request: HttpRequest, exc: Exception) -> JSONResponse:
    log.error("internal error on %s: %r", request.url.path, exc, exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}").response()


# ---- endpoints ---------------------------------------------------------------------------------------------


async def health(request: HttpRequest) -> dict:
    state = request.app.state
    return {"status": "ok", "model": state.model_name, "waiting": state.engine.waiting(),
            "running": state.engine.running()}


async def metrics(request: HttpRequest) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(request: HttpRequest) -> dict:
    state = request.app.state
    entries = [{"id": state.model_name, "object": "model", "created": 0, "owned_by": "medgpt",
                "max_model_len": state.engine.max_context}]
    adapter = getattr(state.engine, "adapter", None)
    if adapter:
        entries.append({"id": Path(adapter).name, "object": "model", "created": 0, "owned_by": "medgpt",
                        "parent": state.model_name, "root": str(adapter)})
    return {"object": "list", "data": entries}


async def chat_completions(request: HttpRequest):
    state = request.app.state
    settings: ServerSettings = state.settings
    body: ChatCompletionRequest = parse_body(await request.body(), ChatCompletionRequest)
    max_tokens, name = ((body.max_completion_tokens, "max_completion_tokens") if body.max_completion_tokens
                        is not None else (body.max_tokens, "max_tokens"))
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"{name} must be >= 1", name)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    k = (body.top_logprobs or 0) if body.logprobs else None
    params = base_params(body, settings, state.engine, max_tokens, name, k, "top_logprobs")
    use, grammar = tool_use(body, state.engine)
    if body.response_format is not None and body.response_format.type != "text":
        if use is not None:
            raise ApiError(400, "response_format: cannot be combined with tools (use tool_choice: none)",
                           "response_format")
        grammar = json_grammar(body.response_format)
    params = dataclasses.replace(params, grammar=grammar)
    messages = [m.engine_message(i) for i, m in enumerate(body.messages)]
    prompt_ids, sources = await encode_chat(state, messages, tools=use.tools if use else None)
    params = checked(fit_length(params, len(prompt_ids), settings, state.engine, max_tokens, name, "messages"))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    extra = {"sources": sources} if state.augment is not None else {}
    if not body.stream:
        results = await generate(request, choices_of(prompt_ids, params, body.n))
        choices = []
        for i, result in enumerate(results):
            message, finish = chat_message(result, use)
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(state.engine.tokenizer, result.logprobs, k or 0)})
        return {**meta, "object": "chat.completion", "choices": choices, "usage": usage(results, body.n), **extra}
    scores = (lambda r: chat_logprobs(state.engine.tokenizer, r.logprobs, k or 0)) if k is not None else None
    events = stream_events(request, prompt_ids, params, body.n, meta, "chat.completion.chunk",
                           body.stream_options, extra, use=use, scores=scores)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def prompts(value: Any, settings: ServerSettings, engine: Engine) -> list[str | list[int]]:
    """The prompts of a completions request: text or token ids, bounded before anything is tokenized."""
    vocab = len(engine.tokenizer)

    def ids_ok(item: Any) -> bool:
        return isinstance(item, list) and bool(item) and all(type(t) is int and 0 <= t < vocab for t in item)

    if isinstance(value, str):
        items: list = [value]
    elif ids_ok(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        items = value
    elif isinstance(value, list) and value and all(ids_ok(p) for p in value):
        items = value
    else:
        raise ApiError(400, f"prompt: expected a string, a list of strings, a list of token ids (0..{vocab - 1}) "
                            "or a list of such lists, none empty", "prompt")
    if len(items) > MAX_PROMPTS:
        raise ApiError(400, f"prompt: at most {MAX_PROMPTS} prompts per request", "prompt")
    for item in items:
        if isinstance(item, str):
            check_chars([item], settings, "prompt")
            if not item:
                raise ApiError(400, "prompt: an empty prompt", "prompt")
    return items


async def completions(request: HttpRequest):
    state = request.app.state
    settings: ServerSettings = state.settings
    engine: Engine = state.engine
    body: CompletionRequest = parse_body(await request.body(), CompletionRequest)
    if body.suffix:
        raise ApiError(400, "suffix: not supported (this server does not fill in the middle)", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise ApiError(400, "best_of: only best_of == n is supported", "best_of")
    max_tokens = body.max_tokens
    if max_tokens is not None and (max_tokens < 0 or (max_tokens == 0 and not body.echo)):
        raise ApiError(400, "max_tokens must be >= 1 (0 only with echo, to score the prompt)", "max_tokens")
    items = prompts(body.prompt, settings, engine)
    params = base_params(body, settings, engine, max_tokens, "max_tokens", body.logprobs, "logprobs")
    echo_scores = body.echo and body.logprobs is not None
    tracked, prepared = [], []
    for item in items:
        ids = item if isinstance(item, list) else await asyncio.to_thread(
            engine.tokenizer.encode, item, add_special_tokens=True)
        fitted = checked(fit_length(params, len(ids), settings, engine, max_tokens, "max_tokens", "prompt"))
        text = item if isinstance(item, str) else engine.tokenizer.decode(ids)
        prepared.append((ids, text))
        tracked.append((ids, fitted))
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    if body.stream:
        if len(items) > 1:
            raise ApiError(400, "stream: one prompt per streamed request on this server", "stream")
        ids, fitted = tracked[0]
        scores = None
        if body.logprobs is not None:
            scores = lambda r: completion_logprobs(engine.tokenizer, ids, r, body.echo, body.logprobs)  # noqa: E731
        events = stream_events(request, ids, fitted, body.n, meta, "text_completion", body.stream_options, {},
                               echo_text=prepared[0][1] if body.echo else None, echo=echo_scores, scores=scores)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    rows = [t for ids, fitted in tracked for t in choices_of(ids, fitted, body.n, echo=echo_scores)]
    results = await generate(request, rows)
    choices = []
    for i, result in enumerate(results):
        ids, text = prepared[i // body.n]
        logprobs = None
        if body.logprobs is not None:
            logprobs = completion_logprobs(engine.tokenizer, ids, result, body.echo, body.logprobs)
        choices.append({"index": i, "text": (text if body.echo else "") + result.text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(results, body.n)}


def stream_events(http: HttpRequest, prompt_ids: list[int], params: GenerationParams, n: int, meta: dict,
                  kind: str, options: StreamOptions | None, extra: dict, use: ToolUse | None = None,
                  echo_text: str | None = None, echo: bool = False,
                  scores: Callable[[Completion], dict] | None = None) -> AsyncIterator[str]:
    """Server-sent events of n streamed choices: text deltas as they come, each choice's finish, usage, [DONE].

    The rows are submitted here, before the response starts, so a refusal (429) is still an error response.
    With tools, a choice's text is held back until it is finished and parsed (tool-call deltas or content).
    `scores` makes a choice's log-probs object, sent with its finishing chunk (all its tokens at once)."""
    state = http.app.state
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def pusher(index: int) -> Callable[[str], None]:
        return lambda delta: loop.call_soon_threadsafe(events.put_nowait, (index, delta))

    tracked = choices_of(prompt_ids, params, n, echo, on_text=None if use else pusher)
    futures = submit(state, tracked)
    for index, future in enumerate(futures):
        future.add_done_callback(lambda _, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, None)))

    return events_of(state, tracked, futures, events, meta, kind, options, extra, use, echo_text, scores)


async def events_of(state: State, tracked: list[Tracked], futures: list, events: asyncio.Queue, meta: dict,
                    kind: str, options: StreamOptions | None, extra: dict, use: ToolUse | None,
                    echo_text: str | None, scores: Callable[[Completion], dict] | None) -> AsyncIterator[str]:
    """The events of `stream_events`' submitted rows, as their deltas and finishes arrive on `events`."""
    chat = kind == "chat.completion.chunk"

    def chunk(index: int, delta: dict | str, finish: str | None = None, logprobs: dict | None = None,
              **more: Any) -> str:
        choice = ({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish} if chat else
                  {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish})
        return sse({**meta, "object": kind, "choices": [choice], **more})

    n = len(tracked)
    results: list[Completion | None] = [None] * n
    try:
        for index in range(n):
            if chat:
                yield chunk(index, {"role": "assistant", "content": ""})
            elif echo_text:
                yield chunk(index, echo_text)
        left = n
        while left:
            index, delta = await events.get()
            if delta is not None:
                yield chunk(index, {"content": delta} if chat else delta)
                continue
            left -= 1
            try:
                result = results[index] = futures[index].result()
            except Exception as exc:
                error = generation_error(exc)
                yield sse(error_body(error.message, error.kind, error.param, error.code))
                return
            finish = result.finish_reason
            if use is not None:
                message, finish = chat_message(result, use)
                if message.get("tool_calls"):
                    calls = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
                    yield chunk(index, {"content": message["content"], "tool_calls": calls} if message["content"]
                                else {"tool_calls": calls})
                elif result.text:
                    yield chunk(index, {"content": result.text})
            yield chunk(index, {} if chat else "", finish, scores(result) if scores else None, **extra)
        done = [r for r in results if r is not None]
        record(state, tracked, done)
        if options is not None and options.include_usage:
            yield sse({**meta, "object": kind, "choices": [], "usage": usage(done, n)})
        yield "data: [DONE]\n\n"
    finally:  # the client may have gone away: stop generating for it
        for t in tracked:
            t.request.cancelled = True


async def seed_chat(request: HttpRequest) -> dict:
    state = request.app.state
    body: SeedChatRequest = parse_body(await request.body(), SeedChatRequest)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "max_tokens must be >= 1", "max_tokens")
    if body.n != 1:
        raise ApiError(400, "n: /chat answers with one choice", "n")
    params = base_params(body, state.settings, state.engine, max_tokens, "max_tokens", None, "logprobs")
    history: list[dict] = []
    for i, turn in enumerate(body.history):
        if isinstance(turn, Message):
            history.append(turn.engine_message(i))
        else:
            history += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages = [*history, {"role": "user", "content": body.message}]
    check_chars([m["content"] for m in messages], state.settings, "message")
    sources: list[dict] = []
    if state.augment:
        messages, sources = await asyncio.to_thread(state.augment, messages)
    try:
        prompt_ids = await asyncio.to_thread(state.engine.encode, messages, body.system or None)
    except UserError as exc:
        raise ApiError(400, f"history: {exc}", "history") from None
    params = checked(fit_length(params, len(prompt_ids), state.settings, state.engine, max_tokens, "max_tokens",
                                "message"))
    result = (await generate(request, choices_of(prompt_ids, params, 1)))[0]
    pairs = [[q["content"], a["content"]] for q, a in zip(history, history[1:])
             if q["role"] == "user" and a["role"] == "assistant"]
    return {"response": result.text, "history": [*pairs, [body.message, result.text]],
            "finish_reason": result.finish_reason, "usage": usage([result]),
            **({"sources": sources} if state.augment is not None else {})}


ROUTES = [("/health", health, ["GET"]), ("/metrics", metrics, ["GET"]), ("/v1/models", models, ["GET"]),
          ("/v1/chat/completions", chat_completions, ["POST"]), ("/v1/completions", completions, ["POST"]),
          ("/chat", seed_chat, ["POST"])]


# ---- running it --------------------------------------------------------------------------------------------


def loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn about before serving: a non-loopback address without an API key."""
    if loopback(host) or api_key:
        return None
    return (f"serving on {host} without an API key: anyone who can reach this address can use the model "
            "(set --api-key or MEDGPT_API_KEY)")


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    warning = exposure_warning(host, app.state.settings.api_key)
    if warning:
        log.warning(warning)
    uvicorn.run(app, host=host, port=port, log_level="info")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                   timeout: float = 30) -> Iterator[str]:
    """Serve `app` in a background thread (tests, benchmarks, notebooks); yields its URL, stops on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port or free_port(host), log_level="warning"))
    thread = threading.Thread(target=server.run, name="medgpt-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{server.config.port}")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
