"""Hypercorn hardening shared by every service that serves HTTP.

Hypercorn 0.18 answers an HTTP/1.1 request carrying ``Upgrade: h2c`` with ``101 Switching
Protocols`` and turns the connection into cleartext-framed HTTP/2 before the application sees
anything, even on a TLS listener. That upgrade is the basis of "h2c smuggling" past proxies,
and no client of ours needs it (HTTP/2 is negotiated by ALPN). :func:`refuse_h2c_upgrade`
makes Hypercorn keep such a request on HTTP/1.1, so it reaches the app, whose edge refuses it
with a 400 problem document. (A ``PRI *`` prior-knowledge preface is left alone.)
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config
from hypercorn.protocol import h11 as hypercorn_h11

from common.tls import configure_hypercorn

__all__ = ["answer_lifespan", "listener_config", "refuse_h2c_upgrade", "serve_listener"]

_MARK = "_huleedu_refuses_h2c"


def refuse_h2c_upgrade() -> None:
    """Patch Hypercorn's HTTP/1.1 protocol once per process (idempotent)."""
    protocol: Any = hypercorn_h11.H11Protocol
    original = protocol._check_protocol
    if getattr(original, _MARK, False):
        return

    async def check_protocol(self: Any, event: Any) -> None:
        for name, value in event.headers:
            if name.strip().lower() == b"upgrade" and b"h2c" in value.lower():
                return  # stay on HTTP/1.1; the application refuses the request
        await original(self, event)

    setattr(check_protocol, _MARK, True)
    protocol._check_protocol = check_protocol


async def answer_lifespan(
    receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
) -> None:
    """The ASGI lifespan protocol for an app with nothing to start or stop: acknowledge the
    startup, then the shutdown (and return)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def listener_config(host: str, port: int, *, grace_s: float, tls: Any = None) -> Config:
    """A Hypercorn ``Config`` for one listener: no access log (our edge logs), the drain
    grace period, and TLS from ``tls`` (:class:`common.tls.TlsSettings`) when given."""
    config = Config()
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    # Hypercorn's own messages go through our logging (one format, the process's level)
    # instead of a second stderr handler of its own.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = grace_s
    if tls is not None:
        configure_hypercorn(tls, config)
    return config


async def serve_listener(
    app: Any,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]],
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``config``'s bind until ``shutdown_trigger`` returns (then drain);
    reports the bound URL (port 0 resolved) through ``task_status``."""
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown_trigger)
        )
        task_status.started(binds[0])
