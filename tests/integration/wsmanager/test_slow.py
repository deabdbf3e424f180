"""R6: a client that stops reading fills its own queue and is closed as a slow consumer
(4009); the other clients keep receiving everything."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_websocket

from tests.integration.wsmanager.conftest import TEACHER, TEACHER2, Ws, next_frame

pytestmark = pytest.mark.slow

EVENTS = 300
#: Big enough payloads that the stalled client's TCP windows fill quickly.
PAYLOAD = {"owner": "x", "blob": "y" * 60_000}
#: Publishing pace: the reading clients keep up; the stalled one cannot.
PACE_S = 0.005


async def test_r6_only_the_stalled_connection_is_closed(start_wsmanager: Any) -> None:
    ws: Ws = await start_wsmanager(send_queue_frames=64)
    stalling = ws.connect(user=TEACHER, queue=1)  # reads nothing: its TCP window fills
    async with stalling as (stalled, _), ws.connect(user=TEACHER) as (healthy, _):
        async with ws.connect(user=TEACHER2) as (other, _):
            got: list[str] = []
            other_got: list[str] = []

            async def read(socket: trio_websocket.WebSocketConnection, into: list[str]) -> None:
                while len(into) < EVENTS:
                    into.append((await next_frame(socket, within_s=30))["event_id"])

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read, healthy, got)
                    nursery.start_soon(read, other, other_got)
                    sent = []
                    for _ in range(EVENTS):
                        sent.append((await ws.publish(TEACHER.user_id, payload=PAYLOAD))[1])
                        await ws.publish(TEACHER2.user_id, payload=PAYLOAD)
                        await trio.sleep(PACE_S)
            assert got == sent
            assert len(other_got) == EVENTS
        # The stalled one: its frames stop at some point and it ends with 4009.
        with pytest.raises(trio_websocket.ConnectionClosed) as info, trio.fail_after(30):
            while True:
                await stalled.get_message()
        assert info.value.reason.code == 4009
