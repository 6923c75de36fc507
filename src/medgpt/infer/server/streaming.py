"""Streamed answers as server-sent events: the rows' text deltas as they come, each choice's finish, the usage
and `[DONE]`. One `Chunks` subclass per endpoint shapes its chunks (chat deltas or completion text)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future
from typing import Any

from fastapi.responses import StreamingResponse

from medgpt.infer.base import Completion, GenerationParams
from medgpt.infer.reasoning import ReplyReader
from medgpt.infer.server.context import RequestContext, choices_of
from medgpt.infer.server.errors import generation_error
from medgpt.infer.server.responses import chat_logprobs, completion_logprobs, sse, usage
from medgpt.infer.server.tool_use import chat_message


class Chunks:
    """The chunks of one streamed response; `choice` is the endpoint's shape of one choice in a chunk."""

    object = ""
    finishing_delta: Any = None  # the delta of the chunk that finishes a choice

    def __init__(self, ctx: RequestContext):
        self.ctx = ctx

    def choice(self, index: int, delta: Any, finish: str | None = None, logprobs: dict | None = None) -> dict:
        raise NotImplementedError

    def chunk(self, choices: list[dict], **more: Any) -> str:
        return sse({**self.ctx.meta(), "object": self.object, "choices": choices, **more})

    def delta(self, index: int, delta: Any) -> str:
        return self.chunk([self.choice(index, delta)])

    def opening(self, index: int) -> list[str]:
        """What a choice starts with, before any text."""
        return []

    def text(self, index: int, text: str) -> str:
        return self.delta(index, text)

    def held_back(self, index: int, result: Completion) -> tuple[list[str], str]:
        """The chunks of text held back until the choice finished, and its finish reason."""
        return [], result.finish_reason

    def logprobs(self, result: Completion) -> dict | None:
        return None

    def finish(self, index: int, result: Completion) -> list[str]:
        """A finished choice: what was held back, then its finish reason and log-probs (all its tokens at once)."""
        chunks, finish = self.held_back(index, result)
        closing = self.choice(index, self.finishing_delta, finish, self.logprobs(result))
        return [*chunks, self.chunk([closing], **self.ctx.extra())]

    def usage(self, results: list[Completion]) -> str:
        return self.chunk([], usage=usage(results, self.ctx.body.n))


class ChatChunks(Chunks):
    """`chat.completion.chunk`s; with tools, a choice's text comes when it is finished and parsed."""

    object = "chat.completion.chunk"
    finishing_delta: dict = {}

    def __init__(self, ctx: RequestContext, top_logprobs: int | None):
        super().__init__(ctx)
        self.top_logprobs = top_logprobs
        self.readers: dict[int, ReplyReader] = {}  # each choice's reader, where replies are read apart

    def choice(self, index: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, index: int) -> list[str]:
        return [self.delta(index, {"role": "assistant", "content": ""})]

    def text(self, index: int, text: str) -> str:
        reader = self.reader(index)
        if reader is None:
            return self.delta(index, {"content": text})
        return self.parts(index, *reader.feed(text))

    def reader(self, index: int) -> ReplyReader | None:
        if self.ctx.reader is None:
            return None
        return self.readers.setdefault(index, ReplyReader(self.ctx.reader.opened))

    def parts(self, index: int, reasoning: str, answer: str) -> str:
        """The reasoning's delta (`reasoning_content`), then the answer's (`content`); "" for neither."""
        return "".join(self.delta(index, {key: text})
                       for key, text in (("reasoning_content", reasoning), ("content", answer)) if text)

    def held_back(self, index: int, result: Completion) -> tuple[list[str], str]:
        if self.ctx.tool_use is None:
            reader = self.reader(index)
            rest = self.parts(index, *reader.finish()) if reader is not None else ""
            return ([rest] if rest else []), result.finish_reason
        message, finish = chat_message(result, self.ctx.tool_use, self.ctx.reader)
        thought = [self.delta(index, {"reasoning_content": message["reasoning_content"]})] \
            if message.get("reasoning_content") else []
        if message.get("tool_calls"):
            calls = [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]
            content = {"content": message["content"]} if message["content"] else {}
            return [*thought, self.delta(index, {**content, "tool_calls": calls})], finish
        return [*thought, *([self.delta(index, {"content": message["content"]})] if message["content"] else [])], \
            finish

    def logprobs(self, result: Completion) -> dict | None:
        if self.top_logprobs is None:
            return None
        return chat_logprobs(self.ctx.tokenizer, result.logprobs, self.top_logprobs)


class CompletionChunks(Chunks):
    """`text_completion` chunks; with echo, the prompt's text first and its log-probs with the finish."""

    object = "text_completion"
    finishing_delta = ""

    def __init__(self, ctx: RequestContext, prompt_ids: list[int], prompt_text: str):
        super().__init__(ctx)
        self.prompt_ids, self.prompt_text = prompt_ids, prompt_text

    def choice(self, index: int, delta: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
        return {"index": index, "text": delta, "logprobs": logprobs, "finish_reason": finish}

    def opening(self, index: int) -> list[str]:
        return [self.delta(index, self.prompt_text)] if self.ctx.body.echo and self.prompt_text else []

    def logprobs(self, result: Completion) -> dict | None:
        body = self.ctx.body
        if body.logprobs is None:
            return None
        return completion_logprobs(self.ctx.tokenizer, self.prompt_ids, result, body.echo, body.logprobs)


def stream(ctx: RequestContext, chunks: Chunks, prompt_ids: list[int], params: GenerationParams,
           echo: bool = False) -> StreamingResponse:
    """The streamed answer of `ctx.body.n` choices for one prompt. The rows are submitted here, before the response
    starts, so a refusal (429) is still an error response; with tools their text is held back, not pushed."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def pusher(index: int):
        return lambda delta: loop.call_soon_threadsafe(events.put_nowait, (index, delta))

    tracked = choices_of(prompt_ids, params, ctx.body.n, echo, on_text=None if ctx.tool_use else pusher)
    futures = ctx.submit(tracked)
    for index, future in enumerate(futures):
        future.add_done_callback(lambda _, i=index: loop.call_soon_threadsafe(events.put_nowait, (i, None)))
    return StreamingResponse(events_of(chunks, futures, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def events_of(chunks: Chunks, futures: list[Future], events: asyncio.Queue) -> AsyncIterator[str]:
    """The events of the submitted rows, as their deltas and finishes (a None delta) arrive on `events`."""
    ctx = chunks.ctx
    left = len(futures)
    try:
        for index in range(len(futures)):
            for chunk in chunks.opening(index):
                yield chunk
        while left:
            index, delta = await events.get()
            if delta is not None:
                if chunk := chunks.text(index, delta):
                    yield chunk
                continue
            try:
                result = futures[index].result()
            except Exception as exc:
                yield sse(generation_error(exc).body())
                return
            left -= 1
            for chunk in chunks.finish(index, result):
                yield chunk
        results = [future.result() for future in futures]  # in the choices' order
        ctx.record(results)
        if ctx.include_usage():
            yield chunks.usage(results)
        yield "data: [DONE]\n\n"
    finally:  # the client may have gone away: stop generating for it
        ctx.cancel()
