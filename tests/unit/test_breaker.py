from __future__ import annotations

import pytest
import trio
import trio.testing

from common.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from common.errors import CircuitOpenError, NotFoundError, UnavailableError

POLICY = BreakerPolicy(
    failure_ratio=0.5,
    minimum_calls=4,
    window_s=10,
    buckets=10,
    open_for_s=5,
    half_open_max_calls=1,
    success_to_close=1,
)


async def failing() -> None:
    raise UnavailableError("backend down", service="results")


async def fine() -> str:
    return "ok"


def now() -> float:
    return trio.current_time()


async def test_opens_at_the_failing_call_half_opens_and_closes_at_exact_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("results", POLICY)
    t0 = now()
    assert await breaker.call(fine) == "ok"
    assert await breaker.call(fine) == "ok"
    with pytest.raises(UnavailableError):
        await breaker.call(failing)
    await trio.sleep_until(t0 + 1)
    assert breaker.state(now()) is BreakerState.CLOSED, "opened below minimum_calls"
    with pytest.raises(UnavailableError):
        await breaker.call(failing)  # 2 failures / 4 calls = 0.5: opens now, at t0+1
    assert breaker.state(now()) is BreakerState.OPEN, "did not open at the failing call"
    with pytest.raises(CircuitOpenError) as refused:
        await breaker.call(fine)
    assert refused.value.service == "results"
    assert refused.value.retry_after == pytest.approx(5.0, abs=1e-9)
    await trio.sleep_until(t0 + 6 - 1e-6)
    assert breaker.state(now()) is BreakerState.OPEN, "half-opened before the cooldown"
    await trio.sleep_until(t0 + 6)
    assert breaker.state(now()) is BreakerState.HALF_OPEN, "not half-open at opened_at+5"
    assert await breaker.call(fine) == "ok"
    assert breaker.state(now()) is BreakerState.CLOSED, "a successful probe should close"
    stats = breaker.statistics(now())
    assert (stats.calls_in_window, stats.failures_in_window, stats.times_opened) == (0, 0, 1)


async def test_a_failed_probe_reopens_with_a_fresh_cooldown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(4):
        with pytest.raises(UnavailableError):
            await breaker.call(failing)
    opened = now()
    await trio.sleep_until(opened + 5)
    with pytest.raises(UnavailableError):
        await breaker.call(failing)  # the probe fails
    stats = breaker.statistics(now())
    assert (stats.state, stats.times_opened) == (BreakerState.OPEN, 2), stats
    assert stats.retry_after_s == pytest.approx(5.0, abs=1e-9), "cooldown was not restarted"
    await trio.sleep_until(opened + 10 - 1e-6)
    assert breaker.state(now()) is BreakerState.OPEN
    await trio.sleep_until(opened + 10)
    assert breaker.state(now()) is BreakerState.HALF_OPEN


async def test_half_open_admits_only_the_configured_probes_and_needs_enough_successes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = BreakerPolicy(minimum_calls=4, open_for_s=5, half_open_max_calls=2, success_to_close=2)
    breaker = CircuitBreaker("b", policy)
    for _ in range(4):
        breaker.record_failure(now())
    await trio.sleep(5)
    release = [trio.Event(), trio.Event()]

    async def slow_probe(i: int) -> str:
        await release[i].wait()
        return "ok"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.call, slow_probe, 0)
        nursery.start_soon(breaker.call, slow_probe, 1)
        await trio.sleep(0.1)
        assert breaker.statistics(now()).probes_in_flight == 2
        with pytest.raises(CircuitOpenError, match="half-open"):
            await breaker.call(fine)  # a third probe is refused
        release[0].set()
        await trio.sleep(0.1)
        assert breaker.state(now()) is BreakerState.HALF_OPEN, "closed after 1 of 2 successes"
        release[1].set()
    assert breaker.state(now()) is BreakerState.CLOSED


async def test_old_failures_roll_out_of_the_window_at_bucket_boundaries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    t0 = now()
    await trio.sleep_until(t0 + 0.5)
    for _ in range(3):
        breaker.record_failure(now())  # bucket [t0, t0+1): forgotten from t0+10
    await trio.sleep_until(t0 + 10 - 1e-6)
    assert breaker.statistics(now()).failures_in_window == 3, "forgotten too early"
    await trio.sleep_until(t0 + 10)
    stats = breaker.statistics(now())
    assert (stats.calls_in_window, stats.failures_in_window) == (0, 0), "not forgotten at t0+10"
    breaker.record_failure(now())
    assert breaker.state(now()) is BreakerState.CLOSED, "counted failures from outside the window"


async def test_failures_still_in_the_window_do_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    t0 = now()
    await trio.sleep_until(t0 + 0.5)
    for _ in range(3):
        breaker.record_failure(now())
    await trio.sleep_until(t0 + 9.9)
    breaker.record_failure(now())
    assert breaker.state(now()) is BreakerState.OPEN, "4 failures within 10 s must open"


def test_minimum_calls_and_the_ratio_are_respected() -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(3):
        breaker.record_failure(0.0)
    assert breaker.state(0.0) is BreakerState.CLOSED, "3 calls < minimum_calls=4"
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(5):
        breaker.record_success(0.0)
    for _ in range(4):
        breaker.record_failure(0.0)
    assert breaker.state(0.0) is BreakerState.CLOSED, "4/9 failures is under the 0.5 ratio"
    breaker.record_failure(0.0)
    assert breaker.state(0.0) is BreakerState.OPEN, "5/10 failures reaches the 0.5 ratio"


async def test_not_classified_errors_propagate_and_count_as_successes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)

    async def not_found() -> None:
        raise NotFoundError("no such batch")

    for _ in range(10):
        with pytest.raises(NotFoundError):
            await breaker.call(not_found, classify=lambda e: not isinstance(e, NotFoundError))
    stats = breaker.statistics(now())
    assert (stats.calls_in_window, stats.failures_in_window) == (10, 0), stats
    assert stats.state is BreakerState.CLOSED


async def test_cancellation_is_not_counted_and_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    classified: list[BaseException] = []

    def classify(exc: BaseException) -> bool:
        classified.append(exc)
        return True

    for _ in range(5):
        with trio.move_on_after(1) as scope:
            await breaker.call(trio.sleep_forever, classify=classify)
        assert scope.cancelled_caught, "Cancelled did not reach its cancel scope"
    stats = breaker.statistics(now())
    assert (stats.calls_in_window, stats.state) == (0, BreakerState.CLOSED), stats
    assert classified == [], "classify must never see trio.Cancelled"


async def test_a_cancelled_probe_gives_its_slot_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(4):
        breaker.record_failure(now())
    await trio.sleep(5)
    with trio.move_on_after(1):
        await breaker.call(trio.sleep_forever)  # the probe is abandoned
    assert breaker.state(now()) is BreakerState.HALF_OPEN
    assert await breaker.call(fine) == "ok", "the abandoned probe kept its slot"
    assert breaker.state(now()) is BreakerState.CLOSED


async def test_a_call_admitted_before_opening_is_not_taken_for_a_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    release = trio.Event()

    async def slow() -> str:
        await release.wait()
        return "ok"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.call, slow)  # admitted while closed
        await trio.sleep(0.1)
        for _ in range(4):
            with pytest.raises(UnavailableError):
                await breaker.call(failing)
        await trio.sleep(5)
        assert breaker.state(now()) is BreakerState.HALF_OPEN
        release.set()  # the old call succeeds only now
    assert breaker.state(now()) is BreakerState.HALF_OPEN, "a stale success closed the breaker"
    with pytest.raises(UnavailableError):
        await breaker.call(failing)  # the real probe still has its slot, and fails
    assert breaker.state(now()) is BreakerState.OPEN


def test_statistics_default_to_the_latest_time_seen() -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(4):
        breaker.record_failure(100.0)
    breaker.state(102.0)
    stats = breaker.statistics()
    assert stats.state is BreakerState.OPEN, stats
    assert stats.retry_after_s == pytest.approx(3.0, abs=1e-9), stats


def test_invalid_policy_names_the_field() -> None:
    with pytest.raises(ValueError, match="failure_ratio"):
        BreakerPolicy(failure_ratio=0)
    with pytest.raises(ValueError, match="open_for_s"):
        BreakerPolicy(open_for_s=-1)
    with pytest.raises(ValueError, match="minimum_calls"):
        BreakerPolicy(minimum_calls=0)
    with pytest.raises(ValueError, match="success_to_close"):
        BreakerPolicy(half_open_max_calls=1, success_to_close=2)
