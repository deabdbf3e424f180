"""The whole tier as separate processes on the real Kafka broker (``deploy/cluster.py``): the
sandbox backends, the aggregator, two gateways and two wsmanagers, each a ``huleedu <service>``
process configured only by environment. Clients speak real HTTPS and WSS to them.

The cluster is started once per module (a sync fixture: processes, not Trio tasks) on free
ports; tests that stop processes restart them on the same ports before they end.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from common.tls import client_context
from deploy.cluster import Cluster, ClusterPorts
from deploy.sandbox.identity import DEMO_USERS, DemoUser

TEACHER, TEACHER2 = DEMO_USERS[0], DEMO_USERS[1]
#: The tier's own processes (the sandbox stands in for HuleEdu's backends).
TIER = ("aggregator", "gateway-1", "wsmanager-1", "gateway-2", "wsmanager-2")
ESSAYS = [
    ("coast.txt", "My journey to the coast began at dawn, with a bag too heavy to carry. " * 20),
    ("river.txt", "The river remembers every stone it has turned over the years. " * 20),
    ("winter.txt", "Winter came early that year, and it came quietly to our town. " * 20),
]


def start_cluster(
    state_dir: Path, kafka: str, *, essay_delay_s: float = 0.05, phase_delay_s: float = 0.1
) -> Cluster:
    cluster = Cluster(
        state_dir,
        kafka,
        ports=ClusterPorts.free(),
        essay_delay_s=essay_delay_s,
        phase_delay_s=phase_delay_s,
    )
    cluster.start_all()
    return cluster


@contextlib.contextmanager
def running_cluster(cluster: Cluster) -> Iterator[Cluster]:
    try:
        yield cluster
    finally:
        codes = cluster.stop_all()
        bad = {name: code for name, code in codes.items() if code not in (0, None)}
        assert not bad, f"processes did not exit cleanly: {bad}"


@pytest.fixture(scope="module")
def cluster(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    started = start_cluster(tmp_path_factory.mktemp("cluster"), kafka_bootstrap)
    with running_cluster(started):
        yield started


@dataclass
class Teacher:
    """One user's HTTPS client against one gateway."""

    cluster: Cluster
    user: DemoUser
    gateway: int = 0
    token: str = ""
    client: httpx.AsyncClient | None = None

    def http(self, gateway: int | None = None) -> httpx.AsyncClient:
        index = self.gateway if gateway is None else gateway
        return httpx.AsyncClient(
            base_url=self.cluster.gateway_url(index),
            verify=client_context(str(self.cluster.ca_file)),
            headers={"authorization": f"Bearer {self.token}"} if self.token else {},
            timeout=15,
        )

    async def login(self) -> None:
        async with self.http() as client:
            reply = await client.post(
                "/v1/auth/login", json={"email": self.user.email, "password": self.user.password}
            )
        assert reply.status_code == 200, reply.text
        self.token = reply.json()["access_token"]

    async def call(
        self, method: str, path: str, *, gateway: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        async with self.http(gateway) as client:
            return await client.request(method, path, **kwargs)

    async def run_batch(self, essays: list[tuple[str, str]] = ESSAYS) -> str:
        """Register a batch, upload ``essays`` and request spellcheck + CJ; the batch id."""
        reply = await self.call(
            "POST",
            "/v1/batches",
            json={
                "course_code": "ENG5",
                "essay_instructions": "Write about a journey that changed you.",
                "expected_essay_count": len(essays),
            },
        )
        assert reply.status_code == 201, reply.text
        batch_id: str = reply.json()["batch_id"]
        files = [("files", (name, text.encode(), "text/plain")) for name, text in essays]
        reply = await self.call("POST", f"/v1/batches/{batch_id}/files", files=files)
        assert reply.status_code in (200, 201, 202), reply.text
        reply = await self.call(
            "POST",
            f"/v1/batches/{batch_id}/pipelines",
            json={"phases": ["spellcheck", "cj_assessment"]},
        )
        assert reply.status_code in (200, 202), reply.text
        return batch_id


def ws_tls(cluster: Cluster) -> ssl.SSLContext:
    return client_context(str(cluster.ca_file), alpn=["http/1.1"])


@dataclass
class Stream:
    """One user's events as a client keeps them across reconnects (resume with ``since``)."""

    cluster: Cluster
    teacher: Teacher
    events: list[dict[str, Any]] = field(default_factory=list)
    welcomes: list[dict[str, Any]] = field(default_factory=list)
    closed: list[tuple[int | None, str | None]] = field(default_factory=list)

    @property
    def since(self) -> str | None:
        if not self.events:
            return None
        last = self.events[-1]
        return f"{last['epoch']}:{last['offset']}"

    @contextlib.asynccontextmanager
    async def open(self, instance: int = 0) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        url = self.cluster.ws_url(instance)
        if self.since is not None:
            url += f"?since={self.since}"
        # Roomy queue, short close wait: see tests/integration/wsmanager/conftest.py.
        async with trio_websocket.open_websocket_url(
            url,
            ws_tls(self.cluster),
            connect_timeout=10,
            message_queue_size=256,
            disconnect_timeout=2,
        ) as socket:
            try:
                await socket.send_message(json.dumps({"type": "auth", "token": self.teacher.token}))
                welcome = json.loads(await socket.get_message())
                assert welcome["type"] == "welcome", welcome
                self.welcomes.append(welcome)
                yield socket
            finally:
                # trio-websocket 0.12 leaves the TCP stream open when the server closes first.
                await trio.aclose_forcefully(socket._stream)

    async def follow(self, socket: trio_websocket.WebSocketConnection) -> None:
        """Keep events (answering pings) until the server closes the socket."""
        try:
            while True:
                frame = json.loads(await socket.get_message())
                if frame["type"] == "ping":
                    await socket.send_message(json.dumps({"type": "pong", "nonce": frame["nonce"]}))
                elif frame["type"] == "event":
                    self.events.append(frame)
        except trio_websocket.ConnectionClosed as closed:
            reason = closed.reason
            self.closed.append((reason.code, reason.reason) if reason else (None, None))

    def of(self, batch_id: str) -> list[dict[str, Any]]:
        """This batch's events, first copy of each ``event_id`` only."""
        seen: set[str] = set()
        kept = []
        for event in self.events:
            if event["batch_id"] == batch_id and event["event_id"] not in seen:
                seen.add(event["event_id"])
                kept.append(event)
        return kept


async def wait_for(predicate: Any, *, within_s: float, what: str) -> None:
    with trio.move_on_after(within_s):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"{what}: not within {within_s} s")


def finished(stream: Stream, batch_id: str) -> bool:
    return any(e["event_type"] == "batch_results_ready" for e in stream.of(batch_id))


async def replayed_since(
    cluster: Cluster, teacher: Teacher, first: dict[str, Any], instance: int = 1
) -> list[dict[str, Any]]:
    """``first`` and every later event of its batch, as a fresh client resuming from
    ``first`` gets them, each ``event_id`` once (a restarted aggregator may publish a
    notification again, with the same id: clients deduplicate): the reference a live or
    reconnecting client's stream is compared with."""
    reference = Stream(cluster, teacher)
    reference.events.append(first)
    async with reference.open(instance) as socket:
        assert reference.welcomes[-1]["resume"]["recovered"] is True, reference.welcomes[-1]
        with trio.move_on_after(3):
            await reference.follow(socket)
    return reference.of(first["batch_id"])
