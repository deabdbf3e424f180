"""A real gateway for the tests: sandbox IdentityService over gRPC, the gateway on 127.0.0.1
with TLS (dev CA under the test's folder), the memory bus unless a test brings Kafka."""

from __future__ import annotations

import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from aggregator.serve import serve_aggregator
from aggregator.settings import AggregatorSettings
from common.bus import EventBus, open_kafka_bus, open_memory_bus
from common.rpc import open_rpc_loop
from common.settings import KafkaSettings
from common.tls import client_context
from deploy.sandbox.identity import DEMO_USERS, ScryptParams, serve_sandbox_identity
from deploy.sandbox.pipeline import PipelineSettings
from deploy.sandbox.serve import SandboxBackends, SandboxSettings, serve_sandbox_backends
from gateway.backends import BackendSettings
from gateway.serve import GatewayAddresses, serve_gateway
from gateway.settings import GatewaySettings, LimitSettings

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
    #: Set once the gateway has stopped.
    stopped: trio.Event = field(default_factory=trio.Event)

    async def stop(self) -> None:
        self.shutdown.set()
        with trio.fail_after(15):
            await self.stopped.wait()

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
            return Gateway(addresses, settings, shutdown, the_bus or memory, done)

        start.bus = memory  # type: ignore[attr-defined]  # the bus gateways share by default
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


#: Limits high enough that a test's own traffic is never throttled.
UNTHROTTLED: dict[str, Any] = {
    "limit_user": LimitSettings(limit=100_000, period_s=60, burst=10_000),
    "limit_address": LimitSettings(limit=100_000, period_s=60, burst=10_000),
}


@dataclass
class Stack:
    """Gateway + sandbox batch/file backends + the real aggregator, on one memory bus."""

    gateway: Gateway
    sandbox: SandboxBackends
    aggregator_port: int
    bus: EventBus
    start_gateway: GatewayFactory

    def backend_settings(self) -> dict[str, BackendSettings]:
        target = f"127.0.0.1:{self.sandbox.port}"
        return {
            "batch_backend": BackendSettings(target=target),
            "file_backend": BackendSettings(target=target),
            "result_backend": BackendSettings(target=f"127.0.0.1:{self.aggregator_port}"),
        }

    gateways: list[Gateway] = field(default_factory=list)

    async def another_gateway(self, **settings: Any) -> Gateway:
        """A second gateway on the same backends and bus (e.g. with other limits)."""
        values = {**self.backend_settings(), **UNTHROTTLED, **settings}
        started: Gateway = await self.start_gateway(bus=self.bus, **values)
        self.gateways.append(started)
        return started


@pytest.fixture
async def stack(
    nursery: trio.Nursery,
    start_gateway: GatewayFactory,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Stack]:
    """The whole read/write path over real sockets (gRPC between services, TLS at the edge).

    Events flow on the memory bus, or on the real Kafka broker when the test asks for it
    (``@pytest.mark.parametrize("stack", ["kafka"], indirect=True)``).
    """
    stop = trio.Event()
    done = trio.Event()
    kafka: KafkaSettings | None = None
    if getattr(request, "param", "memory") == "kafka":
        kafka = KafkaSettings(
            bootstrap_servers=request.getfixturevalue("kafka_bootstrap"),
            client_id=f"stack-{uuid.uuid4().hex[:8]}",
            session_timeout_ms=6_000,
            consume_timeout_s=0.1,
        )

    @contextlib.asynccontextmanager
    async def the_bus() -> AsyncIterator[EventBus]:
        if kafka is None:
            yield start_gateway.bus  # type: ignore[attr-defined]
        else:
            async with open_kafka_bus(kafka) as real:
                yield real

    async def run(task_status: trio.TaskStatus[tuple[EventBus, SandboxBackends, int]]) -> None:
        try:
            async with the_bus() as bus, trio.open_nursery() as inner:
                sandbox: SandboxBackends = await inner.start(
                    partial(
                        serve_sandbox_backends,
                        SandboxSettings(
                            grpc_port=0,
                            state_dir=tmp_path / "sandbox",
                            pipeline=PipelineSettings(essay_delay_s=0.01, phase_delay_s=0.02),
                        ),
                        bus=bus,
                        shutdown_trigger=stop.wait,
                    )
                )
                shutdown = trio.Event()
                settings = AggregatorSettings(
                    grpc_port=0, ops_port=0, db_path=tmp_path / "aggregator.db"
                )
                addresses = await inner.start(
                    partial(serve_aggregator, settings, shutdown=shutdown, bus=bus)
                )
                task_status.started((bus, sandbox, addresses.grpc_port))
                await stop.wait()
                shutdown.set()
        finally:
            done.set()

    bus, sandbox, aggregator_port = await nursery.start(run)
    partial_stack = Stack(None, sandbox, aggregator_port, bus, start_gateway)  # type: ignore[arg-type]
    partial_stack.gateway = await partial_stack.another_gateway()
    yield partial_stack
    for running in partial_stack.gateways:  # clients of the backends go first
        await running.stop()
    stop.set()
    with trio.fail_after(15):
        await done.wait()
