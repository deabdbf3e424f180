"""The edge pipeline in front of a recording app, on the virtual clock."""

from __future__ import annotations

from typing import Any

import trio

from gateway.edge import EdgeConfig, EdgeMiddleware
from gateway.limits import ClientAddress
from tests.unit.gateway.asgi import call


class Recorder:
    """An ASGI app that records the scope and body it was given and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.scopes.append(dict(scope))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def edge(recorder: Recorder, **over: Any) -> EdgeMiddleware:
    values: dict[str, Any] = {
        "max_body_bytes": 1000,
        "body_timeout_s": 10.0,
        "max_header_bytes": 2000,
        "cors_origins": frozenset({"https://app.test"}),
        "client_address": ClientAddress(["10.0.0.0/8"]),
        **over,
    }
    return EdgeMiddleware(recorder, EdgeConfig(**values))


async def test_identity_headers_are_stripped_whatever_their_case() -> None:
    rec = Recorder()
    spoofed = [
        ("X-User-ID", "u-admin"),
        ("x-user-roles", "admin"),
        ("X-ORG-ID", "o1"),
        ("X-Auth-Request-User", "root"),
        ("X-Forwarded-User", "root"),
        ("Remote-User", "root"),
        ("X-HuleEdu-Actor", "root"),
        ("Accept", "application/json"),
    ]
    reply = await call(edge(rec), "GET", "/x", headers=spoofed)
    assert reply.status == 200
    names = [k for k, _ in rec.scopes[0]["headers"]]
    assert names == [b"accept"]


async def test_correlation_id_is_bound_and_echoed() -> None:
    rec = Recorder()
    app = edge(rec)
    kept = await call(app, "GET", "/x", headers=[("X-Correlation-ID", "req-42")])
    assert kept.headers["x-correlation-id"] == "req-42"
    assert rec.scopes[0]["huleedu.correlation_id"] == "req-42"
    fresh = await call(app, "GET", "/x", headers=[("X-Correlation-ID", "<script>")])
    assert fresh.headers["x-correlation-id"] not in ("<script>", "")


async def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    rec = Recorder()
    app = edge(rec)
    chain = [("X-Forwarded-For", "198.51.100.9, 10.1.1.1")]
    await call(app, "GET", "/x", headers=chain, client=("10.0.0.5", 1))
    await call(app, "GET", "/x", headers=chain, client=("203.0.113.1", 1))
    await call(
        app, "GET", "/x", headers=[("X-Forwarded-For", "junk, 10.1.1.1")], client=("10.0.0.5", 1)
    )
    assert [s["huleedu.client"] for s in rec.scopes] == ["198.51.100.9", "203.0.113.1", "10.0.0.5"]


async def test_connect_h2c_and_oversized_headers_are_refused_before_the_app() -> None:
    rec = Recorder()
    app = edge(rec)
    connect = await call(app, "CONNECT", "example.com:443")
    h2c = await call(app, "GET", "/x", headers=[("Upgrade", "h2c")])
    big = await call(app, "GET", "/x", headers=[(f"x-pad-{i}", "y" * 300) for i in range(10)])
    assert (connect.status, connect.json()["code"]) == (405, "method_not_allowed")
    assert (h2c.status, h2c.json()["field"]) == (400, "upgrade")
    assert (big.status, big.json()["field"]) == (431, "max_header_bytes")
    assert big.headers["connection"] == "close"
    assert rec.scopes == []


async def test_an_oversized_credential_is_replaced_not_counted() -> None:
    rec = Recorder()
    app = edge(rec, max_credential_bytes=100)
    reply = await call(app, "GET", "/x", headers=[("Authorization", "Bearer " + "a" * 1500)])
    assert reply.status == 200
    assert dict(rec.scopes[0]["headers"])[b"authorization"] == b"Oversized credential"


async def test_body_limit_declared_and_streamed() -> None:
    rec = Recorder()
    app = edge(rec)
    declared = await call(app, "POST", "/x", headers=[("content-length", "5000")], body=b"x")
    streamed = await call(app, "POST", "/x", body=[b"x" * 600, b"x" * 600])
    bad = await call(app, "POST", "/x", headers=[("content-length", "12abc")], body=b"x")
    ok = await call(app, "POST", "/x", body=[b"a" * 500, b"b" * 500])
    assert (declared.status, declared.json()["field"]) == (413, "max_body_bytes")
    assert (streamed.status, streamed.headers["connection"]) == (413, "close")
    assert (bad.status, bad.json()["field"]) == (400, "content-length")
    assert ok.status == 200 and rec.bodies == [b"a" * 500 + b"b" * 500]


async def test_a_slow_body_is_cut_exactly_at_the_deadline(autojump_clock: Any) -> None:
    rec = Recorder()
    app = edge(rec, body_timeout_s=10.0)
    start = trio.current_time()
    within = await call(app, "POST", "/x", body=[b"a", b"b", b"c"], gaps_s=4.9)
    assert within.status == 200 and trio.current_time() - start == 9.8
    start = trio.current_time()
    slow = await call(app, "POST", "/x", body=[b"a", b"b", b"c"], gaps_s=6.0)
    assert trio.current_time() - start == 10.0
    assert slow.status == 408 and slow.json()["code"] == "request_timeout"
    assert slow.headers["connection"] == "close"
    assert app.stats.bodies_cut == 1 and len(rec.scopes) == 1


async def test_cors_preflight_and_response_headers() -> None:
    rec = Recorder()
    app = edge(rec)
    pre = await call(
        app,
        "OPTIONS",
        "/v1/auth/me",
        headers=[("Origin", "https://app.test"), ("Access-Control-Request-Method", "GET")],
    )
    assert pre.status == 204 and pre.headers["access-control-max-age"] == "600"
    denied = await call(
        app,
        "OPTIONS",
        "/v1/auth/me",
        headers=[("Origin", "https://other.test"), ("Access-Control-Request-Method", "GET")],
    )
    assert denied.status == 403
    simple = await call(app, "GET", "/x", headers=[("Origin", "https://app.test")])
    assert simple.headers["access-control-allow-origin"] == "https://app.test"
    assert "RateLimit-Remaining" in simple.headers["access-control-expose-headers"]
    assert rec.scopes and all(s["method"] != "OPTIONS" for s in rec.scopes)


async def test_security_headers_on_every_response_and_no_store_by_default() -> None:
    rec = Recorder()
    reply = await call(edge(rec), "GET", "/x")
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert reply.headers["strict-transport-security"].startswith("max-age=")
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert reply.headers["referrer-policy"] == "no-referrer"


async def test_metrics_use_the_route_template_only() -> None:
    async def app_with_route(scope: Any, receive: Any, send: Any) -> None:
        scope["huleedu.route"] = "/v1/batches/<batch_id>"
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = EdgeMiddleware(app_with_route, edge(Recorder()).config)
    await call(mw, "GET", "/v1/batches/abc-123")
    assert list(mw.stats.requests) == [("GET", "/v1/batches/<batch_id>", 200)]
