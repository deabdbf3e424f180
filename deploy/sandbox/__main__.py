"""``python -m deploy.sandbox`` (also ``huleedu sandbox``): the sandbox backends as a process.

The stand-ins for HuleEdu's backend services in multi-process mode: the IdentityService on
``grpc_host:identity_port`` and the BatchService + FileService (with the pipeline simulator)
on ``grpc_host:grpc_port``, publishing events on the Kafka broker of ``HULEEDU_SANDBOX_KAFKA__*``.
Configured by environment (``HULEEDU_SANDBOX_*``); prints one JSON ready line with the ports.
SIGTERM or SIGINT: in-flight calls finish, exit 0 (unfinished pipeline runs stay in processing,
as when a real backend stops; their state is in memory only).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

import trio

from common.bus import open_service_bus
from common.rpc import open_rpc_loop
from common.service import run_service, service_main
from deploy.sandbox.identity import serve_sandbox_identity
from deploy.sandbox.serve import SandboxBackends, SandboxSettings, serve_sandbox_backends


@dataclass(frozen=True, slots=True)
class SandboxPorts:
    identity_port: int
    grpc_port: int


async def serve_sandbox(
    settings: SandboxSettings,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[SandboxPorts] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Identity + batch/file backends until ``shutdown`` is set."""
    async with (
        open_rpc_loop(),
        open_service_bus(settings.kafka) as bus,
        trio.open_nursery() as nursery,
    ):
        identity_port: int = await nursery.start(
            partial(
                serve_sandbox_identity,
                host=settings.grpc_host,
                port=settings.identity_port,
                shutdown_trigger=shutdown.wait,
            )
        )
        backends: SandboxBackends = await nursery.start(
            partial(serve_sandbox_backends, settings, bus=bus, shutdown_trigger=shutdown.wait)
        )
        task_status.started(SandboxPorts(identity_port, backends.port))


async def _run(settings: SandboxSettings) -> None:
    await run_service(
        "sandbox",
        partial(serve_sandbox, settings),
        lambda ports: {"identity_port": ports.identity_port, "grpc_port": ports.grpc_port},
    )


def main() -> int:
    return service_main("sandbox", SandboxSettings, _run)


if __name__ == "__main__":
    sys.exit(main())
