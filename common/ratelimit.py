"""GCRA rate limiting (the generic cell rate algorithm): a sans-IO core and one async helper.

A :class:`RatePolicy` admits ``limit`` requests per ``period_s`` with bursts of up to ``burst``.
Each key keeps a single float, its *theoretical arrival time* (TAT): the instant at which its
bucket would be full again. With the emission interval ``T = period_s / limit`` and the burst
tolerance ``tau = burst * T``, a request of cost ``n`` arriving at ``now`` is admitted when::

    max(TAT, now) + n*T - now <= tau

and admitting it sets ``TAT = max(TAT, now) + n*T``. So in any interval of length ``w`` at most
``burst + w / T`` cost units are admitted, and under saturation admissions are exactly ``T``
apart. Every answer is an absolute-time computation, so waiting for admission is one
``sleep_until`` (never a spin on tiny sleeps, which livelocks ``MockClock``).

Memory bound: at most ``max_keys`` keys are tracked (one dict entry each, roughly 100-150
bytes plus the key object). A key whose TAT is in the past carries no information (its bucket
is full) and is forgotten first. When the table is full and a new key arrives, one sweep drops
every such key; if that frees fewer than a tenth of the table, the keys with the earliest TAT
(closest to full, so the least information lost) go too. A sweep therefore frees at least
``max_keys // 10`` slots, and its O(n log n) cost is amortised over at least that many new
keys. An evicted key that was still active simply gets a full bucket again: under a flood of
distinct keys the limiter errs towards admitting, never towards refusing a key it forgot.

State is per process: with N gateway instances behind a balancer the effective limit is up to
N x ``limit``. Not thread-safe; use each limiter from one Trio run.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import trio

from common.clock import Clock, TrioClock

__all__ = ["Decision", "GcraLimiter", "LimiterStatistics", "RatePolicy", "acquire"]

#: Slack in admission comparisons (1 ns): TATs are sums of float intervals, and an exactly
#: on-schedule request must not be refused because 0.1 + 0.2 != 0.3.
_EPSILON = 1e-9

#: Characters that would break the quoted sf-string of the ``RateLimit`` headers.
_NAME_FORBIDDEN = frozenset('"\\;,= \t')


@dataclass(frozen=True, slots=True)
class RatePolicy:
    """``limit`` requests per ``period_s`` seconds, in bursts of up to ``burst``.

    ``burst`` defaults to ``limit`` (after construction it is always an ``int``; read
    :attr:`capacity` for a statically typed value). ``name`` appears in the ``RateLimit``
    headers, so it must be a plain token. Raises :class:`ValueError` naming the bad field.
    """

    name: str
    limit: int
    period_s: float
    burst: int | None = None

    def __post_init__(self) -> None:
        if not self.name or any(c in _NAME_FORBIDDEN for c in self.name):
            raise ValueError(f"name must be a non-empty plain token, got {self.name!r}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"limit must be an integer >= 1, got {self.limit!r}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"period_s must be a positive finite number, got {self.period_s!r}")
        if self.burst is None:
            # Frozen dataclass: resolving the default is the one write we allow ourselves.
            object.__setattr__(self, "burst", self.limit)
        elif isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {self.burst!r}")

    @property
    def capacity(self) -> int:
        """The burst size (``burst``, or ``limit`` when it was not given)."""
        return self.limit if self.burst is None else self.burst

    @property
    def interval_s(self) -> float:
        """Seconds between admissions at the sustained rate (the GCRA emission interval)."""
        return self.period_s / self.limit


@dataclass(frozen=True, slots=True)
class Decision:
    """One limiter answer; everything an HTTP ``429`` or ``RateLimit`` header needs."""

    allowed: bool
    limit: int
    #: Requests (of cost 1) that would still be admitted right now, after this one.
    remaining: int
    #: Seconds until the key's bucket is full again.
    reset_after_s: float
    #: Seconds until this request would be admitted; 0.0 when it was.
    retry_after_s: float

    def headers(self, policy: RatePolicy) -> dict[str, str]:
        """Response headers for this decision under ``policy``.

        The IETF draft pair ``RateLimit-Policy: "name";q=limit;w=period`` and
        ``RateLimit: "name";r=remaining;t=reset``, the legacy ``RateLimit-Limit`` /
        ``RateLimit-Remaining`` / ``RateLimit-Reset``, and ``Retry-After`` when denied. Times
        are whole seconds rounded up (``Retry-After`` is at least 1), so a client that waits
        as told is never refused for having come back a fraction too early. A fractional
        ``period_s`` is rounded up too: the draft's ``w`` is an integer.
        """
        reset = _ceil_seconds(self.reset_after_s)
        window = _ceil_seconds(policy.period_s)
        headers = {
            "RateLimit-Policy": f'"{policy.name}";q={policy.limit};w={window}',
            "RateLimit": f'"{policy.name}";r={self.remaining};t={reset}',
            "RateLimit-Limit": str(policy.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(reset),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, _ceil_seconds(self.retry_after_s)))
        return headers


def _ceil_seconds(value: float) -> int:
    # The epsilon keeps float noise (12.000000000001) from costing a client a whole second.
    return max(0, math.ceil(value - _EPSILON))


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    """A snapshot of a :class:`GcraLimiter` (for ``/metrics``)."""

    #: Keys currently tracked (at most ``max_keys``).
    keys: int
    #: :meth:`GcraLimiter.check` calls that admitted / refused (``peek`` is not counted).
    allowed: int
    denied: int
    #: Keys forgotten to respect ``max_keys`` while they were still active.
    evicted_active: int


class GcraLimiter:
    """A keyed GCRA limiter for one :class:`RatePolicy` (see the module docstring).

    Keys are any hashable (a user id, a client address, a ``(user, route)`` tuple). ``now``
    is monotonic seconds from the caller's clock and must not go backwards for a key.
    """

    __slots__ = (
        "_allowed",
        "_denied",
        "_evicted",
        "_interval",
        "_limit",
        "_max_keys",
        "_sweep_target",
        "_tat",
        "_tau",
        "policy",
    )

    def __init__(self, policy: RatePolicy, *, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys!r}")
        self.policy = policy
        self._limit = policy.limit
        self._interval = policy.interval_s
        self._tau = policy.capacity * self._interval
        self._max_keys = max_keys
        self._sweep_target = max(1, max_keys // 10)
        self._tat: dict[Hashable, float] = {}
        self._allowed = 0
        self._denied = 0
        self._evicted = 0

    def check(self, key: Hashable, now: float, cost: int = 1) -> Decision:
        """Decide for ``key`` at ``now``; an admitted request is counted against the key.

        Raises :class:`ValueError` if ``cost`` is below 1 or above the burst (such a request
        could never be admitted).
        """
        return self._decide(key, now, cost, True)

    def refund(self, key: Hashable, now: float, cost: int = 1) -> None:
        """Give back ``cost`` that an admitted :meth:`check` of ``key`` counted (e.g. a login
        attempt that turned out to succeed, when only failures should count). A key with
        nothing outstanding is left alone."""
        tat = self._tat.get(key)
        if tat is None:
            return
        tat -= cost * self._interval
        if tat <= now:
            del self._tat[key]
        else:
            self._tat[key] = tat

    def peek(self, key: Hashable, now: float, cost: int = 1) -> Decision:
        """Exactly what :meth:`check` would answer at ``now``, without counting anything."""
        return self._decide(key, now, cost, False)

    def _decide(self, key: Hashable, now: float, cost: int, consume: bool) -> Decision:
        if cost != 1 and not 1 <= cost <= self.policy.capacity:
            raise ValueError(f"cost must be in 1..{self.policy.capacity}, got {cost!r}")
        interval = self._interval
        tat = self._tat.get(key, now)
        if tat < now:
            tat = now
        new_tat = tat + cost * interval
        wait = new_tat - self._tau - now
        if wait <= _EPSILON:
            if consume:
                if key not in self._tat and len(self._tat) >= self._max_keys:
                    self._sweep(now)
                self._tat[key] = new_tat
                self._allowed += 1
            ahead = new_tat - now
            remaining = int((self._tau - ahead) / interval + _EPSILON)
            return Decision(True, self._limit, remaining if remaining > 0 else 0, ahead, 0.0)
        if consume:
            self._denied += 1
        ahead = tat - now
        remaining = int((self._tau - ahead) / interval + _EPSILON)
        return Decision(False, self._limit, remaining if remaining > 0 else 0, ahead, wait)

    def _sweep(self, now: float) -> None:
        # Only called when a new key meets a full table; frees >= _sweep_target slots so
        # the next _sweep_target new keys insert in O(1) (see the module docstring).
        live = {k: t for k, t in self._tat.items() if t > now}
        shortfall = self._sweep_target - (len(self._tat) - len(live))
        if shortfall > 0:
            for k in sorted(live, key=live.__getitem__)[:shortfall]:
                del live[k]
            self._evicted += shortfall
        self._tat = live

    def statistics(self) -> LimiterStatistics:
        """Counters since construction and the current number of tracked keys."""
        return LimiterStatistics(
            keys=len(self._tat),
            allowed=self._allowed,
            denied=self._denied,
            evicted_active=self._evicted,
        )


async def acquire(
    limiter: GcraLimiter, key: Hashable, *, clock: Clock | None = None, cost: int = 1
) -> Decision:
    """Wait until ``key`` may make a request of ``cost``, then count it; return the decision.

    Sleeps with one ``clock.sleep_until`` on the absolute admission time per attempt (another
    task may take the slot first, in which case it waits again). Always a Trio checkpoint.
    Cancellation while waiting consumes nothing. ``clock`` defaults to :class:`TrioClock`.
    Raises :class:`ValueError` for a ``cost`` the policy can never admit.
    """
    clock = TrioClock() if clock is None else clock
    await trio.lowlevel.checkpoint_if_cancelled()
    waited = False
    while True:
        now = clock.now()
        # peek, not check: time spent queueing is not a refusal in the statistics.
        decision = limiter.peek(key, now, cost)
        if decision.allowed:
            decision = limiter.check(key, now, cost)
            if not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()
            return decision
        await clock.sleep_until(now + decision.retry_after_s)
        waited = True
