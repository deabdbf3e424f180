"""A circuit breaker (closed / open / half-open): a sans-IO core and an async ``call`` helper.

CLOSED: calls pass and their outcomes go into a rolling window of ``window_s`` split into
``buckets`` buckets (an outcome at ``t`` is forgotten when the bucket after the window starts,
i.e. between ``window_s - window_s/buckets`` and ``window_s`` after it happened). The breaker
OPENs at the failure that brings the window to ``calls >= minimum_calls`` and
``failures / calls >= failure_ratio``. OPEN: calls are refused at once with
:class:`~common.errors.CircuitOpenError` (``service`` = the breaker's name, ``retry_after`` =
seconds left). Exactly ``open_for_s`` after opening it is HALF_OPEN: up to
``half_open_max_calls`` probe calls are admitted; one failed probe re-opens it with a fresh
cooldown; ``success_to_close`` successful probes close it with an empty window.

Every admitted call gets a :class:`CallPermit`. Passing it back with the outcome lets the
breaker ignore outcomes of calls admitted under an earlier state: a slow call that began
before the breaker opened must not count as a probe when it finally succeeds. Times are the
caller's monotonic ``now``; not thread-safe (one breaker per dependency, per Trio run).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar, TypeVarTuple, Unpack

import trio

from common.clock import Clock, TrioClock
from common.errors import CircuitOpenError

__all__ = [
    "BreakerPolicy",
    "BreakerState",
    "BreakerStatistics",
    "CallPermit",
    "CircuitBreaker",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: Slack when mapping a time to its bucket, so that e.g. t=0.3 with 0.1 s buckets lands in
#: bucket 3 (0.3 / 0.1 is 2.9999999999999996 in floats).
_EPSILON = 1e-9

#: Bucket id of a ring slot that holds nothing (older than any window, whatever ``now``).
_NEVER = -(2**62)


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When to open and how to recover. Raises :class:`ValueError` naming a bad field."""

    #: Failures / calls in the window at or above which the breaker opens.
    failure_ratio: float = 0.5
    #: Calls the window must hold before the ratio is judged at all.
    minimum_calls: int = 10
    window_s: float = 10.0
    buckets: int = 10
    #: Cooldown: seconds from opening to half-open.
    open_for_s: float = 5.0
    #: Probes admitted per half-open period (a cancelled probe gives its slot back).
    half_open_max_calls: int = 1
    #: Successful probes that close the breaker (<= half_open_max_calls).
    success_to_close: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.failure_ratio <= 1:
            raise ValueError(f"failure_ratio must be in (0, 1], got {self.failure_ratio!r}")
        for name in ("minimum_calls", "buckets", "half_open_max_calls", "success_to_close"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("window_s", "open_for_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if self.success_to_close > self.half_open_max_calls:
            raise ValueError(
                f"success_to_close ({self.success_to_close}) must be <= "
                f"half_open_max_calls ({self.half_open_max_calls})"
            )


@dataclass(frozen=True, slots=True)
class CallPermit:
    """Issued by :meth:`CircuitBreaker.before_call`; hand it back with the outcome."""

    generation: int
    probe: bool


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of a :class:`CircuitBreaker` (for ``/metrics`` and ``/readyz``)."""

    name: str
    state: BreakerState
    calls_in_window: int
    failures_in_window: int
    times_opened: int
    #: Seconds until an open breaker half-opens (0.0 unless open).
    retry_after_s: float
    #: Probes admitted in the current half-open period and not yet resolved.
    probes_in_flight: int


class CircuitBreaker:
    """One breaker per dependency; see the module docstring for the state machine."""

    __slots__ = (
        "_bucket_ids",
        "_bucket_s",
        "_calls",
        "_failures",
        "_generation",
        "_last_now",
        "_opened_at",
        "_probe_successes",
        "_probes",
        "_state",
        "_times_opened",
        "name",
        "policy",
    )

    def __init__(self, name: str, policy: BreakerPolicy | None = None) -> None:
        self.name = name
        self.policy = BreakerPolicy() if policy is None else policy
        n = self.policy.buckets
        self._bucket_s = self.policy.window_s / n
        # A ring of buckets: slot i holds the counts of absolute bucket _bucket_ids[i].
        self._bucket_ids = [_NEVER] * n
        self._calls = [0] * n
        self._failures = [0] * n
        self._state = BreakerState.CLOSED
        # Bumped on every transition; permits from another generation are stale.
        self._generation = 0
        self._opened_at = -math.inf
        self._probes = 0
        self._probe_successes = 0
        self._times_opened = 0
        self._last_now = -math.inf

    # -- state ----------------------------------------------------------------------------

    def state(self, now: float) -> BreakerState:
        """The state at ``now`` (an open breaker becomes half-open by time alone)."""
        if now > self._last_now:
            self._last_now = now
        if self._state is BreakerState.OPEN and now >= self._opened_at + self.policy.open_for_s:
            self._transition(BreakerState.HALF_OPEN)
        return self._state

    def _transition(self, state: BreakerState) -> None:
        self._state = state
        self._generation += 1
        self._probes = 0
        self._probe_successes = 0

    def _open(self, now: float) -> None:
        self._transition(BreakerState.OPEN)
        self._opened_at = now
        self._times_opened += 1

    def _close(self) -> None:
        self._transition(BreakerState.CLOSED)
        self._bucket_ids = [_NEVER] * self.policy.buckets
        self._calls = [0] * self.policy.buckets
        self._failures = [0] * self.policy.buckets

    def _bucket(self, now: float) -> int:
        return math.floor(now / self._bucket_s + _EPSILON)

    def _record(self, now: float, failed: bool) -> None:
        index = self._bucket(now)
        slot = index % self.policy.buckets
        if self._bucket_ids[slot] != index:
            self._bucket_ids[slot] = index
            self._calls[slot] = 0
            self._failures[slot] = 0
        self._calls[slot] += 1
        self._failures[slot] += failed

    def _totals(self, now: float) -> tuple[int, int]:
        oldest = self._bucket(now) - self.policy.buckets
        calls = failures = 0
        for slot, index in enumerate(self._bucket_ids):
            if index > oldest:
                calls += self._calls[slot]
                failures += self._failures[slot]
        return calls, failures

    def _retry_after(self, now: float) -> float:
        return max(0.0, self._opened_at + self.policy.open_for_s - now)

    # -- the protocol -----------------------------------------------------------------------

    def before_call(self, now: float) -> CallPermit:
        """Admit a call at ``now`` or raise :class:`CircuitOpenError`.

        When open, ``retry_after`` is the time left until half-open. When half-open with every
        probe slot taken, the probes' outcome is not known yet and ``retry_after`` is a short
        hint (one bucket, ``window_s / buckets``).
        """
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return CallPermit(self._generation, probe=False)
        if state is BreakerState.OPEN:
            raise CircuitOpenError(
                f"{self.name}: circuit open", service=self.name, retry_after=self._retry_after(now)
            )
        if self._probes >= self.policy.half_open_max_calls:
            raise CircuitOpenError(
                f"{self.name}: circuit half-open, probes in flight",
                service=self.name,
                retry_after=self._bucket_s,
            )
        self._probes += 1
        return CallPermit(self._generation, probe=True)

    def _current(self, now: float, permit: CallPermit | None) -> BreakerState | None:
        state = self.state(now)
        if permit is not None and permit.generation != self._generation:
            return None  # admitted under an earlier state: its outcome says nothing now
        return state

    def record_success(self, now: float, permit: CallPermit | None = None) -> None:
        """Count a successful call. Without a ``permit`` it counts against the current state."""
        state = self._current(now, permit)
        if state is BreakerState.CLOSED:
            self._record(now, failed=False)
        elif state is BreakerState.HALF_OPEN:
            self._probe_successes += 1
            if self._probe_successes >= self.policy.success_to_close:
                self._close()

    def record_failure(self, now: float, permit: CallPermit | None = None) -> None:
        """Count a failed call; may open the breaker (a failed probe always does)."""
        state = self._current(now, permit)
        if state is BreakerState.CLOSED:
            self._record(now, failed=True)
            calls, failures = self._totals(now)
            policy = self.policy
            if calls >= policy.minimum_calls and failures / calls >= policy.failure_ratio:
                self._open(now)
        elif state is BreakerState.HALF_OPEN:
            self._open(now)

    def release(self, permit: CallPermit) -> None:
        """Forget an admitted call that ended with no outcome (e.g. cancelled).

        A half-open probe's slot is given back, so another caller can probe.
        """
        if permit.probe and permit.generation == self._generation and self._probes > 0:
            self._probes -= 1

    async def call(
        self,
        fn: Callable[[Unpack[Ts]], Awaitable[T]],
        *args: *Ts,
        classify: Callable[[Exception], bool] | None = None,
        clock: Clock | None = None,
    ) -> T:
        """``await fn(*args)`` through the breaker and record its outcome.

        Raises :class:`CircuitOpenError` without calling ``fn`` when refused. Any exception
        from ``fn`` propagates unchanged; ``classify(exc)`` says whether it counts as a
        failure of the dependency (default: every ``Exception`` does; return False for e.g.
        a 404, which proves the dependency answered, and it counts as a success).
        ``trio.Cancelled``, ``KeyboardInterrupt`` and groups containing them are never
        counted and always propagate. ``clock`` defaults to :class:`TrioClock`.
        """
        clock = TrioClock() if clock is None else clock
        try:
            permit = self.before_call(clock.now())
        except CircuitOpenError:
            await trio.lowlevel.checkpoint()  # a refusal is still a Trio checkpoint
            raise
        try:
            result = await fn(*args)
        except Exception as exc:
            try:
                failed = True if classify is None else classify(exc)
            except BaseException:
                self.release(permit)  # a broken classifier must not leak a probe slot
                raise
            if failed:
                self.record_failure(clock.now(), permit)
            else:
                self.record_success(clock.now(), permit)
            raise
        except BaseException:
            # Cancellation says nothing about the dependency's health.
            self.release(permit)
            raise
        self.record_success(clock.now(), permit)
        return result

    def statistics(self, now: float | None = None) -> BreakerStatistics:
        """A snapshot at ``now`` (default: the latest time the breaker was given)."""
        at = self._last_now if now is None else now
        if at == -math.inf:
            at = 0.0
        state = self.state(at)
        calls, failures = self._totals(at)
        return BreakerStatistics(
            name=self.name,
            state=state,
            calls_in_window=calls,
            failures_in_window=failures,
            times_opened=self._times_opened,
            retry_after_s=self._retry_after(at) if state is BreakerState.OPEN else 0.0,
            probes_in_flight=self._probes if state is BreakerState.HALF_OPEN else 0,
        )
