"""S6 tenant isolation: 200 clients of 20 users, 10k events with random owners published on
the bus: every client receives exactly its user's events, all of them, in order; nobody
receives anyone else's."""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from typing import Any

import pytest
import trio

from tests.integration.wsmanager.conftest import Ws

pytestmark = pytest.mark.slow

USERS = 20
CLIENTS_PER_USER = 10
EVENTS = 10_000


async def test_s6_no_cross_user_and_no_missing_deliveries(start_wsmanager: Any) -> None:
    ws: Ws = await start_wsmanager(max_connections_per_user=CLIENTS_PER_USER)
    # Tokens for 20 distinct users: the hub routes by the verified ``sub`` only, so distinct
    # subjects are what matters; the demo identity has fewer users, so the tokens are signed
    # with the gateway's own key for synthetic users.
    from common.tokens import TokenSigner
    from gateway.keys import load_signing_keys

    keys = load_signing_keys(ws.gateway.settings.under_state(ws.gateway.settings.keys_dir))
    signer = TokenSigner(
        keys.private,
        keys.kid,
        issuer=ws.gateway.settings.issuer,
        audience=ws.gateway.settings.audience,
        ttl_s=900,
    )
    users = [f"user-{i:02d}" for i in range(USERS)]
    tokens = {
        u: signer.issue(sub=u, org="org-x", roles=("teacher",), sid=f"s-{u}", now=time.time())
        for u in users
    }
    rng = random.Random(7)
    owners = [rng.choice(users) for _ in range(EVENTS)]
    expected: dict[str, list[str]] = defaultdict(list)
    received: dict[tuple[str, int], list[str]] = defaultdict(list)
    foreign: list[tuple[str, str]] = []
    offsets: dict[str, tuple[int, int]] = {}

    async def client(user: str, index: int, task_status: trio.TaskStatus[None]) -> None:
        async with ws.connect(tokens[user]) as (socket, _):
            task_status.started()
            while True:
                frame = json.loads(await socket.get_message())
                if frame["type"] != "event":
                    continue
                if frame["data"]["owner"] != user:
                    foreign.append((user, frame["event_id"]))
                if frame["data"].get("end"):
                    return
                received[(user, index)].append(frame["event_id"])

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for user in users:
                for index in range(CLIENTS_PER_USER):
                    await nursery.start(client, user, index)
            for owner in owners:
                meta, event_id = await ws.publish(owner, payload={"owner": owner})
                offsets[event_id] = (meta.partition, meta.offset)
                expected[owner].append(event_id)
            for user in users:  # a last marker per user: its clients stop there
                await ws.publish(user, payload={"owner": user, "end": True})
    assert foreign == []
    for (user, index), got in received.items():
        missing = [offsets[e] for e in expected[user] if e not in set(got)]
        assert got == expected[user], f"{user}#{index}: missing (partition, offset) {missing[:5]}"
    assert len(received) == USERS * CLIENTS_PER_USER
    assert sum(len(v) for v in expected.values()) == EVENTS
