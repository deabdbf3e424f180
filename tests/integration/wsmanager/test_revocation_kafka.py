"""S4 for sockets on the real Kafka broker: a logout at the gateway (its own Kafka clients)
closes the session's open socket on the WebSocket manager (its own consumer group) with 4003
within 2 s; the same user's other session stays open."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio_websocket

from common.settings import KafkaSettings
from tests.integration.wsmanager.conftest import Ws, next_frame

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def test_s4_logout_closes_the_socket_on_the_wsmanager_within_2_s(
    start_gateway: Any, start_wsmanager: Any, kafka_bootstrap: str, unique: Any
) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id=unique("s4"))
    gateway = await start_gateway(own_bus=True, kafka=kafka, service_name=unique("gateway"))
    ws: Ws = await start_wsmanager(
        gateway=gateway, own_bus=True, kafka=kafka, service_name=unique("wsmanager")
    )
    ended, kept = await ws.token(), await ws.token()
    async with ws.connect(ended) as (doomed, _), ws.connect(kept) as (survivor, _):
        # Warm-up: the wsmanager's revocation consumer has joined its group.
        warm = await ws.token()
        async with ws.connect(warm) as (socket, _):
            async with gateway.client() as client:
                await client.post("/v1/auth/logout", headers={"Authorization": f"Bearer {warm}"})
            with pytest.raises(trio_websocket.ConnectionClosed), trio.fail_after(60):
                while True:
                    await next_frame(socket, within_s=60)
        async with gateway.client() as client:
            reply = await client.post(
                "/v1/auth/logout", headers={"Authorization": f"Bearer {ended}"}
            )
            assert reply.status_code == 204
        started = trio.current_time()
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            while True:
                await next_frame(doomed, within_s=5)
        took = trio.current_time() - started
        assert info.value.reason.code == 4003
        print(f"S4 socket closed {took * 1000:.0f} ms after the logout answered")
        assert took < 2.0
        await survivor.send_message('{"type":"ping","nonce":"alive"}')
        assert (await next_frame(survivor))["nonce"] == "alive"
