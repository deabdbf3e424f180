"""GCRA rate limiting (the generic cell rate algorithm), sans-IO.

A policy admits ``limit`` requests per ``period_s`` with bursts of up to ``burst``. Each key
keeps one float: its *theoretical arrival time* (TAT). A request of cost ``n`` is admitted
when ``max(TAT, now) + n*T - burst*T <= now`` (``T = period_s / limit``), which moves TAT on
by ``n*T``. Decisions are pure arithmetic on absolute times, so waiting for admission is a
single ``sleep_until`` (no spinning on tiny sleeps that would livelock a mock clock).

Memory: a key whose TAT is in the past carries no information (its bucket is full), so such
keys are dropped first when ``max_keys`` is reached; if every key is active, the oldest tenth
is dropped (those clients get a fresh bucket - the documented cost of the bound). State is per
process: with N gateway instances behind a balancer the effective limit is up to N x limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.clock import Clock, TrioClock

__all__ = ["Decision", "GcraLimiter", "LimiterStatistics", "RatePolicy", "acquire"]

#: Float slack in admission comparisons (1 ns), so exact schedules are not refused by rounding.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True)
class RatePolicy:
    """``limit`` requests per ``period_s`` seconds, bursts up to ``burst`` (default: limit)."""

    name: str
    limit: int
    period_s: float
    burst: int = 0

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in '";\\'):
            raise ValueError(f"name must be a plain token, got {self.name!r}")
        if self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")
        if not (self.period_s > 0 and math.isfinite(self.period_s)):
            raise ValueError(f"period_s must be a positive number, got {self.period_s}")
        if self.burst == 0:
            object.__setattr__(self, "burst", self.limit)
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst}")

    @property
    def interval_s(self) -> float:
        """Seconds between requests at the sustained rate."""
        return self.period_s / self.limit


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    #: Requests that would be admitted right now after this one.
    remaining: int
    #: Seconds until the bucket is full again.
    reset_after_s: float
    #: Seconds until this request would be admitted (0 when allowed).
    retry_after_s: float

    def headers(self, policy: RatePolicy) -> dict[str, str]:
        """IETF ``RateLimit-Policy`` / ``RateLimit`` plus the legacy ``RateLimit-*`` trio, and
        ``Retry-After`` when denied (whole seconds, rounded up)."""
        reset = math.ceil(self.reset_after_s - _EPSILON)
        headers = {
            "RateLimit-Policy": f'"{policy.name}";q={policy.limit};w={_seconds(policy.period_s)}',
            "RateLimit": f'"{policy.name}";r={self.remaining};t={reset}',
            "RateLimit-Limit": str(policy.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(reset),
        }
        if not self.allowed:
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after_s - _EPSILON)))
        return headers


def _seconds(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


@dataclass(frozen=True, slots=True)
class LimiterStatistics:
    keys: int
    allowed: int
    denied: int


class GcraLimiter:
    """A keyed GCRA limiter for one :class:`RatePolicy`. Not thread-safe (use from one run)."""

    __slots__ = ("_allowed", "_burst_s", "_denied", "_interval", "_max_keys", "_tat", "policy")

    def __init__(self, policy: RatePolicy, *, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, got {max_keys}")
        self.policy = policy
        self._interval = policy.interval_s
        self._burst_s = policy.burst * self._interval
        self._max_keys = max_keys
        self._tat: dict[str, float] = {}
        self._allowed = 0
        self._denied = 0

    def _decide(self, key: str, now: float, cost: int, consume: bool) -> Decision:
        if cost < 1:
            raise ValueError(f"cost must be >= 1, got {cost}")
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + cost * self._interval
        allow_at = new_tat - self._burst_s
        if allow_at - now <= _EPSILON:
            if consume:
                if key not in self._tat and len(self._tat) >= self._max_keys:
                    self._evict(now)
                self._tat[key] = new_tat
                self._allowed += 1
            remaining = int((self._burst_s - (new_tat - now)) / self._interval + _EPSILON)
            return Decision(True, self.policy.limit, max(0, remaining), new_tat - now, 0.0)
        if consume:
            self._denied += 1
        return Decision(False, self.policy.limit, 0, tat - now, allow_at - now)

    def check(self, key: str, now: float, cost: int = 1) -> Decision:
        """Decide for ``key`` at ``now``; an admitted request is counted against the key."""
        return self._decide(key, now, cost, consume=True)

    def peek(self, key: str, now: float, cost: int = 1) -> Decision:
        """What :meth:`check` would answer, without counting anything."""
        return self._decide(key, now, cost, consume=False)

    def _evict(self, now: float) -> None:
        self._tat = {k: t for k, t in self._tat.items() if t > now}
        if len(self._tat) >= self._max_keys:
            drop = max(1, self._max_keys // 10)
            for key in list(self._tat)[:drop]:
                del self._tat[key]

    def statistics(self) -> LimiterStatistics:
        return LimiterStatistics(keys=len(self._tat), allowed=self._allowed, denied=self._denied)


async def acquire(
    limiter: GcraLimiter, key: str, *, clock: Clock | None = None, cost: int = 1
) -> Decision:
    """Wait until ``key`` may make a request, then count it. Cancellable while waiting."""
    clock = clock or TrioClock()
    while True:
        now = clock.now()
        decision = limiter.check(key, now, cost)
        if decision.allowed:
            return decision
        await clock.sleep_until(now + decision.retry_after_s)
