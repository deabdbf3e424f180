"""The gateway over real TLS sockets, with HTTP/1.1 and HTTP/2 clients: login, refresh rotation,
logout, /me, JWKS, tickets, and the edge pipeline (headers, errors, limits, CORS)."""

from __future__ import annotations

import json
import time
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from common.tokens import KeySet, TokenVerifier, VerifierPolicy
from gateway.settings import LimitSettings
from tests.integration.gateway.conftest import DISABLED, TEACHER, TEACHER2, Gateway

pytestmark = pytest.mark.slow

SECURITY = {
    "strict-transport-security": "max-age=63072000; includeSubDomains",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = reply.json()
    assert body["status"] == status and body["code"] == code, body
    assert body["correlation_id"] == reply.headers["x-correlation-id"]
    for name, value in SECURITY.items():
        assert reply.headers[name] == value
    return body


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
async def test_login_me_refresh_logout_journey(gateway: Gateway, http2: bool) -> None:
    async with gateway.client(http2=http2) as client:
        login = await client.post(
            "/v1/auth/login", json={"email": TEACHER.email.upper(), "password": TEACHER.password}
        )
        assert login.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
        assert login.status_code == 200, login.text
        tokens = login.json()
        assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 900
        assert tokens["user"]["user_id"] == TEACHER.user_id
        assert len(tokens["refresh_token"]) == 43
        assert login.headers["cache-control"] == "no-store"
        assert login.headers["ratelimit-policy"].startswith('"login-')

        me = await client.get("/v1/auth/me", headers=bearer(tokens["access_token"]))
        assert me.status_code == 200
        assert me.json()["user_id"] == TEACHER.user_id
        assert me.json()["org_id"] == TEACHER.org_id
        assert me.headers["cache-control"] == "no-store"
        for name, value in SECURITY.items():
            assert me.headers[name] == value
        assert me.headers["ratelimit-policy"] == '"user";q=600;w=60'
        assert me.headers["ratelimit"].startswith('"user";r=')
        assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(me.headers)

        rotated = await client.post(
            "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert rotated.status_code == 200, rotated.text
        fresh = rotated.json()
        assert fresh["session_id"] == tokens["session_id"]
        assert fresh["refresh_token"] != tokens["refresh_token"]

        out = await client.post("/v1/auth/logout", headers=bearer(fresh["access_token"]))
        assert out.status_code == 204
        for token in (tokens["access_token"], fresh["access_token"]):
            refused = await client.get("/v1/auth/me", headers=bearer(token))
            assert_problem(refused, 401, "unauthenticated")
        again = await client.post(
            "/v1/auth/refresh", json={"refresh_token": fresh["refresh_token"]}
        )
        assert_problem(again, 401, "unauthenticated")


async def test_replayed_refresh_token_revokes_the_whole_session(gateway: Gateway) -> None:
    async with gateway.client() as client:
        tokens = await gateway.login(client)
        first = await client.post(
            "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert first.status_code == 200
        newer = first.json()
        replay = await client.post(
            "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
        assert_problem(replay, 401, "unauthenticated")
        # The family is dead: the legitimate newer refresh token and its access token too.
        dead = await client.post("/v1/auth/refresh", json={"refresh_token": newer["refresh_token"]})
        assert_problem(dead, 401, "unauthenticated")
        me = await client.get("/v1/auth/me", headers=bearer(newer["access_token"]))
        assert_problem(me, 401, "unauthenticated")
        # Another session of the same user is untouched.
        other = await gateway.login(client)
        ok = await client.get("/v1/auth/me", headers=bearer(other["access_token"]))
        assert ok.status_code == 200


async def test_fifty_concurrent_refreshes_of_one_token_one_success(start_gateway: Any) -> None:
    gateway: Gateway = await start_gateway(limit_refresh=LimitSettings(limit=100, period_s=1))
    async with gateway.client(http2=True) as client:
        tokens = await gateway.login(client)
        statuses: list[int] = []

        async def attempt() -> None:
            reply = await client.post(
                "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
            )
            statuses.append(reply.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(attempt)
    assert statuses.count(200) == 1, statuses
    assert statuses.count(401) == 49, statuses


async def test_failed_logins_look_the_same_for_unknown_and_known_users(gateway: Gateway) -> None:
    async with gateway.client() as client:
        replies = [
            await client.post("/v1/auth/login", json={"email": e, "password": p})
            for e, p in [
                (TEACHER2.email, "wrong password"),
                ("nobody@huleedu.test", "wrong password"),
                (DISABLED.email, DISABLED.password),
            ]
        ]
    bodies = []
    for reply in replies:
        body = assert_problem(reply, 401, "unauthenticated")
        assert reply.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        bodies.append({k: v for k, v in body.items() if k != "correlation_id"})
    assert bodies[0] == bodies[1] == bodies[2]


async def test_jwks_publishes_the_signing_key_and_tokens_verify_offline(gateway: Gateway) -> None:
    async with gateway.client() as client:
        jwks = await client.get("/.well-known/jwks.json")
        tokens = await gateway.login(client)
        ticket = await client.post("/v1/auth/ws-ticket", headers=bearer(tokens["access_token"]))
    assert jwks.status_code == 200 and jwks.headers["cache-control"] == "public, max-age=300"
    keys = KeySet.from_jwks(jwks.json())
    assert len(keys.kids()) == 1
    s = gateway.settings
    verifier = TokenVerifier(VerifierPolicy(issuer=s.issuer, audience=s.audience), keys)
    claims = verifier.verify(tokens["access_token"], time.time())
    assert claims.sub == TEACHER.user_id and claims.roles == TEACHER.roles
    # A ticket verifies under the ticket policy only, and only for 30 s.
    assert ticket.status_code == 200 and ticket.json()["expires_in"] == 30
    ticket_policy = VerifierPolicy(
        issuer=s.issuer, audience=s.audience, expected_typ="ws_ticket", max_lifetime_s=30
    )
    ticket_claims = TokenVerifier(ticket_policy, keys).verify(ticket.json()["ticket"], time.time())
    assert ticket_claims.sid == claims.sid and ticket_claims.exp - ticket_claims.iat == 30


async def test_a_ticket_or_refresh_token_is_not_an_access_token(gateway: Gateway) -> None:
    async with gateway.client() as client:
        tokens = await gateway.login(client)
        ticket = await client.post("/v1/auth/ws-ticket", headers=bearer(tokens["access_token"]))
        for token in (ticket.json()["ticket"], tokens["refresh_token"]):
            reply = await client.get("/v1/auth/me", headers=bearer(token))
            assert_problem(reply, 401, "unauthenticated")


async def test_correlation_id_is_kept_when_well_formed_and_replaced_otherwise(
    gateway: Gateway,
) -> None:
    async with gateway.client() as client:
        kept = await client.get("/.well-known/jwks.json", headers={"X-Correlation-ID": "abc-123"})
        replaced = await client.get(
            "/.well-known/jwks.json", headers={"X-Correlation-ID": "bad id\twith junk" * 20}
        )
        missing = await client.get("/nope")
    assert kept.headers["x-correlation-id"] == "abc-123"
    assert replaced.headers["x-correlation-id"] not in ("", "bad id\twith junk" * 20)
    body = assert_problem(missing, 404, "not_found")
    assert body["correlation_id"] == missing.headers["x-correlation-id"]


async def test_validation_errors_name_the_field_and_unknown_fields_are_refused(
    gateway: Gateway,
) -> None:
    async with gateway.client() as client:
        extra = await client.post(
            "/v1/auth/login",
            json={"email": TEACHER.email, "password": TEACHER.password, "role": "admin"},
        )
        missing = await client.post("/v1/auth/login", json={"email": TEACHER.email})
        not_json = await client.post(
            "/v1/auth/login", content=b"{nope", headers={"content-type": "application/json"}
        )
        array = await client.post("/v1/auth/login", json=[1, 2])
        form = await client.post("/v1/auth/login", data={"email": "a"})
        wrong_method = await client.get("/v1/auth/login")
    body = assert_problem(extra, 422, "validation_failed")
    assert body["field"] == "role" and body["errors"][0]["message"] == "unknown field"
    assert assert_problem(missing, 422, "validation_failed")["field"] == "password"
    assert assert_problem(not_json, 422, "validation_failed")["field"] == "body"
    assert assert_problem(array, 422, "validation_failed")["field"] == "body"
    assert assert_problem(form, 415, "unsupported_media_type")["field"] == "content-type"
    assert assert_problem(wrong_method, 405, "method_not_allowed")["field"] == "method"


async def test_oversized_bodies_and_headers_are_refused(start_gateway: Any) -> None:
    gateway: Gateway = await start_gateway(max_body_bytes=2048, max_header_bytes=4096)
    async with gateway.client() as client:
        declared = await client.post(
            "/v1/auth/login",
            content=b"x" * 4096,
            headers={"content-type": "application/json"},
        )

        async def chunks() -> Any:
            for _ in range(8):
                yield b"x" * 512

        streamed = await client.post(
            "/v1/auth/login", content=chunks(), headers={"content-type": "application/json"}
        )
    async with gateway.client() as client:
        headers = await client.get(
            "/.well-known/jwks.json", headers={f"x-pad-{i}": "y" * 500 for i in range(10)}
        )
    assert assert_problem(declared, 413, "payload_too_large")["field"] == "max_body_bytes"
    assert assert_problem(streamed, 413, "payload_too_large")["field"] == "max_body_bytes"
    assert assert_problem(headers, 431, "headers_too_large")["field"] == "max_header_bytes"


async def test_h2c_upgrade_and_connect_are_refused(gateway: Gateway) -> None:
    async with gateway.client() as client:
        upgrade = await client.get(
            "/.well-known/jwks.json",
            headers={"Upgrade": "h2c", "Connection": "Upgrade, HTTP2-Settings"},
        )
    assert assert_problem(upgrade, 400, "client_error")["field"] == "upgrade"
    # CONNECT over a raw TLS stream (httpx does not send CONNECT to an origin server).
    host, port = gateway.url.removeprefix("https://").rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(
        host, int(port), ssl_context=gateway.tls(["http/1.1"]), https_compatible=True
    )
    async with stream:
        await stream.send_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        data = b""
        with trio.fail_after(5):
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405"), head
    assert json.loads(body)["field"] == "method"


async def test_client_identity_headers_never_reach_the_app(gateway: Gateway) -> None:
    async with gateway.client() as client:
        tokens = await gateway.login(client, TEACHER2)
        me = await client.get(
            "/v1/auth/me",
            headers={
                **bearer(tokens["access_token"]),
                "X-User-ID": TEACHER.user_id,
                "x-uSeR-rOlEs": "admin",
                "X-Org-ID": "org-other",
            },
        )
    assert me.status_code == 200
    assert me.json()["user_id"] == TEACHER2.user_id and me.json()["roles"] == ["teacher"]


async def test_cors_allow_list_and_exposed_rate_limit_headers(start_gateway: Any) -> None:
    gateway: Gateway = await start_gateway(cors_origins=("https://app.huleedu.test",))
    async with gateway.client() as client:
        preflight = await client.options(
            "/v1/auth/me",
            headers={
                "Origin": "https://app.huleedu.test",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        foreign = await client.options(
            "/v1/auth/me",
            headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "GET"},
        )
        simple = await client.get(
            "/.well-known/jwks.json", headers={"Origin": "https://app.huleedu.test"}
        )
        other = await client.get("/.well-known/jwks.json", headers={"Origin": "https://evil.test"})
    assert preflight.status_code == 204
    assert "Authorization" in preflight.headers["access-control-allow-headers"]
    assert preflight.headers["access-control-allow-origin"] == "https://app.huleedu.test"
    assert_problem(foreign, 403, "permission_denied")
    assert "access-control-allow-origin" not in foreign.headers
    exposed = simple.headers["access-control-expose-headers"]
    for name in ("RateLimit", "RateLimit-Policy", "Retry-After", "X-Correlation-ID"):
        assert name in exposed
    assert simple.headers["vary"] == "Origin"
    assert "access-control-allow-origin" not in other.headers


async def test_login_brute_force_is_rate_limited_identically_for_any_account(
    start_gateway: Any,
) -> None:
    """S8: 100 wrong passwords within 60 s from 10 addresses (a trusted proxy says which)."""
    gateway: Gateway = await start_gateway(trusted_proxies=("127.0.0.1/32",))
    results: dict[str, list[httpx.Response]] = {}
    async with gateway.client(http2=True) as client:
        for email, net in ((TEACHER2.email, "203.0.113"), ("nobody@huleedu.test", "198.51.100")):
            replies = []
            for i in range(100):
                replies.append(
                    await client.post(
                        "/v1/auth/login",
                        json={"email": email, "password": f"guess-{i}"},
                        headers={"X-Forwarded-For": f"{net}.{i % 10 + 1}"},
                    )
                )
            results[email] = replies
    for email, replies in results.items():
        limited = [r for r in replies if r.status_code == 429]
        assert len(limited) >= 90, (email, len(limited))
        assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
        assert all(r.status_code in (401, 429) for r in replies)
        assert_problem(limited[0], 429, "rate_limited")
    known = [r.status_code for r in results[TEACHER2.email]]
    unknown = [r.status_code for r in results["nobody@huleedu.test"]]
    assert known == unknown
    k429 = next(r for r in results[TEACHER2.email] if r.status_code == 429).json()
    u429 = next(r for r in results["nobody@huleedu.test"] if r.status_code == 429).json()
    assert {k: v for k, v in k429.items() if k != "correlation_id"} == {
        k: v for k, v in u429.items() if k != "correlation_id"
    }


async def test_forwarded_for_is_ignored_from_untrusted_peers(start_gateway: Any) -> None:
    gateway: Gateway = await start_gateway()  # no trusted proxies
    async with gateway.client() as client:
        statuses = [
            (
                await client.post(
                    "/v1/auth/refresh",
                    json={"refresh_token": "x" * 43},
                    headers={"X-Forwarded-For": f"198.51.100.{i}"},
                )
            ).status_code
            for i in range(40)
        ]
    # All 40 count against 127.0.0.1 (refresh: burst 10), whatever the header claims.
    assert statuses.count(429) == 30, statuses


async def test_ops_listener_serves_health_and_route_template_metrics(gateway: Gateway) -> None:
    async with gateway.client() as client:
        tokens = await gateway.login(client)
        await client.get("/v1/auth/me", headers=bearer(tokens["access_token"]))
        await client.get("/v1/not-a-route/12345")
    async with httpx.AsyncClient(base_url=gateway.addresses.ops_url) as ops:
        live = await ops.get("/livez")
        ready = await ops.get("/readyz")
        metrics = (await ops.get("/metrics")).text
    assert live.status_code == 200
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert 'route="/v1/auth/me"' in metrics and 'route="/v1/auth/login"' in metrics
    assert "12345" not in metrics and TEACHER.user_id not in metrics
    assert 'route="(unmatched)"' in metrics
    assert "huleedu_gateway_ratelimit_decisions" in metrics


async def test_identity_backend_down_is_a_503_problem_in_time(start_gateway: Any) -> None:
    with trio.socket.socket() as probe:  # a port nobody listens on
        await probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    gateway: Gateway = await start_gateway(
        identity_target=f"127.0.0.1:{port}", identity_timeout_s=1.0
    )
    async with gateway.client() as client:
        start = trio.current_time()
        reply = await client.post(
            "/v1/auth/login", json={"email": TEACHER.email, "password": TEACHER.password}
        )
        elapsed = trio.current_time() - start
    body = assert_problem(reply, 503, "unavailable")
    assert "identity" not in body["detail"].lower() or body["detail"].endswith("later.")
    assert elapsed < 5


async def test_a_hanging_identity_backend_costs_at_most_its_timeout(
    start_gateway: Any, nursery: trio.Nursery
) -> None:
    held: list[trio.SocketStream] = []

    async def hold(stream: trio.SocketStream) -> None:  # accepts, never answers
        held.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    gateway: Gateway = await start_gateway(
        identity_target=f"127.0.0.1:{port}", identity_timeout_s=0.5
    )
    async with gateway.client() as client:
        start = trio.current_time()
        reply = await client.post(
            "/v1/auth/login", json={"email": TEACHER.email, "password": TEACHER.password}
        )
        elapsed = trio.current_time() - start
    assert_problem(reply, 504, "deadline_exceeded")
    assert held and 0.5 <= elapsed < 3, elapsed


async def test_shutdown_turns_readiness_false_before_the_listeners_close(
    start_gateway: Any,
) -> None:
    gateway: Gateway = await start_gateway(drain_delay_s=0.5)
    async with httpx.AsyncClient(base_url=gateway.addresses.ops_url) as ops, gateway.client() as c:
        assert (await ops.get("/readyz")).status_code == 200
        gateway.shutdown.set()
        await trio.sleep(0.1)
        draining = await ops.get("/readyz")
        still_serving = await c.get("/.well-known/jwks.json")
    assert draining.status_code == 503 and draining.json()["checks"]["not_draining"] is False
    assert still_serving.status_code == 200
