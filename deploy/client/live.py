"""Live updates: :func:`open_live_socket` yields a :class:`LiveSocket` on ``/v1/ws``.

It connects to the WebSocket manager with a one-time ticket (never a token in the URL), waits
for ``welcome``, and the connection lasts until the access token's expiry;
:meth:`LiveSocket.receive` answers server heartbeats itself and reports the close code
(:class:`CloseInfo`). Error messages name the WebSocket URL without the ticket.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import trio
import trio_websocket

from common.tls import client_context
from deploy.client.failures import StepError, describe_failure
from deploy.client.options import ClientConfig

__all__ = ["CloseInfo", "Frame", "LiveSocket", "open_live_socket"]

#: Seconds the WebSocket handshake (TCP, TLS, upgrade) may take, and then ``welcome``.
WS_CONNECT_TIMEOUT_S = 10.0
#: Seconds a closing handshake may take before the connection is dropped.
WS_CLOSE_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """How the WebSocket ended; code 1006 means no close frame came (the network broke)."""

    code: int
    reason: str | None

    def __str__(self) -> str:
        return f"{self.code} {self.reason}" if self.reason else str(self.code)


@dataclass(frozen=True, slots=True)
class Frame:
    """A server frame: the text as received and the decoded object."""

    text: str
    body: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.body.get("type", ""))


class LiveSocket:
    """An authenticated ``/v1/ws`` connection (after ``welcome``)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, welcome: Frame) -> None:
        self._ws = ws
        self.welcome = welcome
        #: Set once the connection has closed.
        self.closed: CloseInfo | None = None
        #: Server heartbeats answered so far.
        self.pings_answered = 0

    async def receive(self) -> Frame | None:
        """The next frame that is not a server ``ping`` (those are answered with ``pong``
        here); None once the connection is closed (see :attr:`closed`). A frame that is not
        a JSON object closes the connection with 1007."""
        while True:
            try:
                message = await self._ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                self._record(exc)
                return None
            frame = _decode(message)
            if frame is None:
                await self.close(1007, "frame is not a JSON object")
                return None
            if frame.type == "ping":
                await self.send({"type": "pong", "nonce": frame.body.get("nonce")})
                self.pings_answered += 1
                continue
            return frame

    async def send(self, frame: Mapping[str, Any]) -> None:
        """Send one frame; on a closed connection nothing is sent (``receive`` says why)."""
        try:
            await self._ws.send_message(json.dumps(frame, separators=(",", ":")))
        except trio_websocket.ConnectionClosed as exc:
            self._record(exc)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close with ``code`` (a no-op if closed already), waiting at most
        :data:`WS_CLOSE_TIMEOUT_S` for the server's answer.

        In a cancelled scope nothing is sent: the socket's reader task is cancelled too, so
        no closing handshake could complete; the connection is just dropped (the server sees
        1006). To close cleanly, stop reading without cancelling the socket's own scope.
        """
        if trio.current_effective_deadline() == -math.inf:
            self._note(trio_websocket.CloseReason(1006, "dropped by a cancelled client"))
            return
        with trio.move_on_after(WS_CLOSE_TIMEOUT_S):
            await self._ws.aclose(code, reason)
        self._note(self._ws.closed or trio_websocket.CloseReason(code, reason))

    def _record(self, exc: trio_websocket.ConnectionClosed) -> None:
        self._note(exc.reason or trio_websocket.CloseReason(1006, None))

    def _note(self, reason: trio_websocket.CloseReason) -> None:
        if self.closed is None:
            self.closed = CloseInfo(reason.code, reason.reason)


def _decode(message: str | bytes) -> Frame | None:
    if isinstance(message, bytes):
        return None
    try:
        body = json.loads(message)
    except ValueError:
        return None
    return Frame(message, body) if isinstance(body, dict) else None


def _ws_url(base: str, ticket: str, since: str | None) -> str:
    query = {"ticket": ticket, **({"since": since} if since else {})}
    return f"{base}?{urlencode(query, safe='/:')}"


async def _welcome(ws: trio_websocket.WebSocketConnection, where: str) -> Frame:
    step = "ws connect"
    try:
        with trio.fail_after(WS_CONNECT_TIMEOUT_S):
            message = await ws.get_message()
    except trio.TooSlowError:
        raise StepError(
            step, f"no welcome from {where} within {WS_CONNECT_TIMEOUT_S:g} s"
        ) from None
    except trio_websocket.ConnectionClosed as exc:
        raise StepError(step, f"{where} closed the connection: {_close_text(exc)}") from None
    frame = _decode(message)
    if frame is None or frame.type != "welcome":
        raise StepError(step, f"{where} sent something other than welcome first")
    return frame


def _close_text(exc: trio_websocket.ConnectionClosed) -> str:
    if exc.reason is None or exc.reason.code == 1006:
        return "1006 (no close frame: TLS or network failure)"
    return str(CloseInfo(exc.reason.code, exc.reason.reason))


@asynccontextmanager
async def open_live_socket(
    config: ClientConfig, ticket: str, *, since: str | None = None
) -> AsyncIterator[LiveSocket]:
    """Connect with a one-time ``ticket`` (and ``since=<epoch>:<offset>`` to resume), wait for
    ``welcome``, yield the socket; on exit close it (1000) and drop the TCP stream.

    The socket lives as long as the access token the ticket was minted from
    (``welcome.expires_at``); send ``refresh`` frames with newer tokens to keep it longer.

    Raises :class:`StepError` (step ``ws connect``) when the server cannot be reached, refuses
    the upgrade (a refused Origin or a bad ``since`` is HTTP 403) or closes before ``welcome``
    (4001: the ticket was refused).
    """
    step, where = "ws connect", config.ws_url
    headers = [(b"origin", config.origin.encode())] if config.origin else []
    tls = client_context(config.ca_file, alpn=["http/1.1"]) if where.startswith("wss:") else None
    try:
        async with trio_websocket.open_websocket_url(
            _ws_url(where, ticket, since),
            tls,
            extra_headers=headers,
            connect_timeout=WS_CONNECT_TIMEOUT_S,
            disconnect_timeout=WS_CLOSE_TIMEOUT_S,
        ) as ws:
            live: LiveSocket | None = None
            try:
                live = LiveSocket(ws, await _welcome(ws, where))
                yield live
            finally:
                if live is not None:
                    await live.close()
                # trio-websocket 0.12 leaves its TCP stream open when the server closed
                # first (its EOF path never closes it): close it ourselves.
                await trio.aclose_forcefully(ws._stream)
    except trio_websocket.ConnectionRejected as exc:
        raise StepError(step, f"{where} refused the upgrade: HTTP {exc.status_code}") from None
    except trio_websocket.ConnectionTimeout:
        raise StepError(step, f"no answer from {where} within {WS_CONNECT_TIMEOUT_S:g} s") from None
    except trio_websocket.HandshakeError as exc:
        raise StepError(step, f"cannot reach {where}: {describe_failure(exc)}") from None
