"""The request bodies of the API as pydantic models. Each checks what pydantic cannot (`check`) and turns itself
into the engine's `GenerationParams` (`generation_params`: the one place a request's values meet the defaults)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from medgpt.infer.base import GenerationParams
from medgpt.infer.server.errors import InvalidRequest, validated
from medgpt.infer.server.settings import Asked, ServerSettings

MAX_PROMPTS = 64  # prompts in one /v1/completions request
TEMPLATE_KWARGS = ("enable_thinking",)  # the chat_template_kwargs the templates honour
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed")


class Strict(BaseModel):
    """Unknown fields are refused (OpenAI's "Unrecognized request argument"), not silently dropped."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def check(self) -> None:
        """Rules between fields, checked once the body is parsed."""


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
    reasoning_content: str | None = None  # an assistant's reasoning, as this server and vLLM return it

    def text(self, i: int) -> str:
        """Plain text; OpenAI content parts of type text are joined; null only on an assistant's tool-call turn."""
        where = f"messages.{i}.content"
        if self.content is None:
            if self.role == "assistant" and self.tool_calls:
                return ""
            raise InvalidRequest(f"{where}: null content is only allowed on an assistant turn with tool_calls", where)
        if isinstance(self.content, str):
            return self.content
        for k, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise InvalidRequest(f"{where}.{k}: only text content parts ({{type: text, text: str}}) are "
                                     "supported", f"{where}.{k}")
        return "".join(part["text"] for part in self.content)

    def engine_message(self, i: int) -> dict:
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role,
                                   "content": self.text(i)}
        if self.tool_calls:
            message["tool_calls"] = [self.engine_call(i, k) for k in range(len(self.tool_calls))]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.reasoning_content:
            if self.role != "assistant":
                where = f"messages.{i}.reasoning_content"
                raise InvalidRequest(f"{where}: only an assistant message carries reasoning", where)
            message["reasoning"] = self.reasoning_content
        return message

    def engine_call(self, i: int, k: int) -> dict:
        """Tool call k as the templates take it: arguments as an object, not JSON text."""
        call = self.tool_calls[k]
        arguments = json_value(call.function.arguments)
        if not isinstance(arguments, dict):
            where = f"messages.{i}.tool_calls.{k}.function.arguments"
            raise InvalidRequest(f"{where}: expected the JSON text of an object", where)
        return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": arguments}}


def json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


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
    """The fields every generating endpoint shares, and their conversion into `GenerationParams`."""

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

    def token_limit(self) -> Asked:
        """The answer's length as asked (None: what fits), with its field's name."""
        return Asked(None, "max_tokens")

    def logprobs_asked(self) -> Asked:
        """How many top tokens to return with each token's log-prob (None: no log-probs), with its field's name."""
        return Asked(None, "logprobs")

    def param_names(self) -> dict[str, str]:
        """The API's names of the GenerationParams fields this request names otherwise."""
        return {"max_new_tokens": self.token_limit().param, "logprobs": self.logprobs_asked().param}

    def generation_params(self, settings: ServerSettings, vocab: int) -> GenerationParams:
        """What this request generates with: each field as the request sets it, else `settings.defaults` (which
        `medgpt serve` builds with `options.serve_params`: its flags, else the model's generation config, else
        OpenAI's and vLLM's defaults; nothing else is added, so temperature 0 is plain greedy decoding).
        max_new_tokens is settled per prompt, once its length is known (`ServerSettings.fit`)."""
        limit = self.token_limit()
        settings.check_choices(self.n, limit)
        defaults = settings.defaults
        given = {name: getattr(self, name) for name in SAMPLING if getattr(self, name) is not None}
        stop = [self.stop] if isinstance(self.stop, str) else list(defaults.stop if self.stop is None else self.stop)
        params = dataclasses.replace(
            defaults, **given, stop=stop, logit_bias=self.token_bias(vocab), logprobs=self.logprobs_asked().value,
            max_new_tokens=max(1, defaults.max_new_tokens if limit.value is None else limit.value))
        validated(params, self.param_names())
        if params.seed is not None and self.n > 1:  # choice k samples with seed + k
            validated(dataclasses.replace(params, seed=params.seed + self.n - 1))
        return params

    def token_bias(self, vocab: int) -> dict[int, float]:
        bias: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or int(key) >= vocab:
                raise InvalidRequest(f"logit_bias: {key!r} is not a token id of this model (0..{vocab - 1})",
                                     "logit_bias")
            bias[int(key)] = value
        return bias


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
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's: options of the chat template (enable_thinking)

    def check(self) -> None:
        limit = self.token_limit()
        if limit.value is not None and limit.value < 1:
            raise InvalidRequest(f"{limit.param} must be >= 1", limit.param)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs: needs logprobs: true", "top_logprobs")
        for key, value in (self.chat_template_kwargs or {}).items():
            where = f"chat_template_kwargs.{key}"
            if key not in TEMPLATE_KWARGS:
                raise InvalidRequest(f"{where}: not a chat template option of this server (it takes "
                                     f"{', '.join(TEMPLATE_KWARGS)})", where)
            if not isinstance(value, bool):
                raise InvalidRequest(f"{where}: expected true or false", where)

    def enable_thinking(self) -> bool | None:
        """The request's thinking switch (None: the server's default)."""
        return (self.chat_template_kwargs or {}).get("enable_thinking")

    def token_limit(self) -> Asked:
        if self.max_completion_tokens is not None:
            return Asked(self.max_completion_tokens, "max_completion_tokens")
        return Asked(self.max_tokens, "max_tokens")

    def logprobs_asked(self) -> Asked:
        return Asked((self.top_logprobs or 0) if self.logprobs else None, "top_logprobs")

    def engine_messages(self) -> list[dict]:
        return [m.engine_message(i) for i, m in enumerate(self.messages)]


class CompletionRequest(SamplingFields):
    prompt: Any = None  # str, [str], [int] or [[int]]: checked in `prompts`
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check(self) -> None:
        if self.suffix:
            raise InvalidRequest("suffix: not supported (this server does not fill in the middle)", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest("best_of: only best_of == n is supported", "best_of")
        if self.max_tokens is not None and (self.max_tokens < 0 or (self.max_tokens == 0 and not self.echo)):
            raise InvalidRequest("max_tokens must be >= 1 (0 only with echo, to score the prompt)", "max_tokens")

    def token_limit(self) -> Asked:
        return Asked(self.max_tokens, "max_tokens")

    def logprobs_asked(self) -> Asked:
        return Asked(self.logprobs, "logprobs")

    def prompts(self, settings: ServerSettings, vocab: int) -> list[str | list[int]]:
        """The prompts: text or token ids, bounded before anything is tokenized."""
        items = prompt_items(self.prompt, vocab)
        if items is None:
            raise InvalidRequest(f"prompt: expected a string, a list of strings, a list of token ids "
                                 f"(0..{vocab - 1}) or a list of such lists, none empty", "prompt")
        if len(items) > MAX_PROMPTS:
            raise InvalidRequest(f"prompt: at most {MAX_PROMPTS} prompts per request", "prompt")
        for item in items:
            if isinstance(item, str):
                settings.check_chars([item], "prompt")
                if not item:
                    raise InvalidRequest("prompt: an empty prompt", "prompt")
        return items


def prompt_items(value: Any, vocab: int) -> list | None:
    """A completions prompt as a list of prompts (a string or token ids each), None when it is neither."""
    def ids_ok(item: Any) -> bool:
        return isinstance(item, list) and bool(item) and all(type(t) is int and 0 <= t < vocab for t in item)

    if isinstance(value, str) or ids_ok(value):
        return [value]
    if isinstance(value, list) and value and (all(isinstance(p, str) for p in value) or all(map(ids_ok, value))):
        return value
    return None


class SeedChatRequest(SamplingFields):
    """The seed's `/chat`: one message and the earlier turns as [user, assistant] pairs (or messages)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    message: str = Field(min_length=1)
    history: list[tuple[str, str] | Message] = []
    system: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None

    def check(self) -> None:
        limit = self.token_limit()
        if limit.value is not None and limit.value < 1:
            raise InvalidRequest("max_tokens must be >= 1", "max_tokens")
        if self.n != 1:
            raise InvalidRequest("n: /chat answers with one choice", "n")

    def token_limit(self) -> Asked:
        return Asked(self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
                     "max_tokens")

    def engine_history(self) -> list[dict]:
        history: list[dict] = []
        for i, turn in enumerate(self.history):
            if isinstance(turn, Message):
                history.append(turn.engine_message(i))
            else:
                history += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
        return history
