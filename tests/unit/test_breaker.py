from __future__ import annotations

import pytest
import trio

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


async def test_opens_at_the_failing_call_half_opens_and_closes_at_exact_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("results", POLICY)
    t0 = trio.current_time()
    await breaker.call(fine)
    await breaker.call(fine)
    with pytest.raises(UnavailableError):
        await breaker.call(failing)
    assert breaker.state(trio.current_time()) is BreakerState.CLOSED  # 1/3 and under minimum
    await trio.sleep(1)
    with pytest.raises(UnavailableError):
        await breaker.call(failing)  # 2/4 = 0.5 -> opens at t0+1
    assert breaker.state(trio.current_time()) is BreakerState.OPEN
    with pytest.raises(CircuitOpenError) as info:
        await breaker.call(fine)
    assert info.value.retry_after == pytest.approx(5.0)
    assert info.value.service == "results"
    await trio.sleep_until(t0 + 1 + 5 - 1e-6)
    assert breaker.state(trio.current_time()) is BreakerState.OPEN
    await trio.sleep_until(t0 + 6)
    assert breaker.state(trio.current_time()) is BreakerState.HALF_OPEN
    assert await breaker.call(fine) == "ok"
    assert breaker.state(trio.current_time()) is BreakerState.CLOSED
    assert breaker.statistics(trio.current_time()).calls_in_window == 0


async def test_a_failed_probe_reopens_with_a_fresh_cooldown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(4):
        with pytest.raises(UnavailableError):
            await breaker.call(failing)
    opened = trio.current_time()
    await trio.sleep(5)
    with pytest.raises(UnavailableError):
        await breaker.call(failing)  # the probe fails
    assert breaker.state(trio.current_time()) is BreakerState.OPEN
    assert breaker.statistics(trio.current_time()).retry_after_s == pytest.approx(5.0)
    assert breaker.statistics(trio.current_time()).times_opened == 2
    assert trio.current_time() - opened == pytest.approx(5.0)


async def test_half_open_admits_only_the_configured_probes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(4):
        breaker.record_failure(trio.current_time())
    await trio.sleep(5)
    release = trio.Event()

    async def slow_probe() -> str:
        await release.wait()
        return "ok"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(breaker.call, slow_probe)
        await trio.sleep(0.1)
        with pytest.raises(CircuitOpenError):
            await breaker.call(fine)  # second probe refused while the first is in flight
        release.set()
    assert breaker.state(trio.current_time()) is BreakerState.CLOSED


async def test_old_failures_roll_out_of_the_window(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(3):
        breaker.record_failure(trio.current_time())
    await trio.sleep(10)  # those three buckets have left the 10 s window
    breaker.record_failure(trio.current_time())
    stats = breaker.statistics(trio.current_time())
    assert (stats.calls_in_window, stats.failures_in_window) == (1, 1)
    assert stats.state is BreakerState.CLOSED


async def test_minimum_calls_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    breaker = CircuitBreaker("b", POLICY)
    for _ in range(3):
        breaker.record_failure(trio.current_time())  # 100% failures, but only 3 calls
    assert breaker.state(trio.current_time()) is BreakerState.CLOSED


async def test_client_errors_and_cancellation_do_not_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = CircuitBreaker("b", POLICY)

    async def not_found() -> None:
        raise NotFoundError("no such batch")

    for _ in range(10):
        with pytest.raises(NotFoundError):
            await breaker.call(not_found, is_failure=lambda e: not isinstance(e, NotFoundError))
    with trio.move_on_after(1):
        await breaker.call(trio.sleep_forever)
    stats = breaker.statistics(trio.current_time())
    assert stats.failures_in_window == 0
    assert stats.state is BreakerState.CLOSED


def test_invalid_policy_names_the_field() -> None:
    with pytest.raises(ValueError, match="failure_ratio"):
        BreakerPolicy(failure_ratio=0)
    with pytest.raises(ValueError, match="open_for_s"):
        BreakerPolicy(open_for_s=-1)
    with pytest.raises(ValueError, match="success_to_close"):
        BreakerPolicy(half_open_max_calls=1, success_to_close=2)
