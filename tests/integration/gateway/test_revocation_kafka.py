"""S4 on the real Kafka broker: after a logout on one gateway instance, a second instance (its
own Kafka clients and consumer group) refuses the session's access tokens within 1 s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from common.settings import KafkaSettings
from tests.integration.gateway.conftest import TEACHER, Gateway

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


async def _refused_after(client: httpx.AsyncClient, token: str, limit_s: float) -> float:
    """Seconds until ``token`` is refused by ``client``'s gateway (polling every 10 ms)."""
    start = trio.current_time()
    with trio.fail_after(limit_s):
        while True:
            reply = await client.get("/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
            if reply.status_code == 401:
                return trio.current_time() - start
            assert reply.status_code == 200, reply.text
            await trio.sleep(0.01)


async def test_s4_logout_reaches_a_second_instance_within_a_second(
    start_gateway: Any, kafka_bootstrap: str, tmp_path: Path, unique: Any
) -> None:
    # Two instances as a deployment runs them: the same signing keys and session database,
    # each with its own Kafka producer and consumer (group per instance). A unique client id
    # keeps the test's consumer groups apart from other runs on the same broker.
    shared = {
        "keys_dir": tmp_path / "keys",
        "db_path": tmp_path / "sessions.db",
        "kafka": KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id=unique("gw")),
        "service_name": unique("gateway"),
    }
    first: Gateway = await start_gateway(own_bus=True, **shared)
    second: Gateway = await start_gateway(own_bus=True, **shared)
    async with first.client() as a, second.client(http2=True) as b:
        # Warm-up: the second instance's consumer has joined and reads revocations.
        warm = await first.login(a, TEACHER)
        assert (await a.post("/v1/auth/logout", headers=_auth(warm))).status_code == 204
        await _refused_after(b, warm["access_token"], 60)

        timings = []
        for _ in range(3):
            tokens = await first.login(a, TEACHER)
            ok = await b.get("/v1/auth/me", headers=_auth(tokens))
            assert ok.status_code == 200  # the second instance accepts the first's tokens
            out = await a.post("/v1/auth/logout", headers=_auth(tokens))
            assert out.status_code == 204
            timings.append(await _refused_after(b, tokens["access_token"], 1.0))
    print("S4 refusal latency on the second instance (s):", [round(t, 3) for t in timings])
    assert max(timings) < 1.0, timings
    # Both instances really consumed from the broker, each in its own group.
    groups = await trio.to_thread.run_sync(_groups, kafka_bootstrap)
    ours = {g for g in groups if g.startswith(f"{shared['service_name']}-revocations-")}
    assert len(ours) == 2, groups


def _groups(bootstrap: str) -> list[str]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    listed = admin.list_consumer_groups(request_timeout=10).result()
    return [g.group_id for g in listed.valid]


def _auth(tokens: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}
