"""One API request being served (`RequestContext`): what the app serves it with, the parsed body, its response
id, the chat's tool use and retrieved sources, and the engine rows it submitted (`Tracked`, one per choice)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request as HttpRequest

from medgpt.errors import UserError
from medgpt.infer.base import Augment, Completion, Engine, GenerationParams, Request
from medgpt.infer.reasoning import ReplyReader, reply_reader
from medgpt.infer.server.errors import ClientGone, InvalidRequest, generation_error, validated
from medgpt.infer.server.metrics import Metrics
from medgpt.infer.server.protocol import SamplingFields
from medgpt.infer.server.settings import ServerSettings
from medgpt.infer.server.tool_use import ToolUse


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
               on_text: Callable[[int], Callable[[str], None]] | None = None) -> list[Tracked]:
    """n engine requests for one prompt; with a seed, choice k samples with seed + k."""
    return [Tracked(prompt_ids, params if params.seed is None else dataclasses.replace(params, seed=params.seed + k),
                    echo, on_text(k) if on_text else None) for k in range(n)]


@dataclass
class RequestContext:
    """Everything one request is served with; the handlers, the stream and the metrics take this one object."""

    http: HttpRequest
    body: SamplingFields
    engine: Engine
    settings: ServerSettings
    metrics: Metrics
    augment: Augment | None
    model_name: str
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    tool_use: ToolUse | None = None
    sources: list[dict] | None = None  # what retrieval found for a chat (None: no retrieval hook)
    reader: ReplyReader | None = None  # how a chat's replies are read (None: all answer, no reasoning apart)
    tracked: list[Tracked] = field(default_factory=list)

    @classmethod
    def of(cls, http: HttpRequest, body: SamplingFields, id_prefix: str) -> RequestContext:
        state = http.app.state
        return cls(http, body, state.engine, state.settings, state.metrics, state.augment, state.model_name,
                   f"{id_prefix}-{uuid.uuid4().hex}")

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def vocab(self) -> int:
        return len(self.engine.tokenizer)

    def generation_params(self) -> GenerationParams:
        return self.body.generation_params(self.settings, self.vocab())

    def meta(self) -> dict:
        return {"id": self.id, "created": self.created, "model": self.model_name}

    def extra(self) -> dict:
        """What a chat answer carries beyond OpenAI's fields: the retrieved sources."""
        return {} if self.sources is None else {"sources": self.sources}

    def include_usage(self) -> bool:
        return self.body.stream_options is not None and self.body.stream_options.include_usage

    def fit(self, params: GenerationParams, prompt_len: int, prompt_param: str) -> GenerationParams:
        """`params` for a prompt of `prompt_len` tokens (`ServerSettings.fit`), checked."""
        fitted = self.settings.fit(params, prompt_len, self.engine.max_context, self.body.token_limit(), prompt_param)
        return validated(fitted, self.body.param_names())

    async def encode_chat(self, messages: list[dict], system: str | None = None, tools: list[dict] | None = None,
                          chars_param: str = "messages", history_param: str = "messages",
                          enable_thinking: bool | None = None) -> list[int]:
        """Prompt ids of a conversation, retrieval applied (its sources kept in `sources`), and how its replies
        are read (`reader`: the reasoning apart where the template has a reasoning format)."""
        calls = [json.dumps(m["tool_calls"]) for m in messages if m.get("tool_calls")]
        texts = [m["content"] for m in messages] + calls
        self.settings.check_chars(texts + ([json.dumps(tools)] if tools else []), chars_param)
        if self.augment is not None:
            messages, self.sources = await asyncio.to_thread(self.augment, messages)
        kwargs: dict[str, Any] = {"tools": tools} if tools else {}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        try:
            ids = await asyncio.to_thread(self.engine.encode, messages, system, **kwargs)
        except UserError as exc:
            raise InvalidRequest(f"{history_param}: {exc}", history_param) from None
        self.reader = reply_reader(self.engine.template, self.engine.tokenizer, ids)
        return ids

    def submit(self, tracked: list[Tracked]) -> list:
        """Start the rows (429 when the queue is full); they are this request's from here on."""
        self.settings.check_queue(self.engine.waiting(), len(tracked))
        self.tracked = tracked
        return [self.engine.submit(t.request) for t in tracked]

    async def generate(self, tracked: list[Tracked]) -> list[Completion]:
        """Submit, wait, and cancel every row when the client leaves (polled while waiting) or one of them fails."""
        waiter = asyncio.gather(*(asyncio.wrap_future(f) for f in self.submit(tracked)))
        finished = False
        try:
            while True:
                done, _ = await asyncio.wait([waiter], timeout=0.25)
                if done:
                    results = waiter.result()
                    finished = True
                    self.record(results)
                    return results
                if await self.http.is_disconnected():
                    raise ClientGone
        except (ClientGone, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise generation_error(exc) from exc
        finally:
            if not finished:  # the engine resolves the cancelled rows' futures itself, with what they generated
                self.cancel()
                waiter.add_done_callback(lambda f: f.cancelled() or f.exception())

    def cancel(self) -> None:
        for t in self.tracked:
            t.request.cancelled = True

    def record(self, results: list[Completion]) -> None:
        metrics = self.metrics
        for t, result in zip(self.tracked, results):
            metrics.prompt_tokens.inc(result.prompt_tokens)
            metrics.completion_tokens.inc(result.completion_tokens)
            if t.first is not None:
                metrics.ttft.observe(t.first - t.started)
                if result.completion_tokens > 1:
                    metrics.tpot.observe((time.monotonic() - t.first) / (result.completion_tokens - 1))
