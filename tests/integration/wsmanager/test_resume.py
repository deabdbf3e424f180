"""R7: an instance goes away mid-stream; the client reconnects to another instance with
``since`` and gets exactly the events it missed, in order, then the live stream. On the memory
bus and on the real Kafka broker (each instance its own consumer group on the whole topic)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio_websocket

from common.bus import EventBus, open_kafka_bus
from common.settings import KafkaSettings
from tests.integration.wsmanager.conftest import TEACHER, Ws, next_frame


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def shared_bus(request: pytest.FixtureRequest, start_gateway: Any) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield None  # the gateway's memory bus
        return
    settings = KafkaSettings(
        bootstrap_servers=request.getfixturevalue("kafka_bootstrap"),
        client_id=request.getfixturevalue("unique")("ws"),
        session_timeout_ms=6_000,
        consume_timeout_s=0.05,
    )
    async with open_kafka_bus(settings) as bus:
        yield bus


async def test_r7_reconnect_to_another_instance_gets_exactly_the_gap(
    start_wsmanager: Any, shared_bus: EventBus | None
) -> None:
    first: Ws = await start_wsmanager(bus=shared_bus)
    second: Ws = await start_wsmanager(gateway=first.gateway, bus=shared_bus)
    token = await first.token()
    async with first.connect(token) as (socket, _):
        seen = [await first.publish(TEACHER.user_id) for _ in range(3)]
        frames = [await next_frame(socket, within_s=15) for _ in seen]
        assert [f["event_id"] for f in frames] == [e for _, e in seen]
        last = frames[-1]
        first.shutdown.set()  # the instance goes away under the client
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await next_frame(socket, within_s=15)
        assert info.value.reason.code == 1001
    gap = [(await second.publish(TEACHER.user_id))[1] for _ in range(5)]
    since = f"{last['epoch']}:{last['offset']}"
    with trio.fail_after(15):
        while True:  # the second instance has consumed the gap once its buffer shows it
            async with second.connect(token, since=since) as (socket, welcome):
                if welcome["resume"]["replayed"] < len(gap):
                    await trio.sleep(0.1)
                    continue
                assert welcome["resume"] == {"recovered": True, "replayed": len(gap)}
                assert [(await next_frame(socket))["event_id"] for _ in gap] == gap
                live = (await second.publish(TEACHER.user_id))[1]
                assert (await next_frame(socket, within_s=15))["event_id"] == live
                break


async def test_a_gap_older_than_the_buffer_is_not_recovered(start_wsmanager: Any) -> None:
    ws: Ws = await start_wsmanager(replay_events_per_user=2)
    token = await ws.token()
    async with ws.connect(token) as (socket, _):
        await ws.publish(TEACHER.user_id)
        frame = await next_frame(socket)
    for _ in range(5):
        await ws.publish(TEACHER.user_id)
    await trio.sleep(0.3)
    async with ws.connect(token, since=f"{frame['epoch']}:{frame['offset']}") as (_, welcome):
        assert welcome["resume"] == {"recovered": False, "replayed": 0}
