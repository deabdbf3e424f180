"""Coalesced writes for Hypercorn's Trio TCP server (opt-in per listener).

Hypercorn 0.18 writes every protocol event to the socket on its own: for each WebSocket
frame it takes the connection's send lock, opens a shielded cancel scope and calls
``SSLStream.send_all`` (its own lock, one TLS record, one ``send`` syscall, checkpoints on
each). That is most of the CPU a frame costs. When the WebSocket manager's writer drains
several queued frames at one wakeup, they can leave in one ``send_all`` instead.

:func:`coalesce_writes` patches ``hypercorn.trio.tcp_server.TCPServer`` once per process;
only listeners whose ``Config`` was passed to :func:`enable` behave differently:

* a ``RawData`` event is appended to the connection's buffer and the call returns at once
  (no checkpoint); the first one starts a flusher task in the connection's task group, which
  sends whatever has accumulated when it runs, in one ``send_all``, until the buffer is
  empty;
* back-pressure is kept: while the buffer holds ``HIGH_WATER`` bytes or more, the sender
  waits for the flusher (so a stalled peer still stalls its writer, whose bounded queue then
  overflows: the slow-consumer close);
* order is kept: any other event (``Closed``, ``Updated``) and the connection's close first
  wait until everything buffered has gone out (the close at most ``CLOSE_FLUSH_S``).

Every other listener (the gateway's) runs Hypercorn's own code unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio import tcp_server

__all__ = ["CLOSE_FLUSH_S", "HIGH_WATER", "WriteStatistics", "coalesce_writes", "enable", "stats"]

#: Bytes buffered per connection before a sender waits for the flusher.
HIGH_WATER = 64 * 1024
#: Seconds the connection's close waits for buffered bytes to go out.
CLOSE_FLUSH_S = 1.0
_FLAG = "huleedu_coalesce_writes"
_MARK = "_huleedu_coalesces"


@dataclass
class WriteStatistics:
    """Process-wide counts over coalescing listeners: protocol writes asked for, and the
    ``send_all`` calls that carried them."""

    events: int = 0
    writes: int = 0


stats = WriteStatistics()


def enable(config: Config) -> Config:
    """Make the listener of ``config`` coalesce its writes (and install the patch)."""
    coalesce_writes()
    setattr(config, _FLAG, True)
    return config


class _Writes:
    """One connection's buffered bytes and its flusher's state."""

    __slots__ = ("buffer", "flushing", "room")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.flushing = False
        self.room: trio.Event | None = None

    def wake(self) -> None:
        room, self.room = self.room, None
        if room is not None:
            room.set()

    async def wait(self) -> None:
        if self.room is None:
            self.room = trio.Event()
        await self.room.wait()


def _writes(server: Any) -> _Writes:
    state: _Writes | None = server.__dict__.get("_huleedu_writes")
    if state is None:
        state = server._huleedu_writes = _Writes()
    return state


async def _send_buffered(server: Any, state: _Writes) -> None:
    while state.buffer:
        data = bytes(state.buffer)
        state.buffer.clear()
        state.wake()  # room again for a waiting sender
        stats.writes += 1
        async with server.send_lock:
            try:
                with trio.CancelScope(shield=True):
                    await server.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                state.buffer.clear()
                await server.protocol.handle(Closed())
                return


async def _flush(server: Any, state: _Writes) -> None:
    try:
        await _send_buffered(server, state)
    finally:
        state.flushing = False
        state.wake()


async def _drain(server: Any, state: _Writes) -> None:
    """Return once nothing is buffered or being flushed."""
    while state.flushing:
        await state.wait()
    if state.buffer:
        await _send_buffered(server, state)


def coalesce_writes() -> None:
    """Patch Hypercorn's Trio ``TCPServer`` once per process (idempotent)."""
    server_type: Any = tcp_server.TCPServer
    original_send = server_type.protocol_send
    if getattr(original_send, _MARK, False):
        return
    original_close = server_type._close

    async def protocol_send(self: Any, event: Event) -> None:
        if not getattr(self.config, _FLAG, False):
            await original_send(self, event)
            return
        state = _writes(self)
        if not isinstance(event, RawData):
            await _drain(self, state)
            await original_send(self, event)
            return
        stats.events += 1
        state.buffer += event.data
        if not state.flushing:
            state.flushing = True
            try:
                self._task_group.spawn(_flush, self, state)
            except RuntimeError:  # the connection's task group is closing: send it here
                state.flushing = False
                await _drain(self, state)
                return
        while len(state.buffer) >= HIGH_WATER and state.flushing:
            await state.wait()

    async def close(self: Any) -> None:
        if getattr(self.config, _FLAG, False):
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_FLUSH_S):
                await _drain(self, _writes(self))
        await original_close(self)

    setattr(protocol_send, _MARK, True)
    server_type.protocol_send = protocol_send
    server_type._close = close
