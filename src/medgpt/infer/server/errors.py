"""Errors answered as OpenAI error objects `{"error": {"message", "type", "param", "code"}}`.

`InvalidRequest` is a 400 that names the request field at fault in `param`; `validated` turns the engine's check
of generation settings into one, naming the field whose value failed."""

from __future__ import annotations

import dataclasses
import logging

from fastapi.responses import JSONResponse

from medgpt.errors import UserError
from medgpt.infer.base import GenerationParams

log = logging.getLogger(__name__)

KINDS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}
SETTINGS_ERRORS = (UserError, TypeError, ValueError, OverflowError)  # what GenerationParams.validate can raise


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.kind = kind or KINDS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.kind, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class InvalidRequest(ApiError):
    """A 400 about the request; `param` is the field at fault as a dotted path (`messages.0.content`)."""

    def __init__(self, message: str, param: str | None = None, kind: str | None = None):
        super().__init__(400, message, param, kind)


class ClientGone(Exception):
    """The client closed the connection while its request was generating."""


def generation_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserError):
        return InvalidRequest(str(exc))
    log.error("generation failed: %r", exc)
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}")


def validated(params: GenerationParams, names: dict[str, str] | None = None) -> GenerationParams:
    """`params.validate()`; a failure is an InvalidRequest whose param is the field that holds the bad value: the one
    that fails the same way checked on its own (`names`: a field's name in the API where it is not the engine's)."""
    try:
        return params.validate()
    except SETTINGS_ERRORS as exc:
        failure = str(exc)
    neutral = GenerationParams()
    for spec in dataclasses.fields(GenerationParams):
        try:
            dataclasses.replace(neutral, **{spec.name: getattr(params, spec.name)}).validate()
        except SETTINGS_ERRORS as exc:
            if str(exc) == failure:
                param = (names or {}).get(spec.name, spec.name)
                raise InvalidRequest(failure.replace(spec.name, param, 1), param) from None
    raise InvalidRequest(failure) from None
