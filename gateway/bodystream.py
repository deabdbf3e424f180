"""A request body read on demand, for streaming routes (uploads).

Quart reads a request's body eagerly into memory as fast as the client sends it, with no
back-pressure. For a streaming route the edge instead hands the app an empty body and puts a
:class:`BodyStream` into ``scope["huleedu.body"]``: the route pulls chunks from Hypercorn's
``receive`` only when it is ready for them, so a slow backend slows the client (HTTP/2 flow
control, TCP windows) instead of filling the gateway's memory.

The stream enforces what the edge enforces for other routes, adapted to long bodies:

* ``max_bytes``: more bytes than that (or a ``Content-Length`` announcing more) ->
  :class:`~common.errors.PayloadTooLargeError` naming ``limit_field``;
* ``idle_timeout_s``: no byte for that long -> :class:`~common.errors.RequestTimeoutError`
  (a whole upload may take long; a stalled one may not hold a connection forever);
* the client going away -> :class:`ClientDisconnected`.

Quart's own ``receive`` (it waits for ``http.disconnect`` while the handler runs) gets the
disconnect only when this stream has seen it, so exactly one task reads from Hypercorn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import trio

from common.errors import PayloadTooLargeError, RequestTimeoutError

__all__ = ["SCOPE_KEY", "BodyStream", "ClientDisconnected"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

SCOPE_KEY = "huleedu.body"


class ClientDisconnected(Exception):
    """The client closed the connection (or reset the stream) before the body ended."""


class BodyStream:
    def __init__(
        self,
        receive: Receive,
        *,
        max_bytes: int,
        idle_timeout_s: float,
        content_length: int | None,
        limit_field: str = "max_total_bytes",
    ) -> None:
        self._receive = receive
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.content_length = content_length
        self._limit_field = limit_field
        self.received = 0
        self._ended = False
        self.disconnected = trio.Event()

    @property
    def ended(self) -> bool:
        return self._ended

    def check_declared_length(self) -> None:
        if self.content_length is not None and self.content_length > self.max_bytes:
            raise PayloadTooLargeError(
                f"request body of {self.content_length} bytes exceeds {self.max_bytes}",
                field=self._limit_field,
            )

    async def receive_some(self) -> bytes:
        """The next chunk of the body (never empty), or ``b""`` once it has ended."""
        self.check_declared_length()
        while not self._ended:
            with trio.move_on_after(self.idle_timeout_s) as idle:
                message = await self._receive()
            if idle.cancelled_caught:
                raise RequestTimeoutError(
                    f"no request body bytes for {self.idle_timeout_s:g} s",
                    field="upload_idle_timeout_s",
                )
            if message["type"] != "http.request":
                self._ended = True
                self.disconnected.set()
                raise ClientDisconnected("client went away during the request body")
            chunk: bytes = message.get("body", b"")
            if not message.get("more_body", False):
                self._ended = True
            self.received += len(chunk)
            if self.received > self.max_bytes:
                raise PayloadTooLargeError(
                    f"request body exceeds {self.max_bytes} bytes", field=self._limit_field
                )
            if chunk:
                return chunk
        return b""

    def app_receive(self) -> Receive:
        """What the app framework gets as ``receive``: an empty body, then the disconnect
        once this stream has seen it."""
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await self.disconnected.wait()
            return {"type": "http.disconnect"}

        return receive
