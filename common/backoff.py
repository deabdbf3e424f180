"""Jittered exponential backoff and a retry budget (sans-IO), plus the async :func:`retry`.

:func:`retry` repeats an idempotent operation while ``retry_on(exc)`` says the failure is
transient, sleeping per :class:`BackoffPolicy` between attempts (one ``clock.sleep_until`` on
an absolute time per pause). It never retries or swallows ``trio.Cancelled``, never sleeps
into the caller's deadline (if the next pause would end at or after
``trio.current_effective_deadline()`` it re-raises at once, so the caller gets the real error
instead of a cancellation), and asks a shared :class:`RetryBudget` before each retry so that
retries add at most ``ratio`` extra load to a dependency that is already struggling.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TypeVar

import trio

from common.clock import Clock, TrioClock

__all__ = ["BackoffPolicy", "RetryBudget", "RetryBudgetStatistics", "delays", "retry"]

T = TypeVar("T")

Jitter = Literal["full", "equal", "none"]
_JITTERS = ("full", "equal", "none")

#: Bucket id of a ring slot that holds nothing (older than any window, whatever ``now``).
_NEVER = -(2**62)


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Exponential pauses ``initial_s * multiplier**k`` capped at ``max_s``, then jittered.

    ``jitter``: ``"full"`` draws uniformly from ``[0, d)``, ``"equal"`` from ``[d/2, d)``,
    ``"none"`` uses ``d``. Full jitter spreads a herd of clients best; equal jitter keeps a
    minimum pause. ``max_attempts`` counts every attempt, the first included. Raises
    :class:`ValueError` naming a bad field.
    """

    initial_s: float = 0.05
    multiplier: float = 2.0
    max_s: float = 2.0
    jitter: Jitter = "full"
    max_attempts: int = 3

    def __post_init__(self) -> None:
        if not (self.initial_s > 0 and math.isfinite(self.initial_s)):
            raise ValueError(f"initial_s must be a positive finite number, got {self.initial_s!r}")
        if not (self.multiplier >= 1 and math.isfinite(self.multiplier)):
            raise ValueError(f"multiplier must be a finite number >= 1, got {self.multiplier!r}")
        if not (self.max_s >= self.initial_s and math.isfinite(self.max_s)):
            raise ValueError(f"max_s must be finite and >= initial_s, got {self.max_s!r}")
        if self.jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of {_JITTERS}, got {self.jitter!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise ValueError(f"max_attempts must be an integer, got {self.max_attempts!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts!r}")


def delays(policy: BackoffPolicy, rng: random.Random | None = None) -> Iterator[float]:
    """The ``max_attempts - 1`` pauses between attempts, in seconds.

    Pass a seeded ``rng`` for a reproducible sequence; by default a fresh unseeded one.
    """
    if rng is None:
        # Jitter only needs to decorrelate clients; nothing secret or security-relevant
        # depends on these numbers, so a non-cryptographic PRNG is right here.
        rng = random.Random()  # noqa: S311  # nosec B311
    base = policy.initial_s
    for _ in range(policy.max_attempts - 1):
        if policy.jitter == "full":
            yield base * rng.random()
        elif policy.jitter == "equal":
            yield base / 2 * (1 + rng.random())
        else:
            yield base
        # min() each step: the product never overflows however many attempts there are.
        base = min(base * policy.multiplier, policy.max_s)


@dataclass(frozen=True, slots=True)
class RetryBudgetStatistics:
    """A snapshot of a :class:`RetryBudget` over its current window."""

    first_attempts_in_window: int
    retries_in_window: int
    #: Retries that could still be made now.
    balance: float
    #: Retries refused since construction.
    refused: int


class RetryBudget:
    """Caps retries at ``ratio`` x first attempts over a rolling ``window_s``, plus a floor.

    Each first attempt deposits ``ratio`` tokens, each retry withdraws one, and
    ``min_retries_per_s * window_s`` tokens are always available, so a quiet client can still
    retry at all. Deposits and withdrawals older than the window are forgotten (a rolling
    window of ``buckets`` buckets), so an idle period cannot bank a retry storm. Over any
    window: ``retries <= min_retries_per_s * window_s + ratio * first_attempts``. Share one
    budget per dependency; times are the caller's monotonic ``now``.
    """

    __slots__ = (
        "_bucket_ids",
        "_bucket_s",
        "_buckets",
        "_deposits",
        "_floor",
        "_last_now",
        "_refused",
        "_withdrawals",
        "min_retries_per_s",
        "ratio",
        "window_s",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        min_retries_per_s: float = 1.0,
        window_s: float = 10.0,
        buckets: int = 10,
    ) -> None:
        if not 0 <= ratio <= 1:
            raise ValueError(f"ratio must be in [0, 1], got {ratio!r}")
        if not (min_retries_per_s >= 0 and math.isfinite(min_retries_per_s)):
            raise ValueError(f"min_retries_per_s must be >= 0, got {min_retries_per_s!r}")
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be a positive finite number, got {window_s!r}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets!r}")
        self.ratio = ratio
        self.min_retries_per_s = min_retries_per_s
        self.window_s = window_s
        self._floor = min_retries_per_s * window_s
        self._buckets = buckets
        self._bucket_s = window_s / buckets
        self._bucket_ids = [_NEVER] * buckets
        self._deposits = [0] * buckets
        self._withdrawals = [0] * buckets
        self._refused = 0
        self._last_now = 0.0

    def _slot(self, now: float) -> int:
        self._last_now = max(self._last_now, now)
        index = math.floor(now / self._bucket_s + 1e-9)  # 1e-9: 0.3/0.1 is 2.999...
        slot = index % self._buckets
        if self._bucket_ids[slot] != index:
            self._bucket_ids[slot] = index
            self._deposits[slot] = 0
            self._withdrawals[slot] = 0
        return slot

    def _totals(self, now: float) -> tuple[int, int]:
        oldest = math.floor(now / self._bucket_s + 1e-9) - self._buckets
        deposits = withdrawals = 0
        for slot, index in enumerate(self._bucket_ids):
            if index > oldest:
                deposits += self._deposits[slot]
                withdrawals += self._withdrawals[slot]
        return deposits, withdrawals

    def _balance(self, now: float) -> float:
        deposits, withdrawals = self._totals(now)
        return self._floor + self.ratio * deposits - withdrawals

    def deposit(self, now: float) -> None:
        """Record a first attempt at ``now``."""
        self._deposits[self._slot(now)] += 1

    def try_withdraw(self, now: float) -> bool:
        """Take one retry at ``now`` if the budget allows; False (and nothing taken) if not."""
        slot = self._slot(now)
        # 1e-9: ten deposits of 0.1 must buy a whole retry despite float rounding.
        if self._balance(now) < 1 - 1e-9:
            self._refused += 1
            return False
        self._withdrawals[slot] += 1
        return True

    def statistics(self, now: float | None = None) -> RetryBudgetStatistics:
        """A snapshot at ``now`` (default: the latest time the budget was given)."""
        at = self._last_now if now is None else now
        deposits, withdrawals = self._totals(at)
        return RetryBudgetStatistics(
            first_attempts_in_window=deposits,
            retries_in_window=withdrawals,
            balance=max(0.0, self._floor + self.ratio * deposits - withdrawals),
            refused=self._refused,
        )


_DEFAULT_POLICY = BackoffPolicy()


async def retry(
    fn: Callable[[], Awaitable[T]],
    *,
    retry_on: Callable[[Exception], bool],
    policy: BackoffPolicy | None = None,
    budget: RetryBudget | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> T:
    """``await fn()``, retrying transient failures; return its first result.

    ``fn`` must be safe to repeat. An exception is retried only if ``retry_on(exc)`` is true,
    attempts remain (``policy.max_attempts``, default :class:`BackoffPolicy()`), the pause
    would end before ``trio.current_effective_deadline()`` (Trio's clock, as deadlines are)
    and ``budget`` (if any) grants a retry; otherwise that exception is re-raised unchanged.
    ``trio.Cancelled`` and other ``BaseException`` s are never caught. ``clock`` (default
    :class:`TrioClock`) times the pauses; ``rng`` seeds the jitter.
    """
    policy = _DEFAULT_POLICY if policy is None else policy
    clock = TrioClock() if clock is None else clock
    if budget is not None:
        budget.deposit(clock.now())
    pauses = delays(policy, rng)
    while True:
        try:
            return await fn()
        except Exception as exc:
            if not retry_on(exc):
                raise
            pause = next(pauses, None)
            if pause is None:
                raise
            if trio.current_time() + pause >= trio.current_effective_deadline():
                raise  # sleeping would only end in a cancellation: report the real error
            if budget is not None and not budget.try_withdraw(clock.now()):
                raise
            wake = clock.now() + pause
        # Sleep outside the handler so the next attempt's errors do not chain onto this one.
        await clock.sleep_until(wake)
