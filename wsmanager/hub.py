"""The fan-out core: who is connected, which events they get, and what a reconnect replays.

* **Routing by construction.** Connections are registered under the verified user id; an event
  is offered only to the connections of the user it belongs to. There is no global broadcast
  that a filter then narrows.
* **The fan-out never awaits a client.** :meth:`Hub.dispatch` is synchronous: each
  connection has a bounded queue (``send_nowait``) drained by its own writer task; a full
  queue marks that connection for closing as a slow consumer (4009) and the loop moves on.
  Every event is serialised once (``Delivery.frame``); recipients share the same ``str``.
* **Resume.** Every instance reads the whole notification topic, so it holds a bounded,
  per-user replay buffer of recent events, keyed by ``(epoch, offset)``: the epoch names the
  partition log (``topic/partition``), the offset is Kafka's. A client reconnecting with
  ``since=(epoch, offset)`` gets every buffered event after it, in order, provided the buffer
  is complete from ``since`` on (nothing of that user evicted after it, and this instance has
  read the partition from before it); otherwise ``recovered`` is false and the client
  re-fetches over REST. Offsets a connection already got are never sent twice.

Times are not read here; the caller does all waiting. Not thread-safe (one Trio run).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

import outcome
import trio

from common.errors import WsCloseCode

__all__ = [
    "Connection",
    "Delivery",
    "Filterish",
    "Hub",
    "HubStatistics",
    "Outbox",
    "Refused",
    "Resume",
]


class Filterish(Protocol):
    def matches(self, batch_id: str | None, category: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event, ready to send: ``frame`` is its serialised ``event`` frame."""

    epoch: str
    offset: int
    user_id: str
    event_id: str
    batch_id: str | None
    category: str
    frame: str


@dataclass(frozen=True, slots=True)
class Resume:
    recovered: bool
    replayed: int


class Refused(Exception):
    """A connection the hub will not take (a cap), with the close code to answer."""

    def __init__(self, code: WsCloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class _Everything:
    def matches(self, batch_id: str | None, category: str) -> bool:
        return True


_EVERYTHING = _Everything()


_ids = itertools.count(1)


class Outbox:
    """A connection's outbound queue: a bounded, closable FIFO for one reader with a memory
    channel's semantics (a frame offered while the reader waits goes straight to it and does
    not count against ``capacity``; after :meth:`close` the reader gets what is queued, then
    ``EndOfChannel``), for a fraction of a channel's size: one deque and one task slot (a
    channel is about 3 KiB per connection, this about 0.9 KiB), and no per-frame checkpoint
    for a reader that drains with :meth:`receive_nowait`."""

    __slots__ = ("_capacity", "_closed", "_frames", "_reader")

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._frames: deque[str] = deque()
        self._reader: trio.lowlevel.Task | None = None
        self._closed = False

    def __len__(self) -> int:
        return len(self._frames)

    def send_nowait(self, frame: str) -> None:
        """Queue ``frame``; ``trio.WouldBlock`` when full, ``ClosedResourceError`` if closed."""
        if self._closed:
            raise trio.ClosedResourceError("the outbox is closed")
        reader = self._reader
        if reader is not None:
            self._reader = None
            trio.lowlevel.reschedule(reader, outcome.Value(frame))
        elif len(self._frames) >= self._capacity:
            raise trio.WouldBlock
        else:
            self._frames.append(frame)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            reader, self._reader = self._reader, None
            if reader is not None:
                trio.lowlevel.reschedule(reader, outcome.Error(trio.EndOfChannel()))

    def receive_nowait(self) -> str:
        """The oldest queued frame; ``trio.WouldBlock`` if none, ``EndOfChannel`` once closed
        and drained."""
        if self._frames:
            return self._frames.popleft()
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def receive(self) -> str:
        """The next frame, waiting for one (a checkpoint); ``EndOfChannel`` as above."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            frame = self.receive_nowait()
        except trio.WouldBlock:
            pass
        else:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return frame
        if self._reader is not None:
            raise trio.BusyResourceError("another task is already receiving")
        self._reader = trio.lowlevel.current_task()

        def abort(_: object) -> trio.lowlevel.Abort:
            self._reader = None
            return trio.lowlevel.Abort.SUCCEEDED

        frame = await trio.lowlevel.wait_task_rescheduled(abort)
        assert isinstance(frame, str)
        return frame

    def __aiter__(self) -> Outbox:
        return self

    async def __anext__(self) -> str:
        try:
            return await self.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None


class Connection:
    """One authenticated socket's delivery state (its writer task owns ``receive``)."""

    __slots__ = (
        "_backlog",
        "_closing",
        "_last",
        "_on_close",
        "close_code",
        "close_reason",
        "delivered",
        "filter",
        "id",
        "receive",
        "session_id",
        "user_id",
    )

    def __init__(
        self,
        user_id: str,
        session_id: str,
        *,
        queue_frames: int,
        filter: Filterish | None = None,
    ) -> None:
        self.id = f"c{next(_ids)}"
        self.user_id = user_id
        self.session_id = session_id
        self.filter: Filterish = filter or _EVERYTHING
        self.receive = Outbox(queue_frames)
        self._backlog: deque[str] | None = None
        self._closing: trio.Event | None = None
        self._on_close: Callable[[], object] | None = None
        self.close_code: WsCloseCode | None = None
        self.close_reason = ""
        self._last: dict[str, int] = {}
        self.delivered = 0

    # The backlog and the closing event are made on first use: most connections never need
    # them, and an empty deque or Event costs more than the rest of this object.
    @property
    def backlog(self) -> deque[str]:
        """Frames to send before anything from the queue (a resume's replay)."""
        if self._backlog is None:
            self._backlog = deque()
        return self._backlog

    def has_backlog(self) -> bool:
        return bool(self._backlog)

    @property
    def closing(self) -> trio.Event:
        """Set once the connection must close; ``close_code``/``close_reason`` say why."""
        if self._closing is None:
            self._closing = trio.Event()
            if self.close_code is not None:
                self._closing.set()
        return self._closing

    def on_close(self, callback: Callable[[], object] | None) -> None:
        """Call ``callback`` (synchronously, once) when the connection is asked to close; at
        once if it already was. The socket's handler cancels its tasks with it."""
        self._on_close = callback
        if callback is not None and self.close_code is not None:
            callback()

    def close(self, code: WsCloseCode, reason: str) -> None:
        """Ask the connection to close (the first reason wins)."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
            self.receive.close()
            if self._closing is not None:
                self._closing.set()
            if self._on_close is not None:
                self._on_close()

    def seen(self, epoch: str, offset: int) -> None:
        """Treat everything up to ``offset`` of ``epoch`` as delivered (a resume point)."""
        self._last[epoch] = max(self._last.get(epoch, -1), offset)

    def offer(self, delivery: Delivery, *, live: bool = True) -> bool:
        """Queue ``delivery`` unless filtered, already sent, or the queue is full (then the
        connection is closed as a slow consumer). False only in that last case."""
        if self.close_code is not None:
            return True
        if delivery.offset <= self._last.get(delivery.epoch, -1):
            return True
        if not self.filter.matches(delivery.batch_id, delivery.category):
            return True
        if live:
            try:
                self.receive.send_nowait(delivery.frame)
            except trio.WouldBlock:
                self.close(WsCloseCode.SLOW_CONSUMER, "outbound queue full")
                return False
        else:
            self.backlog.append(delivery.frame)
        self._last[delivery.epoch] = delivery.offset
        self.delivered += 1
        return True


@dataclass
class _User:
    connections: set[Connection] = field(default_factory=set)
    buffer: deque[Delivery] = field(default_factory=deque)
    #: Per epoch: the highest offset of this user's events that left the buffer.
    evicted: dict[str, int] = field(default_factory=dict)
    #: Per epoch: up to where this user's history may be incomplete because an earlier
    #: buffer of theirs was forgotten (the hub keeps buffers for ``replay_users`` users).
    horizon: dict[str, int] = field(default_factory=dict)


@dataclass
class HubStatistics:
    connections: int = 0
    users_connected: int = 0
    events_dispatched: int = 0
    frames_queued: int = 0
    slow_consumers: int = 0
    refused_user_cap: int = 0
    refused_global_cap: int = 0
    resumes_recovered: int = 0
    resumes_not_recovered: int = 0


class Hub:
    def __init__(
        self,
        *,
        max_connections: int,
        max_connections_per_user: int,
        replay_events_per_user: int,
        replay_users: int,
    ) -> None:
        self.max_connections = max_connections
        self.max_per_user = max_connections_per_user
        self.replay_events = replay_events_per_user
        self.replay_users = replay_users
        self._users: OrderedDict[str, _User] = OrderedDict()
        #: Per epoch: the first offset this instance consumed (the buffers start there).
        self._first: dict[str, int] = {}
        #: Per epoch: the highest offset of any forgotten user's history.
        self._lost: dict[str, int] = {}
        self._count = 0
        self.stats = HubStatistics()

    # -- connections ---------------------------------------------------------------------------

    def register(self, connection: Connection) -> None:
        """Take a connection for live delivery; raises :class:`Refused` at a cap."""
        if self._count >= self.max_connections:
            self.stats.refused_global_cap += 1
            raise Refused(WsCloseCode.TRY_AGAIN_LATER, "server at its connection limit")
        user = self._user(connection.user_id)
        if len(user.connections) >= self.max_per_user:
            self.stats.refused_user_cap += 1
            raise Refused(
                WsCloseCode.TOO_MANY_CONNECTIONS,
                f"at most {self.max_per_user} connections per user",
            )
        user.connections.add(connection)
        self._count += 1
        self._refresh_counts()

    def unregister(self, connection: Connection) -> None:
        user = self._users.get(connection.user_id)
        if user is not None and connection in user.connections:
            user.connections.discard(connection)
            self._count -= 1
            self._refresh_counts()

    def connections_of(self, user_id: str) -> frozenset[Connection]:
        user = self._users.get(user_id)
        return frozenset(user.connections) if user else frozenset()

    def close_session(self, session_id: str, code: WsCloseCode, reason: str) -> int:
        """Close every connection authenticated by ``session_id``; how many."""
        closed = 0
        for user in self._users.values():
            for connection in list(user.connections):
                if connection.session_id == session_id:
                    connection.close(code, reason)
                    closed += 1
        return closed

    def close_all(self, code: WsCloseCode, reason: str) -> None:
        for user in self._users.values():
            for connection in list(user.connections):
                connection.close(code, reason)

    # -- events ----------------------------------------------------------------------------------

    def dispatch(self, delivery: Delivery) -> int:
        """Keep ``delivery`` for resume and offer it to its user's connections (synchronous:
        never waits for a client). Returns how many connections got it queued."""
        self._first.setdefault(delivery.epoch, delivery.offset)
        self.stats.events_dispatched += 1
        user = self._user(delivery.user_id)
        if self.replay_events:
            user.buffer.append(delivery)
            while len(user.buffer) > self.replay_events:
                gone = user.buffer.popleft()
                user.evicted[gone.epoch] = max(user.evicted.get(gone.epoch, -1), gone.offset)
        queued = 0
        # Synchronous all the way: offer() never reschedules this loop's task, and closing a
        # connection does not change the set (its handler unregisters it later).
        for connection in user.connections:
            before = connection.delivered
            if not connection.offer(delivery):
                self.stats.slow_consumers += 1
            elif connection.delivered > before:
                queued += 1
        self.stats.frames_queued += queued
        return queued

    def resume(self, connection: Connection, epoch: str, since: int) -> Resume:
        """Queue (as backlog) the user's buffered events after ``(epoch, since)``; call right
        after :meth:`register`, with no await in between, so nothing falls in a gap."""
        user = self._user(connection.user_id)
        first = self._first.get(epoch)
        complete_after = max(
            first - 1 if first is not None else since + 1,
            user.evicted.get(epoch, -1),
        )
        complete_after = max(complete_after, user.horizon.get(epoch, -1))
        # Whatever happens, nothing at or before ``since`` is sent to this connection again.
        connection.seen(epoch, since)
        if first is None or since < complete_after:
            self.stats.resumes_not_recovered += 1
            return Resume(recovered=False, replayed=0)
        replayed = 0
        for delivery in user.buffer:
            if delivery.epoch == epoch and delivery.offset > since:
                before = connection.delivered
                connection.offer(delivery, live=False)
                replayed += connection.delivered - before
        self.stats.resumes_recovered += 1
        return Resume(recovered=True, replayed=replayed)

    # -- internals ---------------------------------------------------------------------------------

    def _user(self, user_id: str) -> _User:
        user = self._users.get(user_id)
        if user is None:
            user = self._users[user_id] = _User(horizon=dict(self._lost))
            self._forget_idle()
        else:
            self._users.move_to_end(user_id)
        return user

    def _forget_idle(self) -> None:
        while len(self._users) > self.replay_users:
            for user_id, user in self._users.items():
                if not user.connections:
                    del self._users[user_id]
                    # Someone's history went with it; a new entry for any user cannot vouch
                    # for what came before (conservative: recovered=false, never a gap).
                    for delivery in user.buffer:
                        self._lost[delivery.epoch] = max(
                            self._lost.get(delivery.epoch, -1), delivery.offset
                        )
                    for epoch, offset in user.evicted.items():
                        self._lost[epoch] = max(self._lost.get(epoch, -1), offset)
                    break
            else:
                return

    def _refresh_counts(self) -> None:
        self.stats.connections = self._count
        self.stats.users_connected = sum(1 for u in self._users.values() if u.connections)

    def users(self) -> Iterable[str]:
        return self._users.keys()
