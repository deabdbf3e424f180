"""Serving the sandbox batch and file backends (and the pipeline simulator) on one gRPC port.

``serve_sandbox_backends(bus, state_dir, ...)`` serves ``BatchService`` and ``FileService``
on ``host:port`` (0: a free port, reported through ``task_status``), publishing their events
and the simulator's on ``bus``. Pipelines run in the server's own nursery, so shutting the
backends down also stops their runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from common.bus import EventBus
from common.events import EventEnvelope, envelope_headers
from common.logs import get_logger
from common.rpc import serve_grpc
from deploy.sandbox.filestore import FileLimits, SandboxFiles
from deploy.sandbox.orchestrator import SandboxBatches
from deploy.sandbox.simulator import PipelineSimulator, SimulatorSettings

__all__ = ["SandboxBackends", "bus_publisher", "serve_sandbox_backends"]

log = get_logger("sandbox")


@dataclass(frozen=True, slots=True)
class SandboxBackends:
    """What a running sandbox exposes (tests look at the servicers' state)."""

    port: int
    batches: SandboxBatches
    files: SandboxFiles
    simulator: PipelineSimulator


def bus_publisher(bus: EventBus) -> Callable[[EventEnvelope, str], Awaitable[None]]:
    """Publish an envelope on its topic, keyed by ``key`` (a batch or user id)."""

    async def publish(envelope: EventEnvelope, key: str) -> None:
        await bus.publish(
            envelope.event_type,
            bytes(envelope),
            key=key.encode(),
            headers=envelope_headers(envelope),
        )

    return publish


async def serve_sandbox_backends(
    bus: EventBus,
    state_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    simulator: SimulatorSettings | None = None,
    limits: FileLimits | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[SandboxBackends] = trio.TASK_STATUS_IGNORED,
) -> None:
    publish = bus_publisher(bus)
    sim = PipelineSimulator(publish, simulator)
    async with trio.open_nursery() as runs:
        batches = SandboxBatches(publish, sim.run, runs)
        files = SandboxFiles(state_dir / "sandbox-files", batches, publish, limits=limits)

        async def serve(task_status: trio.TaskStatus[int]) -> None:
            await serve_grpc(
                [batches, files],
                host=host,
                port=port,
                shutdown_trigger=shutdown_trigger,
                task_status=task_status,
            )

        bound: int = await runs.start(serve)
        log.info("sandbox backends serving", host=host, port=bound)
        task_status.started(SandboxBackends(bound, batches, files, sim))
        if shutdown_trigger is not None:
            await shutdown_trigger()
            runs.cancel_scope.cancel()
