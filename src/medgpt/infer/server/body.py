"""A request body read strictly: UTF-8, JSON, an object, nested at most MAX_JSON_DEPTH levels, strings that are
text, then the endpoint's request model and its own checks; anything else is a 400 naming where it is wrong."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import ValidationError

from medgpt.infer.server.errors import InvalidRequest
from medgpt.infer.server.protocol import Strict

MAX_JSON_DEPTH = 32

Model = TypeVar("Model", bound=Strict)


def parse_body(raw: bytes, model: type[Model]) -> Model:
    """The request body as `model` (its `check` passed), or an InvalidRequest that says what is wrong and where."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except RecursionError:
        raise InvalidRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    check_json(data)
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise model_error(data, exc.errors()[0]) from None
    body.check()
    return body


def model_error(data: dict, first: dict) -> InvalidRequest:
    where = ".".join(str(p) for p in field_path(data, first["loc"])) or None
    if first["type"] == "extra_forbidden":
        return InvalidRequest(f"unrecognized request argument: {where} (this server does not support it)", where)
    return InvalidRequest(f"{where}: {first['msg']}" if where else first["msg"], where)


def check_json(value: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings that are not text (lone surrogates)."""
    stack = [(value, 1, "")]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidRequest(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels", where or None)
        keys = list(item) if isinstance(item, dict) else []
        for text in [item] * isinstance(item, str) + keys:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidRequest(f"{where or 'the request body'}: a string holds a lone surrogate "
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
