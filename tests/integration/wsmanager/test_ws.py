"""The WSS endpoint over real TLS sockets: handshake rules, both ways to authenticate, events
routed to their user only (every tab once), subscriptions, ping/pong, refresh, revocation,
expiry, caps, malformed frames, resume, shutdown."""

from __future__ import annotations

import json

import jwt
import pytest
import trio
import trio_websocket

from tests.integration.wsmanager.conftest import (
    ORIGIN,
    TEACHER,
    TEACHER2,
    Ws,
    handshake_status,
    next_frame,
    unique_batch,
)
from wsmanager.protocol import rfc3339


async def test_token_auth_welcome_and_an_event(ws: Ws) -> None:
    async with ws.connect() as (socket, welcome):
        assert welcome["user_id"] == TEACHER.user_id
        assert welcome["resume"] is None
        batch = unique_batch()
        meta, event_id = await ws.publish(TEACHER.user_id, batch_id=batch)
        frame = await next_frame(socket)
        assert frame["type"] == "event"
        assert frame["event_id"] == event_id
        assert frame["offset"] == meta.offset
        assert frame["batch_id"] == batch
        assert frame["category"] == "batch_progress"
        assert frame["data"] == {"batch_id": batch, "status": "processing"}


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.test",
        "https://app.huleedu.test.evil.test",
        "https://evilapp.huleedu.test",
        "null",
        "http://app.huleedu.test",
        "https://app.huleedu.test:8443",
        "https://APP.huleedu.test/",
    ],
)
async def test_s5_foreign_origins_are_refused_before_the_upgrade(ws: Ws, origin: str) -> None:
    assert await handshake_status(ws, origin=origin) == 403
    assert await handshake_status(ws, origin=ORIGIN) == 101


async def test_missing_origin_policy_is_configurable(start_wsmanager: object) -> None:
    strict: Ws = await start_wsmanager(allow_missing_origin=False)  # type: ignore[operator]
    assert await handshake_status(strict, origin=None) == 403
    lenient: Ws = await start_wsmanager(gateway=strict.gateway)  # type: ignore[operator]
    assert await handshake_status(lenient, origin=None) == 101
    assert await handshake_status(lenient, origin=ORIGIN, path="/v1/other") == 403


async def test_ticket_auth_is_single_use(ws: Ws) -> None:
    token = await ws.token()
    ticket = await ws.ticket(token)
    async with ws.connect(ticket=ticket) as (_, welcome):
        assert welcome["user_id"] == TEACHER.user_id
        # The socket lives as long as the access token the ticket came from, not 30 s.
        access_exp = jwt.decode(token, options={"verify_signature": False})["exp"]
        assert welcome["expires_at"] == rfc3339(access_exp)
    async with ws.raw(ticket=ticket) as socket:
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await socket.get_message()
    assert info.value.reason.code == 4001


async def test_no_auth_frame_closes_at_the_deadline(start_wsmanager: object) -> None:
    ws: Ws = await start_wsmanager(auth_timeout_s=0.5)  # type: ignore[operator]
    async with ws.raw() as socket:
        started = trio.current_time()
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await socket.get_message()
        assert 0.4 <= trio.current_time() - started <= 3
    assert info.value.reason.code == 4001


async def test_bad_token_and_wrong_first_frame_close_4001(ws: Ws) -> None:
    for first in (
        {"type": "auth", "token": "not.a.jwt"},
        {"type": "ping"},
        {"type": "auth", "token": await ws.ticket(await ws.token())},  # a ticket is no token
    ):
        async with ws.raw() as socket:
            await socket.send_message(json.dumps(first))
            with pytest.raises(trio_websocket.ConnectionClosed) as info:
                await socket.get_message()
        assert info.value.reason.code == 4001, first


async def test_multi_tab_each_event_once_per_tab_and_none_for_others(ws: Ws) -> None:
    async with (
        ws.connect() as (a, _),
        ws.connect() as (b, _),
        ws.connect() as (c, _),
        ws.connect(user=TEACHER2) as (other, _),
    ):
        ids = [(await ws.publish(TEACHER.user_id, batch_id=unique_batch()))[1] for _ in range(5)]
        for tab in (a, b, c):
            got = [(await next_frame(tab))["event_id"] for _ in range(5)]
            assert got == ids
        mark = (await ws.publish(TEACHER2.user_id))[1]
        assert (await next_frame(other))["event_id"] == mark  # nothing of TEACHER's before it


async def test_ping_pong_subscribe_and_malformed_frames(ws: Ws) -> None:
    async with ws.connect() as (socket, _):
        await socket.send_message(json.dumps({"type": "ping", "nonce": "n1"}))
        assert await next_frame(socket) == {"type": "pong", "nonce": "n1"}
        keep = unique_batch()
        await socket.send_message(json.dumps({"type": "subscribe", "batch_ids": [keep]}))
        assert (await next_frame(socket))["type"] == "subscribed"
        await ws.publish(TEACHER.user_id, batch_id=unique_batch())
        _, wanted = await ws.publish(TEACHER.user_id, batch_id=keep)
        assert (await next_frame(socket))["event_id"] == wanted
        await socket.send_message("{not json")
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await socket.get_message()
        assert info.value.reason.code == 1007


async def test_oversized_and_binary_frames(start_wsmanager: object) -> None:
    ws: Ws = await start_wsmanager(max_frame_bytes=2048)  # type: ignore[operator]
    async with ws.connect() as (socket, _):
        await socket.send_message(json.dumps({"type": "ping", "nonce": "x" * 4000}))
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await socket.get_message()
        assert info.value.reason.code == 1009
    async with ws.connect() as (socket, _):
        await socket.send_message(b"\x00\x01")
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await socket.get_message()
        assert info.value.reason.code == 1003


async def test_per_user_connection_cap(start_wsmanager: object) -> None:
    ws: Ws = await start_wsmanager(max_connections_per_user=2)  # type: ignore[operator]
    token = await ws.token()
    async with ws.connect(token) as _, ws.connect(token) as _, ws.raw() as third:
        await third.send_message(json.dumps({"type": "auth", "token": token}))
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await third.get_message()
        assert info.value.reason.code == 4008


async def test_logout_closes_the_sessions_sockets_with_4003(ws: Ws) -> None:
    token = await ws.token()
    async with ws.connect(token) as (socket, _):
        async with ws.gateway.client() as client:
            reply = await client.post(
                "/v1/auth/logout", headers={"Authorization": f"Bearer {token}"}
            )
            assert reply.status_code == 204
        started = trio.current_time()
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await next_frame(socket)
        assert info.value.reason.code == 4003
        assert trio.current_time() - started < 2


async def test_resume_gets_exactly_the_gap(ws: Ws) -> None:
    async with ws.connect() as (socket, _):
        first = await ws.publish(TEACHER.user_id)
        frame = await next_frame(socket)
        assert frame["event_id"] == first[1]
        since = f"{frame['epoch']}:{frame['offset']}"
    gap = [(await ws.publish(TEACHER.user_id))[1] for _ in range(4)]
    async with ws.connect(since=since) as (socket, welcome):
        assert welcome["resume"] == {"recovered": True, "replayed": 4}
        assert [(await next_frame(socket))["event_id"] for _ in range(4)] == gap
        live = (await ws.publish(TEACHER.user_id))[1]
        assert (await next_frame(socket))["event_id"] == live


async def test_shutdown_closes_sockets_with_1001(start_wsmanager: object) -> None:
    ws: Ws = await start_wsmanager()  # type: ignore[operator]
    async with ws.connect() as (socket, _):
        ws.shutdown.set()
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await next_frame(socket)
        assert info.value.reason.code == 1001
    with trio.fail_after(10):
        await ws.stopped.wait()
