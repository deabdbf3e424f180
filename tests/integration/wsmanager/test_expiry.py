"""Token expiry on an open socket: without a refresh it closes with 4002 at the token's
expiry; an in-band refresh by the same user extends it, another user's token is refused."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from tests.integration.wsmanager.conftest import TEACHER2, Ws, next_frame

#: The wsmanager's wall clock runs this far ahead: a fresh 900 s token has ~3 s left there.
AHEAD_S = 897.0


def ahead() -> float:
    return time.time() + AHEAD_S


async def test_expiry_without_refresh_closes_4002(start_wsmanager: Any) -> None:
    ws: Ws = await start_wsmanager(wall=ahead, token_leeway_s=0)
    async with ws.connect() as (socket, welcome):
        started = trio.current_time()
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await next_frame(socket, within_s=10)
        assert info.value.reason.code == 4002
        assert trio.current_time() - started < 5
        assert welcome["expires_at"]


async def test_refresh_extends_and_another_users_token_is_refused(start_wsmanager: Any) -> None:
    ws: Ws = await start_wsmanager(token_leeway_s=0)
    async with ws.connect() as (socket, welcome):
        fresh = await ws.token()
        await socket.send_message(json.dumps({"type": "refresh", "token": fresh}))
        refreshed = await next_frame(socket)
        assert refreshed["type"] == "refreshed"
        assert refreshed["expires_at"] >= welcome["expires_at"]
        stranger = await ws.token(TEACHER2)
        await socket.send_message(json.dumps({"type": "refresh", "token": stranger}))
        refused = await next_frame(socket)
        assert refused["type"] == "error" and refused["code"] == "user_mismatch"
        await socket.send_message(json.dumps({"type": "refresh", "token": "x.y.z"}))
        assert (await next_frame(socket))["code"] == "invalid_token"
        # Still open and serving.
        await socket.send_message(json.dumps({"type": "ping", "nonce": "still"}))
        assert (await next_frame(socket))["nonce"] == "still"


async def test_metrics_and_readiness(ws: Ws) -> None:
    async with ws.connect(), httpx.AsyncClient(base_url=ws.addresses.ops_url) as ops:
        text = (await ops.get("/metrics")).text
        ready = (await ops.get("/readyz")).json()
    assert "huleedu_wsmanager_connections 1.0" in text
    assert ready["ready"] is True and ready["checks"]["caught_up"] is True
    assert TEACHER2.user_id not in text  # never user ids as labels
