"""An OpenAI-compatible HTTP API (plus the seed's `/chat`) over one engine.

Requests never reach the model one by one while others wait: a background thread takes every waiting
request into one `engine.run` call (rows with their own sampling settings, lengths and stop strings),
and streams each row's text back to its own response through an asyncio queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import State

from medgpt.errors import UserError
from medgpt.infer.base import Augment, Completion, Engine, GenerationParams, Request

log = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    """Limits and defaults of the API; the default system prompt is the engine's (`load_engine(system=...)`)."""

    defaults: GenerationParams = field(default_factory=GenerationParams)  # for fields a request leaves out
    max_tokens_cap: int = 1024  # a request's max_tokens is lowered to this
    max_prompt_tokens: int = 4096  # longer prompts are refused with 400
    max_queue: int = 256  # waiting requests beyond this are refused with 429
    api_key: str | None = None


class Batcher:
    """One worker thread feeding all waiting requests to the engine together."""

    def __init__(self, engine: Engine, max_batch_size: int = 16):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.waiting: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="medgpt-batcher", daemon=True)
        self.batches: list[int] = []  # size of each batch run, for logs and tests

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.waiting.put(None)
        self.thread.join(timeout=30)

    def submit(self, request: Request) -> Future:
        future: Future = Future()
        self.waiting.put((request, future))
        return future

    def _loop(self) -> None:
        while (item := self.waiting.get()) is not None:
            batch = [item]
            while len(batch) < self.max_batch_size:
                try:
                    nxt = self.waiting.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.waiting.put(None)
                    break
                batch.append(nxt)
            self.batches.append(len(batch))
            log.debug("generating a batch of %d", len(batch))
            try:
                results = self.engine.run([request for request, _ in batch])
            except Exception as exc:  # reported to each waiting request; the worker carries on
                log.exception("generation failed")
                for _, future in batch:
                    future.set_exception(exc)
            else:
                for (_, future), result in zip(batch, results):
                    future.set_result(result)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        """Plain text; OpenAI content parts of type text are joined."""
        if isinstance(self.content, str):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise UserError("only text content parts are supported")
        return "".join(part["text"] for part in self.content)


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, gt=0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None

    def params(self, settings: ServerSettings) -> GenerationParams:
        d = settings.defaults
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or d.stop)
        if len(stop) > 8 or not all(stop):
            raise UserError("stop: at most 8 non-empty strings")
        max_tokens = self.max_completion_tokens or self.max_tokens or d.max_new_tokens
        return GenerationParams(
            max_new_tokens=min(max_tokens, settings.max_tokens_cap),
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=d.top_k if self.top_k is None else self.top_k,
            repetition_penalty=d.repetition_penalty if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop, seed=d.seed if self.seed is None else self.seed,
        ).validate()


class ChatCompletionRequest(SamplingFields):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1


class SeedChatRequest(SamplingFields):
    """The seed's `/chat`: one message and the earlier turns as [user, assistant] pairs (or messages)."""

    message: str = Field(min_length=1)
    history: list[tuple[str, str] | Message] = []
    system: str | None = None


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind}}


def create_app(engine: Engine, settings: ServerSettings | None = None, augment: Augment | None = None,
               model_name: str | None = None) -> FastAPI:
    """The API app; `augment` (retrieval) rewrites each conversation and its sources come back with the answer.

    Everything a handler needs is on `app.state`: settings, engine, batcher, augment and the model name.
    """
    app = FastAPI(title="medgpt", lifespan=lifespan)
    app.state.settings = settings or ServerSettings()
    app.state.engine = engine
    app.state.batcher = Batcher(engine, engine.max_batch_size)
    app.state.augment = augment
    app.state.model_name = model_name or engine.name
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(HTTPException, http_error)
    app.include_router(router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.batcher.start()
    yield
    app.state.batcher.stop()


async def invalid_request(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body("the request body is not valid JSON"), status_code=400)
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = first.get("msg", "invalid request")
    return JSONResponse(error_body(f"{where}: {message}" if where else message), status_code=400)


async def user_error(request: HttpRequest, exc: UserError) -> JSONResponse:
    return JSONResponse(error_body(str(exc)), status_code=400)


async def http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(exc.status_code, "invalid_request_error")
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)


def authorize(request: HttpRequest) -> None:
    key = request.app.state.settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), key):
        raise HTTPException(401, "a valid API key is required: Authorization: Bearer KEY",
                            headers={"WWW-Authenticate": "Bearer"})


router = APIRouter()
authorized = [Depends(authorize)]


async def prepare(state: State, messages: list[dict], fields: SamplingFields, system: str | None = None,
                  on_text=None) -> tuple[Request, list[dict]]:
    """The engine request for a conversation (retrieval applied, limits checked) and the sources retrieved.

    `system` is the request's own; the engine's encode settles which system prompt the prompt gets."""
    settings: ServerSettings = state.settings
    params = fields.params(settings)
    sources: list[dict] = []
    if state.augment:
        messages, sources = await asyncio.to_thread(state.augment, messages)
    prompt_ids = await asyncio.to_thread(state.engine.encode, messages, system)
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise UserError(f"the prompt is {len(prompt_ids)} tokens; this server takes at most "
                        f"{settings.max_prompt_tokens}")
    if state.batcher.waiting.qsize() >= settings.max_queue:
        raise HTTPException(429, "too many requests are waiting; retry shortly")
    return Request(prompt_ids, params, on_text), sources


async def complete(batcher: Batcher, request: Request) -> Completion:
    future = batcher.submit(request)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        request.cancelled = True
        raise


@router.get("/health")
async def health(request: HttpRequest) -> dict:
    state = request.app.state
    return {"status": "ok", "model": state.model_name, "waiting": state.batcher.waiting.qsize()}


@router.get("/v1/models", dependencies=authorized)
async def models(request: HttpRequest) -> dict:
    model = {"id": request.app.state.model_name, "object": "model", "created": 0, "owned_by": "medgpt"}
    return {"object": "list", "data": [model]}


@router.post("/v1/chat/completions", dependencies=authorized)
async def chat_completions(body: ChatCompletionRequest, request: HttpRequest):
    state = request.app.state
    if body.n != 1:
        raise UserError("n: only 1 choice per request is supported")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    with_sources = state.augment is not None
    if not body.stream:
        prepared, sources = await prepare(state, messages, body)
        result = await complete(state.batcher, prepared)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": result.finish_reason}],
                "usage": usage(result), **({"sources": sources} if with_sources else {})}
    deltas: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def put(item: str | None) -> None:  # called from the worker thread
        loop.call_soon_threadsafe(deltas.put_nowait, item)

    prepared, sources = await prepare(state, messages, body, on_text=put)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    events = sse(state.batcher, prepared, deltas, put, meta, sources if with_sources else None, include_usage)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def sse(batcher: Batcher, request: Request, deltas: asyncio.Queue, put, meta: dict,
              sources: list[dict] | None, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one streamed completion: role, text deltas, finish (+ sources), usage, [DONE]."""
    future = batcher.submit(request)
    future.add_done_callback(lambda _: put(None))

    def chunk(delta: dict, finish: str | None = None, **extra: Any) -> str:
        data = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while (delta := await deltas.get()) is not None:
            yield chunk({"content": delta})
        try:
            result = future.result()
        except Exception as exc:
            yield f"data: {json.dumps(error_body(f'generation failed: {exc}', 'server_error'))}\n\n"
            return
        yield chunk({}, result.finish_reason, **({"sources": sources} if sources is not None else {}))
        if include_usage:
            data = {**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage(result)}
            yield f"data: {json.dumps(data)}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client may have gone away: stop generating for it
        request.cancelled = True


@router.post("/chat", dependencies=authorized)
async def seed_chat(body: SeedChatRequest, request: HttpRequest) -> dict:
    state = request.app.state
    history: list[dict] = []
    for turn in body.history:
        if isinstance(turn, Message):
            history.append({"role": turn.role, "content": turn.text()})
        else:
            history += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages = [*history, {"role": "user", "content": body.message}]
    prepared, sources = await prepare(state, messages, body, body.system or None)
    result = await complete(state.batcher, prepared)
    pairs = [[q["content"], a["content"]] for q, a in zip(history, history[1:])
             if q["role"] == "user" and a["role"] == "assistant"]
    return {"response": result.text, "history": [*pairs, [body.message, result.text]],
            "finish_reason": result.finish_reason, "usage": usage(result),
            **({"sources": sources} if state.augment is not None else {})}


def usage(result: Completion) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

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
