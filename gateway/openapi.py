"""The gateway's OpenAPI 3.1 document, built from the routes by quart-schema, and its docs page.

Routes declare themselves with :func:`api` (operation id, tag, request/query/response
models, the error statuses they can answer, whether they need a bearer token). quart-schema
turns the models into JSON Schema; :func:`openapi_document` then makes the result say what the
wire says: error responses are ``application/problem+json`` with the :class:`Problem` schema,
rate-limited operations document the ``RateLimit*`` headers (and ``Retry-After`` on 429),
authenticated ones the bearer scheme and the ``WWW-Authenticate`` header on 401.

``GET /openapi.json`` serves it; ``GET /docs`` is a small page rendering it (Scalar, loaded
from a pinned CDN URL; the page's own CSP allows exactly that script).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import pydantic
from quart import Response
from quart_schema import (
    QuartSchema,
    document_querystring,
    document_request,
    document_response,
    hide,
    operation_id,
    security_scheme,
    tag,
)
from quart_trio import QuartTrio

from common.errors import PROBLEM_CONTENT_TYPE

__all__ = [
    "DOCS_SCRIPT",
    "FieldProblem",
    "Problem",
    "api",
    "install_openapi",
    "openapi_document",
]

F = TypeVar("F", bound=Callable[..., Any])

#: Pinned, so the page's CSP and what it loads do not drift.
DOCS_SCRIPT = "https://cdn.jsdelivr.net/npm/@scalar/api-reference@1.25.0"
_META = "_huleedu_api"
_STATUS_TEXT = {
    400: "Malformed request",
    401: "Missing or invalid bearer token",
    403: "Not allowed",
    404: "Not found (or not yours)",
    405: "Method not allowed",
    408: "Request body too slow",
    409: "Conflict with the resource's state",
    413: "Over a size limit (the problem's `field` names it)",
    415: "Unsupported media type",
    422: "Validation failed (the problem's `field` names the field)",
    429: "Rate limited",
    431: "Request headers too large",
    500: "Internal error",
    502: "A backend failed",
    503: "A backend is unavailable (`Retry-After` when its circuit is open)",
    504: "A backend did not answer within the route's budget",
}
#: Every route can answer these (the edge, the limiter, the error handler).
_ALWAYS = (400, 413, 429, 431, 500)
_RATE_HEADERS = {
    "RateLimit-Policy": 'IETF draft: the policy, e.g. `100;w=60;burst=100;name="user"`.',
    "RateLimit": 'IETF draft: what is left, e.g. `"user";r=99;t=0`.',
    "RateLimit-Limit": "Legacy: requests allowed per window.",
    "RateLimit-Remaining": "Legacy: requests left now.",
    "RateLimit-Reset": "Legacy: seconds until the full budget is back.",
}


class FieldProblem(pydantic.BaseModel):
    field: str
    message: str


class Problem(pydantic.BaseModel):
    """An RFC 9457 problem document; every error the gateway answers is one."""

    type: str = pydantic.Field(description="URI of the problem type.")
    title: str
    status: int
    detail: str
    code: str = pydantic.Field(description="Stable machine-readable code, e.g. `not_found`.")
    correlation_id: str | None = pydantic.Field(
        default=None, description="Quote it when reporting a problem."
    )
    instance: str | None = None
    field: str | None = pydantic.Field(
        default=None, description="The request field or the limit setting the problem is about."
    )
    errors: list[FieldProblem] | None = pydantic.Field(
        default=None, description="Every failing field (validation errors)."
    )
    retry_after: int | None = pydantic.Field(default=None, description="Seconds to wait.")


def api(
    op: str,
    group: str,
    *,
    ok: int = 200,
    response: type[pydantic.BaseModel] | None = None,
    request: type[pydantic.BaseModel] | None = None,
    request_content_type: str = "application/json",
    query: type[pydantic.BaseModel] | None = None,
    errors: Iterable[int] = (),
    auth: bool = True,
    rate_limited: bool = True,
) -> Callable[[F], F]:
    """Document a route (apply below ``@app.<method>``)."""
    statuses = sorted({*_ALWAYS, *errors, *((401,) if auth else ())})

    def decorate(func: F) -> F:
        func = operation_id(op)(func)
        func = tag([group])(func)
        if auth:
            func = security_scheme([{"bearer": []}])(func)
        if query is not None:
            func = document_querystring(query)(func)
        if request is not None:
            func = document_request(request)(func)
        if response is not None:
            func = document_response(response, ok)(func)
        for status in statuses:
            func = document_response(Problem, status)(func)
        setattr(
            func,
            _META,
            {
                "op": op,
                "ok": ok,
                "has_body": response is not None,
                "rate_limited": rate_limited,
                "request_content_type": request_content_type if request else None,
            },
        )
        return func

    return decorate


def _fix_operation(operation: dict[str, Any], meta: dict[str, Any]) -> None:
    operation["operationId"] = meta["op"]
    responses: dict[str, Any] = {
        str(code): answer for code, answer in operation.get("responses", {}).items()
    }
    operation["responses"] = responses
    ok = str(meta["ok"])
    if not meta["has_body"]:
        responses[ok] = {"description": "Done (no body)."}
    for status, answer in responses.items():
        code = int(status)
        answer["description"] = (
            _STATUS_TEXT.get(code, answer.get("description", "")) if code >= 400 else "OK"
        )
        if code >= 400:
            content = answer.get("content", {})
            schema = content.pop("application/json", {}).get("schema")
            if schema is not None:
                answer["content"] = {PROBLEM_CONTENT_TYPE: {"schema": schema}}
        headers: dict[str, Any] = {
            "X-Correlation-ID": {"$ref": "#/components/headers/X-Correlation-ID"}
        }
        if meta["rate_limited"]:
            headers.update({h: {"$ref": f"#/components/headers/{h}"} for h in _RATE_HEADERS})
        if code == 429:
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        if code == 401:
            headers["WWW-Authenticate"] = {"$ref": "#/components/headers/WWW-Authenticate"}
        if code == 503:
            headers["Retry-After"] = {"$ref": "#/components/headers/Retry-After"}
        answer["headers"] = headers
    wanted = meta["request_content_type"]
    body = operation.get("requestBody")
    if body is not None:
        body["required"] = True
    if body is not None and wanted and wanted != "application/json":
        body["content"] = {wanted: body["content"].pop("application/json")}
    if not operation.get("parameters"):
        operation.pop("parameters", None)


def openapi_document(app: QuartTrio) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s documented routes."""
    extension: QuartSchema = app.extensions["QUART_SCHEMA"]
    schema = copy.deepcopy(extension.openapi_provider.schema())
    metas: dict[tuple[str, str], dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        meta = getattr(app.view_functions[rule.endpoint], _META, None)
        if meta is None:
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods or ():
            metas[(path, method.lower())] = meta
    paths: dict[str, Any] = schema.get("paths", {})
    for path in list(paths):
        for method in list(paths[path]):
            meta = metas.get((path, method))
            if meta is None:
                del paths[path][method]
                continue
            _fix_operation(paths[path][method], meta)
        if not paths[path]:
            del paths[path]
    components = schema.setdefault("components", {})
    named: dict[str, Any] = components.setdefault("schemas", {})
    for operations in paths.values():
        for operation in operations.values():
            bodies = [operation.get("requestBody", {}), *list(operation["responses"].values())]
            for body in bodies:
                for media in body.get("content", {}).values():
                    media["schema"] = _by_reference(media.get("schema"), named)
    components["headers"] = {
        "X-Correlation-ID": {
            "description": "The request's correlation id (yours when well-formed, else new).",
            "schema": {"type": "string"},
        },
        "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}},
        "WWW-Authenticate": {
            "description": 'Always `Bearer error="invalid_token"`, whatever the cause.',
            "schema": {"type": "string"},
        },
        **{
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in _RATE_HEADERS.items()
        },
    }
    return dict(sorted(schema.items()))


def _by_reference(schema: Any, named: dict[str, Any]) -> Any:
    """A model's schema moved to ``components/schemas`` (by its title) and referenced."""
    if not isinstance(schema, dict) or schema.get("type") != "object" or "title" not in schema:
        return schema
    title = str(schema["title"])
    if named.setdefault(title, schema) != schema:
        return schema  # a different schema under the same title: leave it inline
    return {"$ref": f"#/components/schemas/{title}"}


_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>HuleEdu API</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body><script id="api-reference" data-url="/openapi.json"></script>
<script src="{script}"></script></body></html>
"""


def install_openapi(app: QuartTrio, *, title: str, version: str, description: str) -> None:
    """Set up quart-schema on ``app`` (its own routes off) and serve ``/openapi.json`` and
    ``/docs``."""
    QuartSchema(
        app,
        openapi_path=None,
        redoc_ui_path=None,
        scalar_ui_path=None,
        swagger_ui_path=None,
        info={"title": title, "version": version, "description": description},
        security_schemes={"bearer": {"type": "http", "scheme": "bearer", "bearer_format": "JWT"}},
        tags=[
            {"name": "auth", "description": "Login, token refresh, logout, identity."},
            {"name": "batches", "description": "Batches of essays and their processing."},
            {"name": "files", "description": "Essay files of a batch."},
            {"name": "dashboard", "description": "The teacher's overview."},
        ],
    )
    cached: dict[str, bytes] = {}

    @app.get("/openapi.json")
    @hide
    async def openapi_json() -> Response:
        if "doc" not in cached:
            cached["doc"] = json.dumps(openapi_document(app), separators=(",", ":")).encode()
        return Response(
            cached["doc"],
            content_type="application/json",
            headers={"Cache-Control": "public, max-age=300"},
        )

    @app.get("/docs")
    @hide
    async def docs_page() -> Response:
        origin = DOCS_SCRIPT.split("/npm/")[0]
        return Response(
            _DOCS_PAGE.format(script=DOCS_SCRIPT),
            content_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": (
                    f"default-src 'none'; script-src {origin}; style-src 'unsafe-inline' "
                    f"{origin}; font-src {origin} data:; img-src data: 'self'; "
                    "connect-src 'self'; frame-ancestors 'none'"
                ),
                "Cache-Control": "public, max-age=300",
            },
        )
