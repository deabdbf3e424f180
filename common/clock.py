"""The injected clock every timer in the tier reads.

Sans-IO cores (rate limiters, caches, breakers) take ``now`` as an argument; the code that
drives them reads it from a :class:`Clock`. The default, :class:`TrioClock`, reads the clock of
the running Trio run, so under ``trio.testing.MockClock`` (pytest-trio's ``autojump_clock``)
everything moves on virtual time with no patching.
"""

from __future__ import annotations

from typing import Protocol

import trio

__all__ = ["Clock", "TrioClock"]


class Clock(Protocol):
    """Monotonic seconds plus a way to wait for a point in time."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class TrioClock:
    """The running Trio run's clock (virtual under ``MockClock``). Stateless; share freely."""

    __slots__ = ()

    def now(self) -> float:
        return trio.current_time()

    async def sleep_until(self, deadline: float) -> None:
        await trio.sleep_until(deadline)
