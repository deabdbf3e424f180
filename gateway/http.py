"""HTTP helpers shared by the gateway's routes: JSON responses, problem documents, strict
body and query parsing (pydantic, unknown fields refused, the failing field named)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

import pydantic
from quart import Response, g, request

from common.errors import (
    HuleEduError,
    RateLimitedError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from gateway.edge import problem_response_parts
from gateway.limits import Limited

__all__ = [
    "Strict",
    "asgi_scope",
    "json_response",
    "parse_query",
    "problem",
    "read_body",
    "validate",
    "with_headers",
]

M = TypeVar("M", bound=pydantic.BaseModel)


class Strict(pydantic.BaseModel):
    """Request models: unknown fields are refused, nothing is coerced silently."""

    model_config = pydantic.ConfigDict(extra="forbid", str_strip_whitespace=False, frozen=True)


def json_response(
    payload: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    body = json.dumps(payload, separators=(",", ":"))
    return Response(
        body, status=status, headers=dict(headers or {}), content_type="application/json"
    )


def asgi_scope() -> dict[str, Any]:
    """The ASGI scope (our edge adds ``huleedu.*`` keys to it)."""
    scope: dict[str, Any] = request.scope  # type: ignore[assignment]
    return scope


def problem(error: HuleEduError) -> Response:
    cid = asgi_scope().get("huleedu.correlation_id")
    status, headers, body = problem_response_parts(
        error, cid if isinstance(cid, str) else None, request.path
    )
    response = Response(body, status=status)
    for raw_name, raw_value in headers:
        response.headers[raw_name.decode()] = raw_value.decode()
    limited: Limited | None = g.get("limited")
    if limited is not None and not isinstance(error, RateLimitedError):
        for name, value in limited.headers().items():
            response.headers.setdefault(name, value)
    return response


async def read_body(model: type[M]) -> M:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise UnsupportedMediaTypeError(
            "request body must be application/json", field="content-type"
        )
    raw = await request.get_data(cache=False, as_text=False)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValidationError("request body is not valid JSON", field="body") from None
    if not isinstance(data, dict):
        raise ValidationError("request body must be a JSON object", field="body")
    return validate(model, data)


def validate(model: type[M], data: Any, *, location: str = "") -> M:
    """``model`` from ``data``; a :class:`ValidationError` naming the first bad field
    (``location`` prefixes field names, e.g. ``"query."``)."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        errors = [
            {
                "field": location + (".".join(str(p) for p in err["loc"]) or "body"),
                "message": "unknown field" if err["type"] == "extra_forbidden" else err["msg"],
            }
            for err in exc.errors()
        ]
        first = errors[0]
        raise ValidationError(
            f"{first['field']}: {first['message']}", field=first["field"], errors=errors
        ) from None


def parse_query(model: type[M]) -> M:
    """``model`` from the query string: each parameter at most once, unknown ones refused."""
    data: dict[str, Any] = {}
    for name, values in request.args.lists():
        if len(values) != 1:
            raise ValidationError(f"{name}: given more than once", field=name)
        data[name] = values[0]
    return validate(model, data)


def with_headers(response: Response, headers: Mapping[str, str]) -> Response:
    for name, value in headers.items():
        response.headers[name] = value
    return response
