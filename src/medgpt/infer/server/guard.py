"""The ASGI middleware in front of every route: the API key, the bounded body, and every answer counted."""

from __future__ import annotations

import secrets

from medgpt.infer.server.errors import ApiError
from medgpt.infer.server.metrics import Metrics
from medgpt.infer.server.settings import ServerSettings

OPEN_PATHS = ("/health",)  # the only paths served without the API key


class Guard:
    """The API key before anything is read, then the body read in full within max_body_bytes (Content-Length
    checked first, then the bytes counted as they arrive); every answer counted in the metrics."""

    def __init__(self, app, settings: ServerSettings, metrics: Metrics, endpoints: set[str]):
        self.app, self.settings, self.metrics, self.endpoints = app, settings, metrics, endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
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
                await self.app(scope, replaying(*refusal), counted_send)
        finally:  # no answer: the client left first
            endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
            self.metrics.answered(endpoint, status[0] if status else 499)

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


def replaying(body: bytes, rest):
    """An ASGI receive that gives the body already read, then hands over to `rest`."""
    replayed = False

    async def receive():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await rest()

    return receive
