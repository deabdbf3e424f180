"""Running one service as a process: SIGTERM/SIGINT -> graceful shutdown, one ready line.

``run_service`` starts ``serve(shutdown=..., task_status=...)`` (the ``serve_*`` shape every
service has), prints ``{"ready": true, ...}`` with what ``describe`` makes of the started value,
and waits for ``serve`` to return. The first SIGTERM or SIGINT only sets ``shutdown``: the
service turns readiness false, lets in-flight work finish within its grace period and returns
by itself; nothing here cancels it. After that first signal the default handlers are back, so a
second one stops the process at once.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from common.logs import get_logger

__all__ = ["Serve", "run_service"]


class Serve(Protocol):
    def __call__(
        self, *, shutdown: trio.Event, task_status: trio.TaskStatus[Any]
    ) -> Awaitable[None]: ...


async def run_service(name: str, serve: Serve, describe: Callable[[Any], dict[str, Any]]) -> None:
    log = get_logger(name)
    shutdown = trio.Event()

    async def on_signals() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("shutting down", signal=signal.Signals(signum).name)
                shutdown.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signals)

        async def serving(task_status: trio.TaskStatus[Any]) -> None:
            await serve(shutdown=shutdown, task_status=task_status)
            nursery.cancel_scope.cancel()  # served and drained: stop listening for signals

        started = await nursery.start(serving)
        print(json.dumps({"ready": True, **describe(started)}), flush=True)
        log.info("ready", **describe(started))
