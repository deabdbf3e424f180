"""A real gateway for the tests: sandbox IdentityService over gRPC, the gateway on 127.0.0.1
with TLS (dev CA under the test's folder), the memory bus unless a test brings Kafka."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from common.bus import EventBus, open_memory_bus
from common.rpc import open_rpc_loop
from common.tls import client_context
from deploy.sandbox.identity import DEMO_USERS, ScryptParams, serve_sandbox_identity
from gateway.serve import GatewayAddresses, serve_gateway
from gateway.settings import GatewaySettings

TEACHER = DEMO_USERS[0]
TEACHER2 = DEMO_USERS[1]
DISABLED = next(u for u in DEMO_USERS if u.disabled)
CHEAP = ScryptParams(n=2**10)


@dataclass
class Gateway:
    addresses: GatewayAddresses
    settings: GatewaySettings
    shutdown: trio.Event
    bus: EventBus

    @property
    def url(self) -> str:
        return self.addresses.url

    def tls(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        assert self.addresses.ca_file is not None
        return client_context(self.addresses.ca_file, alpn=alpn)

    def client(self, *, http2: bool = False, **kwargs: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, verify=self.tls(), http2=http2, http1=not http2, **kwargs
        )

    async def login(self, client: httpx.AsyncClient, user: Any = TEACHER) -> dict[str, Any]:
        reply = await client.post(
            "/v1/auth/login", json={"email": user.email, "password": user.password}
        )
        assert reply.status_code == 200, reply.text
        body: dict[str, Any] = reply.json()
        return body


GatewayFactory = Callable[..., Any]


@pytest.fixture
async def identity_port(nursery: trio.Nursery) -> AsyncIterator[int]:
    """The sandbox IdentityService (its own gRPC loop, like a separate process would have)."""
    stop = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        async with open_rpc_loop():
            await serve_sandbox_identity(
                scrypt=CHEAP, shutdown_trigger=stop.wait, task_status=task_status
            )

    port: int = await nursery.start(run)
    yield port
    stop.set()


@pytest.fixture
async def start_gateway(
    nursery: trio.Nursery, identity_port: int, tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    """``await start_gateway(bus=..., wall=..., **settings)`` -> a running :class:`Gateway`."""
    stops: list[trio.Event] = []
    finished: list[trio.Event] = []
    async with open_memory_bus() as memory:
        count = 0

        async def start(
            *,
            bus: EventBus | None = None,
            own_bus: bool = False,
            wall: Callable[[], float] | None = None,
            tracer_provider: Any = None,
            **over: Any,
        ) -> Gateway:
            """``own_bus``: the gateway opens the bus its settings name (e.g. ``kafka=``)."""
            nonlocal count
            count += 1
            values: dict[str, Any] = {
                "port": 0,
                "ops_port": 0,
                "state_dir": tmp_path,
                "db_path": Path(f"sessions-{count}.db"),
                "identity_target": f"127.0.0.1:{identity_port}",
                "log_json": False,
                "shutdown_grace_s": 5.0,
                **over,
            }
            settings = GatewaySettings(**values)
            shutdown = trio.Event()
            stops.append(shutdown)
            the_bus = None if own_bus else bus or memory
            done = trio.Event()
            finished.append(done)

            async def run(task_status: trio.TaskStatus[GatewayAddresses]) -> None:
                try:
                    await serve_gateway(
                        settings,
                        shutdown=shutdown,
                        bus=the_bus,
                        wall=wall,
                        tracer_provider=tracer_provider,
                        task_status=task_status,
                    )
                finally:
                    done.set()

            addresses = await nursery.start(run)
            return Gateway(addresses, settings, shutdown, the_bus or memory)

        yield start
        for stop in stops:
            stop.set()
        with trio.fail_after(15):
            for done in finished:
                await done.wait()


@pytest.fixture
async def gateway(start_gateway: GatewayFactory) -> Gateway:
    running: Gateway = await start_gateway()
    return running
