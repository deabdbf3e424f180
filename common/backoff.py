"""Jittered exponential backoff with a retry budget, on the caller's clock.

:func:`retry` repeats an idempotent operation while ``retry_on(exc)`` says the failure is
transient, sleeping per :class:`BackoffPolicy` between attempts. It never retries past the
caller's deadline (it gives up at once if the next sleep would end after
``trio.current_effective_deadline()``), never touches ``trio.Cancelled``, and asks a shared
:class:`RetryBudget` first so that retries add at most ``ratio`` extra load to a struggling
dependency (each first attempt deposits ``ratio`` tokens, each retry spends one).
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import trio

from common.clock import Clock, TrioClock

__all__ = ["BackoffPolicy", "RetryBudget", "delays", "retry"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    initial_s: float = 0.05
    multiplier: float = 2.0
    max_s: float = 2.0
    #: "full": uniform in [0, d]; "equal": d/2 + uniform in [0, d/2]; "none": d.
    jitter: Literal["full", "equal", "none"] = "full"
    #: Attempts in all, the first included.
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if not self.initial_s > 0:
            raise ValueError(f"initial_s must be > 0, got {self.initial_s}")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if self.max_s < self.initial_s:
            raise ValueError(f"max_s must be >= initial_s, got {self.max_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")


def delays(policy: BackoffPolicy, rng: random.Random | None = None) -> Iterator[float]:
    """The sleeps between attempts (``max_attempts - 1`` of them)."""
    # Jitter only; nothing secret depends on these numbers.
    rng = rng or random.Random()  # noqa: S311  # nosec B311
    base = policy.initial_s
    for _ in range(policy.max_attempts - 1):
        capped = min(base, policy.max_s)
        if policy.jitter == "full":
            yield rng.uniform(0, capped)
        elif policy.jitter == "equal":
            yield capped / 2 + rng.uniform(0, capped / 2)
        else:
            yield capped
        base *= policy.multiplier


class RetryBudget:
    """Caps retries at ``ratio`` x first attempts, plus ``min_per_s`` always allowed.

    Tokens are capped at ``ratio x window_s x 10`` so an idle period cannot bank a storm.
    """

    def __init__(self, *, ratio: float = 0.2, min_per_s: float = 1.0, window_s: float = 10.0):
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self._cap = max(1.0, ratio * window_s * 10 + min_per_s * window_s)
        self._tokens = min_per_s * window_s
        self._last = -math.inf

    def _refill(self, now: float) -> None:
        if self._last != -math.inf:
            self._tokens = min(self._cap, self._tokens + (now - self._last) * self.min_per_s)
        self._last = now

    def deposit(self, now: float) -> None:
        """Record a first attempt."""
        self._refill(now)
        self._tokens = min(self._cap, self._tokens + self.ratio)

    def try_withdraw(self, now: float) -> bool:
        """Take one retry if the budget allows."""
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    retry_on: Callable[[BaseException], bool],
    policy: BackoffPolicy | None = None,
    budget: RetryBudget | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn`` and retry transient failures (see the module docstring).

    Re-raises the last error when attempts, the budget or the deadline run out.
    """
    policy = policy or BackoffPolicy()
    clock = clock or TrioClock()
    if budget is not None:
        budget.deposit(clock.now())
    pauses = delays(policy, rng)
    while True:
        try:
            return await fn()
        except trio.Cancelled:
            raise
        except Exception as exc:
            if not retry_on(exc):
                raise
            pause = next(pauses, None)
            if pause is None:
                raise
            wake = clock.now() + pause
            if wake >= trio.current_effective_deadline():
                raise
            if budget is not None and not budget.try_withdraw(clock.now()):
                raise
            await clock.sleep_until(wake)
