"""A real WebSocket manager for the tests: the real gateway (sandbox identity) issues the
tokens and tickets and serves the JWKS; the wsmanager verifies against it over TLS; events
are published on the bus the way the aggregator publishes them; clients are trio-websocket
over TLS."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from common.bus import EventBus, RecordMetadata
from common.contracts.huleedu.events import v1 as events_v1
from common.events import envelope_headers, make_envelope
from common.tls import client_context
from tests.integration.gateway.conftest import (  # noqa: F401  (fixtures used by name)
    TEACHER,
    TEACHER2,
    Gateway,
    GatewayFactory,
    identity_port,
    start_gateway,
)
from wsmanager.serve import WsManagerAddresses, serve_wsmanager
from wsmanager.settings import WsManagerSettings

ORIGIN = "https://app.huleedu.test"
Category = events_v1.NotificationCategory


@dataclass
class Ws:
    addresses: WsManagerAddresses
    settings: WsManagerSettings
    gateway: Gateway
    bus: EventBus
    shutdown: trio.Event
    stopped: trio.Event

    def tls(self) -> Any:
        assert self.addresses.ca_file is not None
        return client_context(self.addresses.ca_file, alpn=["http/1.1"])

    async def token(self, user: Any = TEACHER) -> str:
        async with self.gateway.client() as client:
            token: str = (await self.gateway.login(client, user))["access_token"]
            return token

    async def ticket(self, token: str) -> str:
        async with self.gateway.client() as client:
            reply = await client.post(
                "/v1/auth/ws-ticket", headers={"Authorization": f"Bearer {token}"}
            )
            assert reply.status_code == 200, reply.text
            ticket: str = reply.json()["ticket"]
            return ticket

    async def publish(
        self,
        user_id: str,
        *,
        batch_id: str = "b1",
        kind: str = "batch_status_changed",
        category: int = Category.BATCH_PROGRESS,
        payload: dict[str, Any] | None = None,
    ) -> tuple[RecordMetadata, str]:
        envelope = make_envelope(
            events_v1.TeacherNotificationRequested(
                teacher_id=user_id,
                notification_type=kind,
                category=category,
                priority=events_v1.NotificationPriority.STANDARD,
                batch_id=batch_id,
                payload_json=json.dumps(payload or {"batch_id": batch_id, "status": "processing"}),
            ),
            source_service="test-aggregator",
            user_id=user_id,
        )
        meta = await self.bus.publish(
            envelope.event_type,
            bytes(envelope),
            key=user_id.encode(),
            headers=envelope_headers(envelope),
        )
        return meta, envelope.event_id

    def url(self, **query: str) -> str:
        base = f"{self.addresses.url}/v1/ws"
        if query:
            base += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return base

    @asynccontextmanager
    async def raw(
        self, *, origin: str | None = ORIGIN, queue: int = 256, **query: str
    ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        """``queue``: frames the client buffers unread (1: a client that stops reading stalls
        its TCP window at once)."""
        headers = [(b"origin", origin.encode())] if origin is not None else []
        # A roomy message queue and a short close wait: trio-websocket's reader blocks once
        # its queue is full, and then never reads the server's close reply, so a test that
        # leaves frames unread would wait out the 60 s default on exit.
        async with trio_websocket.open_websocket_url(
            self.url(**query),
            self.tls(),
            extra_headers=headers,
            connect_timeout=10,
            message_queue_size=queue,
            disconnect_timeout=2,
        ) as socket:
            try:
                yield socket
            finally:
                # trio-websocket 0.12 leaves the client's TCP stream open when the server
                # closes first (its EOF path never closes it): close it ourselves.
                await trio.aclose_forcefully(socket._stream)

    @asynccontextmanager
    async def connect(
        self, token: str | None = None, *, user: Any = TEACHER, queue: int = 256, **query: str
    ) -> AsyncIterator[tuple[trio_websocket.WebSocketConnection, dict[str, Any]]]:
        """An authenticated socket and its welcome frame."""
        async with self.raw(queue=queue, **query) as socket:
            if "ticket" not in query:
                await socket.send_message(
                    json.dumps({"type": "auth", "token": token or await self.token(user)})
                )
            welcome = json.loads(await socket.get_message())
            assert welcome["type"] == "welcome", welcome
            yield socket, welcome


async def next_frame(socket: trio_websocket.WebSocketConnection, within_s: float = 5) -> Any:
    """The next frame that is not a server ping."""
    with trio.fail_after(within_s):
        while True:
            frame = json.loads(await socket.get_message())
            if frame.get("type") != "ping":
                return frame


WsFactory = Callable[..., Any]


@pytest.fixture
async def start_wsmanager(
    nursery: trio.Nursery,
    start_gateway: GatewayFactory,  # noqa: F811  (the imported fixture, by name)
    tmp_path: Path,
) -> AsyncIterator[WsFactory]:
    """``await start_wsmanager(gateway=None, bus=None, **settings)`` -> a running :class:`Ws`."""
    running: list[Ws] = []

    async def start(
        gateway: Gateway | None = None,
        bus: EventBus | None = None,
        wall: Callable[[], float] | None = None,
        own_bus: bool = False,
        **over: Any,
    ) -> Ws:
        gw = gateway or await start_gateway()
        assert gw.addresses.ca_file is not None
        values: dict[str, Any] = {
            "port": 0,
            "ops_port": 0,
            "state_dir": tmp_path,
            "jwks_url": f"{gw.url}/.well-known/jwks.json",
            "jwks_ca_file": Path(gw.addresses.ca_file),
            "allowed_origins": (ORIGIN,),
            "log_json": False,
            "kafka": over.pop("kafka", None) or WsManagerSettings().kafka,
            **over,
        }
        settings = WsManagerSettings(**values)
        shutdown, stopped = trio.Event(), trio.Event()
        the_bus = None if own_bus else bus or gw.bus  # own_bus: the one its settings name

        async def run(task_status: trio.TaskStatus[WsManagerAddresses]) -> None:
            try:
                await serve_wsmanager(
                    settings, shutdown=shutdown, bus=the_bus, wall=wall, task_status=task_status
                )
            finally:
                stopped.set()

        addresses = await nursery.start(run)
        ws = Ws(addresses, settings, gw, the_bus or gw.bus, shutdown, stopped)
        await wait_ready(ws)
        running.append(ws)
        return ws

    yield start
    for ws in running:
        ws.shutdown.set()
    with trio.fail_after(15):
        for ws in running:
            await ws.stopped.wait()


async def wait_ready(ws: Ws) -> None:
    async with httpx.AsyncClient(base_url=ws.addresses.ops_url) as ops:
        with trio.fail_after(15):
            while (await ops.get("/readyz")).status_code != 200:
                await trio.sleep(0.05)


@pytest.fixture
async def ws(start_wsmanager: WsFactory) -> Ws:
    started: Ws = await start_wsmanager()
    return started


async def handshake_status(ws: Ws, *, origin: str | None, path: str = "/v1/ws") -> int:
    """The HTTP status of a raw WebSocket upgrade request (101 = upgraded)."""
    host, port = ws.addresses.url.removeprefix("wss://").rsplit(":", 1)
    stream = await trio.open_ssl_over_tcp_stream(
        host, int(port), ssl_context=ws.tls(), https_compatible=True
    )
    async with stream:
        head = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n"
        )
        if origin is not None:
            head += f"Origin: {origin}\r\n"
        await stream.send_all((head + "\r\n").encode())
        received = b""
        with trio.fail_after(5):
            while b"\r\n" not in received:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                received += chunk
    return int(received.split(b" ", 2)[1])


def unique_batch() -> str:
    return f"b-{uuid.uuid4().hex[:12]}"
