"""Revoked sessions, fed from ``session.revoked`` events: what every token checker consults.

The gateway publishes ``session.revoked`` when a session ends (logout, refresh-token reuse,
an admin); every instance of every service that accepts access tokens (gateway, wsmanager)
consumes the topic with its own consumer group, keeps the revoked session ids until their
access tokens have expired, and refuses those tokens meanwhile (``TokenVerifier``'s
``is_revoked``). ``on_revoked`` lets a service act at once too (the wsmanager closes the
session's sockets).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import trio

from common.bus import Subscription
from common.events import PoisonMessageError, Topic, decode_envelope
from common.logs import get_logger

__all__ = ["Revocations", "run_revocation_consumer", "trio_wall_clock"]

log = get_logger("common.revocations")


def trio_wall_clock() -> Callable[[], float]:
    """Wall-clock seconds that advance with the Trio clock (virtual under ``MockClock``)."""
    offset = time.time() - trio.current_time()
    return lambda: offset + trio.current_time()


class Revocations:
    """Revoked session ids, each until its access tokens have expired (wall-clock seconds)."""

    def __init__(self, wall: Callable[[], float]) -> None:
        self._wall = wall
        self._until: dict[str, float] = {}
        self._next_prune = 0.0

    def add(self, sid: str, until: float) -> None:
        self._until[sid] = max(until, self._until.get(sid, 0.0))

    def __contains__(self, sid: str) -> bool:
        now = self._wall()
        if now >= self._next_prune:
            self._until = {k: v for k, v in self._until.items() if v > now}
            self._next_prune = now + 60.0
        until = self._until.get(sid)
        return until is not None and until > now

    def __len__(self) -> int:
        return len(self._until)


async def run_revocation_consumer(
    subscribe: Callable[[], AbstractAsyncContextManager[Subscription]],
    revocations: Revocations,
    *,
    wall: Callable[[], float],
    fallback_ttl_s: float,
    on_revoked: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume ``session.revoked`` into ``revocations`` until cancelled.

    ``subscribe()`` returns the bus subscription context (the instance's own group, so every
    instance reads every revocation); ``on_revoked(session_id)`` runs for each one.
    """
    async with subscribe() as sub:
        task_status.started()
        while True:
            records = await sub.get_batch(max_records=500, timeout_s=0.25)
            for record in records:
                try:
                    envelope = decode_envelope(
                        record.value, expected_topics=[Topic.SESSION_REVOKED]
                    )
                except PoisonMessageError as exc:
                    log.warning("unreadable session.revoked record", reason=exc.reason)
                    continue
                event = envelope.session_revoked
                if event is None or not event.session_id:
                    continue
                until = (
                    event.access_expires_at.timestamp()
                    if event.access_expires_at is not None
                    else wall() + fallback_ttl_s
                )
                revocations.add(event.session_id, until)
                if on_revoked is not None:
                    on_revoked(event.session_id)
            if records:
                await sub.commit(records)
