"""A circuit breaker (closed / open / half-open), sans-IO, on the caller's clock.

CLOSED: calls pass; outcomes go into a rolling window of ``window_s`` split into buckets. Once
the window holds at least ``minimum_calls`` and failures/calls >= ``failure_ratio``, the
breaker OPENs: calls are refused at once with :class:`~common.errors.CircuitOpenError` whose
``retry_after`` is the time left. After ``open_for_s`` it is HALF_OPEN: up to
``half_open_max_calls`` probes pass; one failed probe re-opens it (a fresh cooldown),
``success_to_close`` successful probes close it with an empty window.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from common.clock import Clock, TrioClock
from common.errors import CircuitOpenError

__all__ = ["BreakerPolicy", "BreakerState", "BreakerStatistics", "CircuitBreaker"]

T = TypeVar("T")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    failure_ratio: float = 0.5
    minimum_calls: int = 10
    window_s: float = 10.0
    buckets: int = 10
    open_for_s: float = 5.0
    half_open_max_calls: int = 1
    success_to_close: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.failure_ratio <= 1:
            raise ValueError(f"failure_ratio must be in (0, 1], got {self.failure_ratio}")
        for name in ("minimum_calls", "buckets", "half_open_max_calls", "success_to_close"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("window_s", "open_for_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if self.success_to_close > self.half_open_max_calls:
            raise ValueError("success_to_close must be <= half_open_max_calls")


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    name: str
    state: BreakerState
    calls_in_window: int
    failures_in_window: int
    times_opened: int
    #: Seconds until an open breaker half-opens (0 unless open).
    retry_after_s: float


class CircuitBreaker:
    """One breaker per dependency (e.g. per backend service). Use from one Trio run."""

    def __init__(self, name: str, policy: BreakerPolicy | None = None) -> None:
        self.name = name
        self.policy = policy or BreakerPolicy()
        self._bucket_s = self.policy.window_s / self.policy.buckets
        # bucket index -> [calls, failures]; only buckets inside the window are kept.
        self._window: dict[int, list[int]] = {}
        self._state = BreakerState.CLOSED
        self._opened_at = 0.0
        self._probes = 0
        self._probe_successes = 0
        self._times_opened = 0

    # -- state ------------------------------------------------------------------------------

    def state(self, now: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now >= self._opened_at + self.policy.open_for_s:
            self._state = BreakerState.HALF_OPEN
            self._probes = 0
            self._probe_successes = 0
        return self._state

    def _trim(self, now: float) -> int:
        current = math.floor(now / self._bucket_s)
        oldest = current - self.policy.buckets + 1
        for index in [i for i in self._window if i < oldest]:
            del self._window[index]
        return current

    def _totals(self, now: float) -> tuple[int, int]:
        self._trim(now)
        calls = sum(b[0] for b in self._window.values())
        failures = sum(b[1] for b in self._window.values())
        return calls, failures

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._times_opened += 1

    # -- the protocol -------------------------------------------------------------------------

    def before_call(self, now: float) -> None:
        """Raise :class:`CircuitOpenError` if a call may not be made now; else admit it."""
        state = self.state(now)
        if state is BreakerState.OPEN:
            retry = self._opened_at + self.policy.open_for_s - now
            raise CircuitOpenError(
                f"{self.name}: circuit open", service=self.name, retry_after=retry
            )
        if state is BreakerState.HALF_OPEN:
            if self._probes >= self.policy.half_open_max_calls:
                raise CircuitOpenError(
                    f"{self.name}: circuit half-open, probe in flight",
                    service=self.name,
                    retry_after=self._bucket_s,
                )
            self._probes += 1

    def record_success(self, now: float) -> None:
        if self.state(now) is BreakerState.HALF_OPEN:
            self._probe_successes += 1
            if self._probe_successes >= self.policy.success_to_close:
                self._state = BreakerState.CLOSED
                self._window.clear()
            return
        bucket = self._window.setdefault(self._trim(now), [0, 0])
        bucket[0] += 1

    def record_failure(self, now: float) -> None:
        state = self.state(now)
        if state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        if state is BreakerState.OPEN:
            return
        bucket = self._window.setdefault(self._trim(now), [0, 0])
        bucket[0] += 1
        bucket[1] += 1
        calls, failures = self._totals(now)
        if calls >= self.policy.minimum_calls and failures / calls >= self.policy.failure_ratio:
            self._open(now)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        is_failure: Callable[[BaseException], bool] = lambda exc: True,
        clock: Clock | None = None,
    ) -> T:
        """Run ``fn`` through the breaker. ``is_failure(exc)`` decides whether an exception
        counts against the dependency (e.g. a 404 does not); ``trio.Cancelled`` never counts
        and always propagates."""
        clock = clock or TrioClock()
        self.before_call(clock.now())
        try:
            result = await fn()
        except trio.Cancelled:
            if self._state is BreakerState.HALF_OPEN:
                self._probes -= 1  # the probe never finished: let another try
            raise
        except BaseException as exc:
            if is_failure(exc):
                self.record_failure(clock.now())
            else:
                self.record_success(clock.now())
            raise
        self.record_success(clock.now())
        return result

    def statistics(self, now: float) -> BreakerStatistics:
        state = self.state(now)
        calls, failures = self._totals(now)
        retry = (
            max(0.0, self._opened_at + self.policy.open_for_s - now)
            if state is BreakerState.OPEN
            else 0.0
        )
        return BreakerStatistics(self.name, state, calls, failures, self._times_opened, retry)
