"""The app: routes, `create_app`, the exception handlers, and the endpoints that generate nothing."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from medgpt.infer.base import Augment, Engine
from medgpt.infer.server.errors import ApiError, ClientGone
from medgpt.infer.server.guard import Guard
from medgpt.infer.server.metrics import Metrics
from medgpt.infer.server.serving_chat import chat_completions, seed_chat
from medgpt.infer.server.serving_completion import completions
from medgpt.infer.server.settings import ServerSettings

log = logging.getLogger(__name__)
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


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
                "max_model_len": state.engine.max_context,
                "medgpt_defaults": state.settings.described_defaults()}]  # an extra field OpenAI clients keep
    adapter = getattr(state.engine, "adapter", None)
    if adapter:
        entries.append({"id": Path(adapter).name, "object": "model", "created": 0, "owned_by": "medgpt",
                        "parent": state.model_name, "root": str(adapter)})
    return {"object": "list", "data": entries}


ROUTES = [("/health", health, ["GET"]), ("/metrics", metrics, ["GET"]), ("/v1/models", models, ["GET"]),
          ("/v1/chat/completions", chat_completions, ["POST"]), ("/v1/completions", completions, ["POST"]),
          ("/chat", seed_chat, ["POST"])]


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
    endpoints = {path for path, _, _ in ROUTES} | set(DOC_PATHS)
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
