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
import sys
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import trio

from common.errors import ConfigurationError, UnavailableError
from common.logs import configure_logging, get_logger
from common.settings import ServiceSettings, load_settings, redacted

__all__ = ["Serve", "run_service", "service_main"]

S = TypeVar("S", bound=ServiceSettings)


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


def service_main(name: str, settings_type: type[S], run: Callable[[S], Awaitable[None]]) -> int:
    """``python -m <service>``: settings from the environment, logging, ``trio.run(run)``.

    A bad setting, or a dependency the service cannot start without, is one line on stderr
    naming it and exit code 2 (no traceback); a clean shutdown is 0.
    """
    try:
        settings = load_settings(settings_type)
    except ConfigurationError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    configure_logging(service=name, level=settings.log_level, json=settings.log_json)
    get_logger(name).info("config", settings=redacted(settings))
    try:
        trio.run(run, settings)
    except (ConfigurationError, UnavailableError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    return 0
