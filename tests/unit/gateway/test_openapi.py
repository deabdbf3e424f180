"""The OpenAPI 3.1 document: the committed file is what the app generates, and it says what
the wire says (problem+json errors, bearer security, rate-limit headers, stable ids)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deploy.openapi import SPEC_PATH, gateway_document, render
from tests.unit.gateway.asgi import call

PROTECTED_EXEMPT = {"login", "refresh", "get_jwks"}


@pytest.fixture
async def document() -> dict[str, Any]:
    return await gateway_document()


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, ops in document["paths"].items()
        for method, operation in ops.items()
    ]


async def test_the_committed_spec_is_the_generated_one(document: dict[str, Any]) -> None:
    assert SPEC_PATH.read_text() == render(document), "gateway/openapi.json is stale: make openapi"


async def test_every_route_is_documented_with_a_stable_id_and_a_tag(
    document: dict[str, Any],
) -> None:
    assert document["openapi"] == "3.1.0"
    found = {(m.upper(), p): op["operationId"] for p, m, op in operations(document)}
    assert found == {
        ("POST", "/v1/auth/login"): "login",
        ("POST", "/v1/auth/refresh"): "refresh",
        ("POST", "/v1/auth/logout"): "logout",
        ("GET", "/v1/auth/me"): "get_me",
        ("POST", "/v1/auth/ws-ticket"): "create_ws_ticket",
        ("GET", "/.well-known/jwks.json"): "get_jwks",
        ("POST", "/v1/batches"): "register_batch",
        ("GET", "/v1/batches"): "list_batches",
        ("GET", "/v1/batches/{batch_id}"): "get_batch",
        ("POST", "/v1/batches/{batch_id}/pipelines"): "request_pipeline",
        ("GET", "/v1/batches/{batch_id}/files"): "list_files",
        ("POST", "/v1/batches/{batch_id}/files"): "upload_files",
        ("GET", "/v1/batches/{batch_id}/overview"): "get_batch_overview",
        ("GET", "/v1/dashboard"): "get_dashboard",
    }
    tags = {t["name"] for t in document["tags"]}
    for _, _, op in operations(document):
        assert op["tags"] and set(op["tags"]) <= tags


async def test_errors_are_problem_documents_and_headers_are_documented(
    document: dict[str, Any],
) -> None:
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, method, op in operations(document):
        where = f"{method.upper()} {path}"
        protected = op["operationId"] not in PROTECTED_EXEMPT
        assert (op.get("security") == [{"bearer": []}]) is protected, where
        for status, answer in op["responses"].items():
            headers = answer["headers"]
            assert "X-Correlation-ID" in headers, where
            assert {"RateLimit-Policy", "RateLimit"} <= set(headers), (where, status)
            if int(status) >= 400:
                assert answer["content"] == {
                    "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                }, (where, status)
        assert "Retry-After" in op["responses"]["429"]["headers"]
        if protected:
            assert "WWW-Authenticate" in op["responses"]["401"]["headers"]
    upload = document["paths"]["/v1/batches/{batch_id}/files"]["post"]
    assert list(upload["requestBody"]["content"]) == ["multipart/form-data"]
    for code in ("413", "415", "422"):
        assert code in upload["responses"]
    overview = document["components"]["schemas"]["Overview"]
    assert "incomplete" in overview["required"]


async def test_the_app_serves_the_document_and_a_docs_page(make_gateway: Any) -> None:
    gateway = await make_gateway()
    reply = await call(gateway.http.asgi, "GET", "/openapi.json")
    assert reply.status == 200
    served = reply.json()
    assert served["openapi"] == "3.1.0"
    assert "/v1/auth/login" in served["paths"]
    page = await call(gateway.http.asgi, "GET", "/docs")
    assert page.status == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src https://cdn.jsdelivr.net" in csp and "default-src 'none'" in csp
    assert b'data-url="/openapi.json"' in page.body
    json.dumps(served)
