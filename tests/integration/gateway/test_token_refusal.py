"""S1 at the HTTP edge: the malformed-token corpus (14 classes x >= 10 variants) on every
protected route gives one identical 401, never a 5xx, and makes no outbound connection."""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization

from common.contracts.huleedu.events import v1 as events_v1
from common.events import Topic, envelope_headers, make_envelope
from gateway.serve import TRANSPORT_HEADER_LIMIT
from gateway.settings import LimitSettings
from tests.integration.gateway.conftest import Gateway
from tests.unit.test_tokens import CORPUS, KEY, NOW, POLICY

pytestmark = pytest.mark.slow

#: Every route that needs an access token, with its method.
#: HTTP strips trailing whitespace from a header value (RFC 9110 5.5), so a token with a
#: trailing space arrives as the valid token itself; every other variant is sent as is.
SENDABLE = [(cls, token) for cls, token in CORPUS if token and token == token.rstrip()]
TRANSPORT_LIMIT = TRANSPORT_HEADER_LIMIT - 1024
PROTECTED = [("GET", "/v1/auth/me"), ("POST", "/v1/auth/logout"), ("POST", "/v1/auth/ws-ticket")]


async def _gateway_knowing_the_corpus_key(start_gateway: Any, tmp_path: Path) -> Gateway:
    """A gateway whose signing key, issuer and audience are the corpus's, whose wall clock
    is the corpus's ``NOW``, and which has learnt (over the bus) that the corpus's
    ``revoked-session`` is revoked."""
    keys = tmp_path / "corpus-keys"
    keys.mkdir()
    pem = KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (keys / "k1.pem").write_bytes(pem)
    start = trio.current_time()
    gateway: Gateway = await start_gateway(
        keys_dir=keys,
        issuer=POLICY.issuer,
        audience=POLICY.audience,
        limit_address=LimitSettings(limit=100_000, period_s=1),
        wall=lambda: NOW + 10 + (trio.current_time() - start),
    )
    event = events_v1.SessionRevoked(
        user_id="u1",
        session_id="revoked-session",
        reason=events_v1.RevocationReason.ADMIN,
        access_expires_at=dt.datetime.fromtimestamp(NOW + 3600, dt.UTC),
    )
    envelope = make_envelope(event, source_service="test")
    await gateway.bus.publish(
        Topic.SESSION_REVOKED,
        bytes(envelope),
        key=b"revoked-session",
        headers=envelope_headers(envelope),
    )
    return gateway


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
async def test_s1_corpus_on_every_protected_route(
    start_gateway: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http2: bool
) -> None:
    gateway = await _gateway_knowing_the_corpus_key(start_gateway, tmp_path)
    # A request head over the transport's 64 KiB ceiling is refused by the HTTP server
    # itself, before any app code (asserted in the next test); everything below it is ours.
    sendable = [(c, t) for c, t in SENDABLE if len(t) < TRANSPORT_LIMIT]
    async with gateway.client(http2=http2) as client:
        # The control: a correctly signed, unrevoked corpus-style token is accepted, so the
        # refusals below are about the tokens, not about a gateway that refuses everything.
        from tests.unit.test_tokens import claims, sign

        good = sign(claims(sid="live-session"))
        assert (
            await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {good}"})
        ).status_code == 200
        # The revocation travelled over the bus before we start.
        with trio.fail_after(5):
            while (
                await client.get(
                    "/v1/auth/me", headers={"Authorization": f"Bearer {CORPUS[-1][1]}"}
                )
            ).status_code != 401:
                await trio.sleep(0.01)

        outbound: list[object] = []
        host, port = gateway.url.removeprefix("https://").rsplit(":", 1)
        ours = {(host, int(port))}
        real = {
            "connect": socket.socket.connect,
            "connect_ex": socket.socket.connect_ex,
            "getaddrinfo": socket.getaddrinfo,
        }

        def spy_connect(name: str) -> Any:
            def connect(self: socket.socket, address: Any) -> Any:
                if tuple(address[:2]) in ours:  # the test client (re)connecting to the gateway
                    return real[name](self, address)
                outbound.append(address)
                raise OSError("outbound connection during token verification")

            return connect

        def spy_getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
            if name == host:
                return real["getaddrinfo"](name, *args, **kwargs)
            outbound.append(name)
            raise OSError("name lookup during token verification")

        monkeypatch.setattr(socket.socket, "connect", spy_connect("connect"))
        monkeypatch.setattr(socket.socket, "connect_ex", spy_connect("connect_ex"))
        monkeypatch.setattr(socket, "getaddrinfo", spy_getaddrinfo)

        bodies: dict[str, set[str]] = {path: set() for _, path in PROTECTED}
        statuses: dict[int, int] = {}
        for cls, token in sendable:
            for method, path in PROTECTED:
                reply = await client.request(
                    method, path, headers={"Authorization": f"Bearer {token}"}
                )
                statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1
                assert reply.status_code == 401, (cls, path, reply.status_code, reply.text)
                assert reply.headers["www-authenticate"] == 'Bearer error="invalid_token"'
                body = reply.json()
                body.pop("correlation_id")
                bodies[path].add(repr(sorted(body.items())))
        # No Authorization header at all, and a non-Bearer scheme: the same 401.
        for method, path in PROTECTED:
            for headers in ({}, {"Authorization": f"Basic {good}"}, {"Authorization": "Bearer"}):
                reply = await client.request(method, path, headers=headers)
                assert reply.status_code == 401
                body = reply.json()
                body.pop("correlation_id")
                bodies[path].add(repr(sorted(body.items())))
    assert statuses == {401: len(sendable) * len(PROTECTED)}
    assert all(len(seen) == 1 for seen in bodies.values()), bodies
    assert not outbound, outbound


async def test_a_head_over_the_transport_ceiling_is_refused_by_the_server(
    start_gateway: Any, tmp_path: Path
) -> None:
    """HTTP/1.1: a bare 431; HTTP/2: GOAWAY ENHANCE_YOUR_CALM (the advertised
    SETTINGS_MAX_HEADER_LIST_SIZE). Never a 5xx, never token code; the gateway carries on."""
    gateway = await _gateway_knowing_the_corpus_key(start_gateway, tmp_path)
    huge = max((t for _, t in SENDABLE), key=len)
    assert len(huge) >= TRANSPORT_LIMIT
    async with gateway.client() as client:
        reply = await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {huge}"})
        assert reply.status_code == 431
    async with gateway.client(http2=True) as client:
        with pytest.raises(httpx.RemoteProtocolError, match="error_code:11"):
            await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {huge}"})
    async with gateway.client(http2=True) as client:
        reply = await client.get("/v1/auth/me", headers={"Authorization": "Bearer x.y.z"})
        assert reply.status_code == 401
