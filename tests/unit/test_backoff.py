from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from common.backoff import BackoffPolicy, RetryBudget, delays, retry
from common.errors import NotFoundError, UnavailableError

CAPS = [0.1, 0.2, 0.4, 0.5, 0.5]


def policy(jitter: str, **kwargs: object) -> BackoffPolicy:
    fields: dict[str, object] = {
        "initial_s": 0.1,
        "multiplier": 2,
        "max_s": 0.5,
        "jitter": jitter,
        "max_attempts": 6,
    }
    fields.update(kwargs)
    return BackoffPolicy(**fields)  # type: ignore[arg-type]


def test_delays_without_jitter_grow_and_cap_at_max_s() -> None:
    assert list(delays(policy("none"))) == pytest.approx(CAPS, abs=1e-12)


def test_full_jitter_draws_from_zero_to_the_capped_delay() -> None:
    draws = random.Random(7)
    expected = [cap * draws.random() for cap in CAPS]
    got = list(delays(policy("full"), random.Random(7)))
    assert got == pytest.approx(expected, abs=1e-12), got
    assert all(0 <= d < cap for d, cap in zip(got, CAPS, strict=True))


def test_equal_jitter_keeps_at_least_half_the_capped_delay() -> None:
    draws = random.Random(7)
    expected = [cap / 2 + cap / 2 * draws.random() for cap in CAPS]
    got = list(delays(policy("equal"), random.Random(7)))
    assert got == pytest.approx(expected, abs=1e-12), got
    assert all(cap / 2 <= d < cap for d, cap in zip(got, CAPS, strict=True))


def test_many_attempts_never_overflow_and_stay_capped() -> None:
    pauses = list(delays(policy("none", multiplier=10, max_attempts=2000)))
    assert len(pauses) == 1999 and max(pauses) == 0.5


def test_unseeded_jitter_still_stays_in_bounds() -> None:
    got = list(delays(policy("full")))
    assert len(got) == 5 and all(0 <= d < cap for d, cap in zip(got, CAPS, strict=True))


async def test_retry_attempts_at_exact_times_and_succeeds_on_the_third(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []
    start = trio.current_time()

    async def flaky() -> str:
        attempts.append(trio.current_time() - start)
        if len(attempts) < 3:
            raise UnavailableError("down", service="s")
        return "ok"

    result = await retry(
        flaky, retry_on=lambda e: isinstance(e, UnavailableError), policy=policy("none")
    )
    assert result == "ok"
    assert attempts == pytest.approx([0.0, 0.1, 0.3], abs=1e-9), attempts


async def test_retry_gives_up_after_max_attempts_with_the_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []
    start = trio.current_time()

    async def down() -> None:
        attempts.append(trio.current_time() - start)
        raise UnavailableError(f"down {len(attempts)}", service="s")

    with pytest.raises(UnavailableError, match="down 6"):
        await retry(down, retry_on=lambda e: True, policy=policy("none"))
    # Pauses 0.1, 0.2, 0.4, 0.5, 0.5: the sixth and final attempt at 1.7 s, then no sleep.
    assert attempts == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.2, 1.7], abs=1e-9), attempts
    assert trio.current_time() - start == pytest.approx(1.7, abs=1e-9)


async def test_seeded_full_jitter_sets_the_exact_attempt_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    attempts: list[float] = []
    start = trio.current_time()

    async def down() -> None:
        attempts.append(trio.current_time() - start)
        raise UnavailableError("down", service="s")

    with pytest.raises(UnavailableError):
        await retry(down, retry_on=lambda e: True, policy=policy("full"), rng=random.Random(3))
    pauses = list(delays(policy("full"), random.Random(3)))
    expected = [sum(pauses[:i]) for i in range(6)]
    assert attempts == pytest.approx(expected, abs=1e-9)


async def test_non_transient_errors_are_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def missing() -> None:
        nonlocal calls
        calls += 1
        raise NotFoundError("gone")

    start = trio.current_time()
    with pytest.raises(NotFoundError):
        await retry(missing, retry_on=lambda e: isinstance(e, UnavailableError))
    assert (calls, trio.current_time()) == (1, start), "a non-transient error was retried"


async def test_retry_gives_up_at_once_rather_than_sleep_past_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0

    async def down() -> None:
        nonlocal calls
        calls += 1
        raise UnavailableError("down", service="s")

    start = trio.current_time()
    steady = policy("none", initial_s=1.0, max_s=1.0, max_attempts=5)
    with trio.move_on_after(2.5) as scope, pytest.raises(UnavailableError):
        await retry(down, retry_on=lambda e: True, policy=steady)
    # Attempts at 0, 1, 2; the next pause would end at 3 > the 2.5 deadline: raise at t=2.
    assert calls == 3, calls
    assert trio.current_time() - start == pytest.approx(2.0, abs=1e-9)
    assert not scope.cancelled_caught, "slept into the cancellation instead of giving up"


def test_budget_allows_ratio_of_first_attempts_plus_the_floor() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0.5, window_s=10)  # floor: 5 retries
    for _ in range(50):
        budget.deposit(0.0)  # 50 first attempts: 10 more retries
    granted = sum(budget.try_withdraw(0.0) for _ in range(30))
    assert granted == 15, f"expected 5 (floor) + 0.2 x 50 = 15 retries, got {granted}"
    stats = budget.statistics(0.0)
    assert (stats.retries_in_window, stats.refused, stats.balance) == (15, 15, 0.0), stats


def test_budget_forgets_deposits_and_retries_after_the_window() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0.0, window_s=10)
    for _ in range(10):
        budget.deposit(0.5)
    assert budget.try_withdraw(0.5) and budget.try_withdraw(9.9)
    assert not budget.try_withdraw(9.9), "more retries than 20% of first attempts"
    assert not budget.try_withdraw(10.0), "deposits from [0, 1) expire at 10.0"
    assert budget.statistics(10.0).first_attempts_in_window == 0
    for _ in range(10):
        budget.deposit(12.0)
    # 10 x 0.2 = 2 tokens, minus the retry at 9.9 still in the window (the one at 0.5 is not).
    stats = budget.statistics(12.0)
    assert (stats.first_attempts_in_window, stats.retries_in_window) == (10, 1), stats
    assert budget.try_withdraw(12.0), "the expired retry at 0.5 is still being charged"
    assert not budget.try_withdraw(12.0), "the retry at 9.9 was forgotten too early"


def test_budget_ignores_stale_buckets_it_has_not_reused_yet() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0.0, window_s=10)
    for _ in range(50):
        budget.deposit(0.5)  # bucket [0, 1)
    # At 12.5 the ring slot of [0, 1) has not been reused, but it is outside the window.
    assert budget.statistics(12.5).first_attempts_in_window == 0
    assert not budget.try_withdraw(12.5), "spent tokens deposited 12 s ago"


async def test_budget_exhaustion_stops_retries(autojump_clock: trio.testing.MockClock) -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_s=0.0, window_s=60)
    attempts = 0

    async def down() -> None:
        nonlocal attempts
        attempts += 1
        raise UnavailableError("down", service="s")

    for _ in range(100):
        with pytest.raises(UnavailableError):
            await retry(down, retry_on=lambda e: True, policy=policy("none"), budget=budget)
    retries = attempts - 100
    # Unbudgeted this would be 500 retries; the budget allows 0.2 per first attempt.
    assert retries == 20, f"expected exactly 20 retries for 100 calls, got {retries}"
    assert budget.statistics().refused > 0


async def test_cancellation_is_never_retried_or_swallowed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = 0
    seen: list[BaseException] = []

    def retry_on(exc: BaseException) -> bool:
        seen.append(exc)
        return True

    async def hang() -> None:
        nonlocal calls
        calls += 1
        await trio.sleep_forever()

    with trio.move_on_after(1) as scope:
        await retry(hang, retry_on=retry_on)
    assert scope.cancelled_caught, "Cancelled did not reach its scope"
    assert (calls, seen) == (1, []), "Cancelled was offered for retry"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("initial_s", {"initial_s": 0}),
        ("multiplier", {"multiplier": 0.5}),
        ("max_s", {"initial_s": 1, "max_s": 0.5}),
        ("jitter", {"jitter": "some"}),
        ("max_attempts", {"max_attempts": 0}),
    ],
)
def test_invalid_policy_names_the_field(field: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=field):
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]


def test_invalid_budget_names_the_field() -> None:
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=1.5)
    with pytest.raises(ValueError, match="window_s"):
        RetryBudget(window_s=0)
