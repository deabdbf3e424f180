"""The whole gateway read/write path in a background thread (its own Trio run), for tests
that are synchronous by nature (schemathesis drives ``requests``).

Sandbox identity, batch and file backends, the real aggregator and the gateway, on one memory
bus, all on 127.0.0.1 with TLS at the edge; stopped in order when the context ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from aggregator.serve import serve_aggregator
from aggregator.settings import AggregatorSettings
from common.bus import open_memory_bus
from common.rpc import open_rpc_loop
from deploy.sandbox.identity import ScryptParams, serve_sandbox_identity
from deploy.sandbox.pipeline import PipelineSettings
from deploy.sandbox.serve import SandboxSettings, serve_sandbox_backends
from gateway.backends import BackendSettings
from gateway.serve import GatewayAddresses, serve_gateway
from gateway.settings import GatewaySettings

__all__ = ["ThreadStack", "thread_stack"]


@dataclass(frozen=True)
class ThreadStack:
    url: str
    ca_file: str


async def _serve(
    state: Path, ready: queue.Queue[Any], stop: trio.Event, settings: dict[str, Any]
) -> None:
    async with open_memory_bus() as bus, trio.open_nursery() as nursery:
        done = trio.Event()

        async def identity(task_status: trio.TaskStatus[int]) -> None:
            async with open_rpc_loop():
                await serve_sandbox_identity(
                    scrypt=ScryptParams(n=2**10),
                    shutdown_trigger=done.wait,
                    task_status=task_status,
                )

        identity_port: int = await nursery.start(identity)
        sandbox = await nursery.start(
            partial(
                serve_sandbox_backends,
                SandboxSettings(
                    grpc_port=0,
                    state_dir=state / "sandbox",
                    pipeline=PipelineSettings(essay_delay_s=0.001, phase_delay_s=0.001),
                ),
                bus=bus,
                shutdown_trigger=done.wait,
            )
        )
        aggregator_stop = trio.Event()
        aggregator = await nursery.start(
            partial(
                serve_aggregator,
                AggregatorSettings(grpc_port=0, ops_port=0, db_path=state / "aggregator.db"),
                shutdown=aggregator_stop,
                bus=bus,
            )
        )
        target = f"127.0.0.1:{sandbox.port}"
        gateway_stop = trio.Event()
        gateway_settings = GatewaySettings(
            port=0,
            ops_port=0,
            state_dir=state,
            identity_target=f"127.0.0.1:{identity_port}",
            batch_backend=BackendSettings(target=target),
            file_backend=BackendSettings(target=target),
            result_backend=BackendSettings(target=f"127.0.0.1:{aggregator.grpc_port}"),
            log_json=False,
            **settings,
        )
        gateway_done = trio.Event()

        async def gateway(task_status: trio.TaskStatus[GatewayAddresses]) -> None:
            try:
                await serve_gateway(
                    gateway_settings, shutdown=gateway_stop, bus=bus, task_status=task_status
                )
            finally:
                gateway_done.set()

        addresses: GatewayAddresses = await nursery.start(gateway)
        assert addresses.ca_file is not None
        ready.put(ThreadStack(addresses.url, addresses.ca_file))
        await stop.wait()
        gateway_stop.set()
        await gateway_done.wait()
        aggregator_stop.set()
        done.set()


@contextmanager
def thread_stack(state: Path, **settings: Any) -> Iterator[ThreadStack]:
    """Run the stack until the block ends; ``settings`` override the gateway's."""
    ready: queue.Queue[Any] = queue.Queue()
    holder: dict[str, Any] = {}

    async def main() -> None:
        holder["token"] = trio.lowlevel.current_trio_token()
        holder["stop"] = stop = trio.Event()
        await _serve(state, ready, stop, settings)

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the waiting test
            ready.put(exc)

    thread = threading.Thread(target=run, name="gateway-stack", daemon=True)
    thread.start()
    started = ready.get(timeout=60)
    if isinstance(started, BaseException):
        raise started
    try:
        yield started
    finally:
        trio.from_thread.run_sync(holder["stop"].set, trio_token=holder["token"])
        thread.join(timeout=30)
