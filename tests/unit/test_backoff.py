from __future__ import annotations

import random

import pytest
import trio

from common.backoff import BackoffPolicy, RetryBudget, delays, retry
from common.errors import NotFoundError, UnavailableError


def test_delays_without_jitter_grow_and_cap() -> None:
    policy = BackoffPolicy(initial_s=0.1, multiplier=2, max_s=0.5, jitter="none", max_attempts=6)
    assert list(delays(policy)) == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_full_and_equal_jitter_are_deterministic_with_a_seed_and_bounded() -> None:
    full = BackoffPolicy(initial_s=0.1, max_s=1, jitter="full", max_attempts=5)
    equal = BackoffPolicy(initial_s=0.1, max_s=1, jitter="equal", max_attempts=5)
    a = list(delays(full, random.Random(7)))
    assert a == list(delays(full, random.Random(7)))
    caps = [0.1, 0.2, 0.4, 0.8]
    assert all(0 <= d <= c for d, c in zip(a, caps, strict=True))
    b = list(delays(equal, random.Random(7)))
    assert all(c / 2 <= d <= c for d, c in zip(b, caps, strict=True))


async def test_retry_sleeps_exactly_and_succeeds_on_the_third_attempt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = BackoffPolicy(initial_s=0.1, multiplier=2, max_s=1, jitter="none", max_attempts=3)
    attempts: list[float] = []
    start = trio.current_time()

    async def flaky() -> str:
        attempts.append(trio.current_time() - start)
        if len(attempts) < 3:
            raise UnavailableError("down", service="s")
        return "ok"

    result = await retry(flaky, retry_on=lambda e: isinstance(e, UnavailableError), policy=policy)
    assert result == "ok"
    assert attempts == pytest.approx([0.0, 0.1, 0.3])


async def test_retry_gives_up_after_max_attempts_with_the_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise UnavailableError(f"down {calls}", service="s")

    with pytest.raises(UnavailableError, match="down 3"):
        await retry(down, retry_on=lambda e: True, policy=BackoffPolicy(max_attempts=3))
    assert calls == 3


async def test_non_transient_errors_are_not_retried() -> None:
    calls = 0

    async def missing() -> None:
        nonlocal calls
        calls += 1
        raise NotFoundError("gone")

    with pytest.raises(NotFoundError):
        await retry(missing, retry_on=lambda e: isinstance(e, UnavailableError))
    assert calls == 1


async def test_retry_stops_rather_than_sleep_past_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = BackoffPolicy(initial_s=1.0, max_s=1.0, jitter="none", max_attempts=5)
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise UnavailableError("down", service="s")

    start = trio.current_time()
    with trio.move_on_after(2.5), pytest.raises(UnavailableError):
        await retry(down, retry_on=lambda e: True, policy=policy)
    # Attempts at 0, 1, 2; the next would wake at 3 > deadline 2.5: give up at t=2 at once.
    assert calls == 3
    assert trio.current_time() - start == pytest.approx(2.0)


async def test_budget_caps_retries_under_sustained_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10)
    policy = BackoffPolicy(initial_s=0.01, jitter="none", max_attempts=3)
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise UnavailableError("down", service="s")

    for _ in range(100):
        with pytest.raises(UnavailableError):
            await retry(down, retry_on=lambda e: True, policy=policy, budget=budget)
    retries = attempts - 100
    assert retries <= 0.2 * 100 + 1, retries


async def test_cancellation_is_never_retried(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()

    with trio.move_on_after(1):
        await retry(hang, retry_on=lambda e: True)
    assert calls == 1


def test_invalid_policy_names_the_field() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        BackoffPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="multiplier"):
        BackoffPolicy(multiplier=0.5)
