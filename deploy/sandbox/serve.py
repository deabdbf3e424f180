"""``serve_sandbox_backends``: the sandbox BatchService and FileService on one gRPC port.

Both servicers (:mod:`deploy.sandbox.batches`, :mod:`deploy.sandbox.files`) share one
in-process state and one :class:`~common.bus.EventBus`, and are served together by
:func:`common.rpc.serve_grpc` on ``grpc_host:grpc_port``: point the gateway's batch *and*
file backend targets at the same address. Pipeline runs (:mod:`deploy.sandbox.pipeline`)
are played in the server's own nursery::

    async with open_rpc_loop(), open_memory_bus() as bus, trio.open_nursery() as nursery:
        running = await nursery.start(
            partial(serve_sandbox_backends, SandboxSettings(grpc_port=0), bus=bus)
        )
        target = f"127.0.0.1:{running.port}"

Shutdown (``shutdown_trigger`` returns, or the task is cancelled): the gRPC server drains
in-flight calls (uploads are all-or-nothing, so a cut one leaves nothing), then unfinished
pipeline runs are cancelled: their batches stay in processing, as when a real backend dies.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.bus import EventBus
from common.logs import get_logger
from common.rpc import serve_grpc
from common.settings import KafkaSettings, ServiceSettings
from deploy.sandbox.batches import SandboxBatches
from deploy.sandbox.files import FileLimits, SandboxFiles
from deploy.sandbox.pipeline import EventPublisher, PipelineSettings, PipelineSimulator

__all__ = ["SandboxBackends", "SandboxSettings", "serve_sandbox_backends"]

log = get_logger("deploy.sandbox.serve")


class SandboxSettings(ServiceSettings):
    """Settings of the sandbox batch and file backends (environment prefix
    ``HULEEDU_SANDBOX_``, nested with ``__``, e.g. ``HULEEDU_SANDBOX_PIPELINE__FAILURE_RATE``)."""

    model_config = SettingsConfigDict(
        env_prefix="HULEEDU_SANDBOX_", extra="forbid", frozen=True, env_nested_delimiter="__"
    )

    service_name: str = "sandbox"
    grpc_host: str = "127.0.0.1"
    #: One port serves BatchService and FileService; 0 picks a free one (reported on start).
    grpc_port: int = Field(default=50071, ge=0, le=65535)
    #: The sandbox IdentityService's port when run as a process (``huleedu sandbox``).
    identity_port: int = Field(default=50051, ge=0, le=65535)
    #: Where events are published when run as a process (empty = in-process bus).
    kafka: KafkaSettings = KafkaSettings(client_id="sandbox")
    #: Uploaded files go under ``<state_dir>/files``, uploads in progress under ``incoming``.
    state_dir: Path = Path(".state/sandbox")
    pipeline: PipelineSettings = PipelineSettings()
    files: FileLimits = FileLimits()


@dataclass(frozen=True, slots=True)
class SandboxBackends:
    """A running sandbox: the bound port and the servicers (tests read their state)."""

    port: int
    batches: SandboxBatches
    files: SandboxFiles
    simulator: PipelineSimulator
    publisher: EventPublisher


async def serve_sandbox_backends(
    settings: SandboxSettings | None = None,
    *,
    bus: EventBus,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[SandboxBackends] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the sandbox BatchService and FileService, publishing on ``bus``.

    Reports a :class:`SandboxBackends` (with the bound port) through ``task_status`` once
    listening. Runs until ``shutdown_trigger`` returns or until cancelled; see the module
    docstring for the shutdown order. Opens the gRPC loop itself when none is open (open one
    with :func:`common.rpc.open_rpc_loop` around this and its clients to share it).
    """
    settings = settings or SandboxSettings()
    log.info(
        "sandbox backends starting",
        host=settings.grpc_host,
        port=settings.grpc_port,
        state_dir=str(settings.state_dir),
        pipeline=settings.pipeline.model_dump(),
        limits=settings.files.model_dump(),
    )
    publisher = EventPublisher(bus)
    simulator = PipelineSimulator(publisher, settings.pipeline)
    async with trio.open_nursery() as runs:
        batches = SandboxBatches(publisher, simulator, runs.start_soon)
        files = SandboxFiles(settings.state_dir, batches, publisher, settings.files)
        await trio.to_thread.run_sync(files.prepare)
        async with trio.open_nursery() as server:
            port: int = await server.start(
                partial(
                    serve_grpc,
                    [batches, files],
                    host=settings.grpc_host,
                    port=settings.grpc_port,
                    shutdown_trigger=shutdown_trigger,
                    grace_s=settings.shutdown_grace_s,
                )
            )
            log.info("sandbox backends serving", host=settings.grpc_host, port=port)
            task_status.started(SandboxBackends(port, batches, files, simulator, publisher))
        # serve_grpc returned: the trigger fired and in-flight calls are drained.
        runs.cancel_scope.cancel()
