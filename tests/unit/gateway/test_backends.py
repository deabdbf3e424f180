"""gateway.backends on Trio's virtual clock: breaker transitions at exact times, what counts
as a failure, deadlines never overrun, retries only for idempotent reads, the error table."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from common.breaker import BreakerState
from common.errors import (
    CircuitOpenError,
    ConflictError,
    DeadlineExceededError,
    DependencyError,
    HuleEduError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    UnavailableError,
    ValidationError,
)
from gateway.backends import Backend, BackendSettings, public_error, route_budget

SETTINGS = BackendSettings(
    target="127.0.0.1:1",
    breaker_minimum_calls=4,
    breaker_failure_ratio=0.5,
    breaker_window_s=10,
    breaker_open_for_s=5,
    retry_attempts=3,
    retry_initial_s=0.1,
    retry_max_s=0.1,
)


class FaultyBackend:
    """A backend whose behaviour the test sets: answer, fail with an error, or hang."""

    service = "results"

    def __init__(self) -> None:
        self.mode: str | HuleEduError = "ok"
        self.calls: list[float] = []

    async def call(
        self, method: Callable[..., Awaitable[Any]], request: Any, *, idempotent: bool = False
    ) -> Any:
        self.calls.append(trio.current_time())
        if self.mode == "hang":
            await trio.sleep_forever()
        if isinstance(self.mode, HuleEduError):
            raise self.mode
        return await method(request)


async def echo(request: Any) -> Any:
    await trio.sleep(0.01)
    return request


def backend(faulty: FaultyBackend) -> Backend:
    return Backend("results", faulty, SETTINGS, rng=random.Random(7))


async def test_breaker_opens_half_opens_and_closes_at_exact_virtual_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyBackend()
    results = backend(faulty)
    assert await results.call(echo, "a") == "a"
    assert await results.call(echo, "b") == "b"
    faulty.mode = UnavailableError("down", service="results")
    with pytest.raises(UnavailableError):
        await results.call(echo, "c")  # 1 of 3 failed
    assert results.state() is BreakerState.CLOSED
    with pytest.raises(UnavailableError):
        await results.call(echo, "d")  # 2 of 4 = 50 %: opens
    opened = trio.current_time()
    assert results.state() is BreakerState.OPEN

    calls_before = len(faulty.calls)
    with pytest.raises(CircuitOpenError) as refused:
        await results.call(echo, "e")
    assert len(faulty.calls) == calls_before  # refused without calling
    assert refused.value.retry_after == pytest.approx(5.0)
    assert trio.current_time() == opened  # at once

    await trio.sleep_until(opened + 5 - 0.001)
    assert results.state() is BreakerState.OPEN
    await trio.sleep_until(opened + 5)
    assert results.state() is BreakerState.HALF_OPEN
    faulty.mode = "ok"
    assert await results.call(echo, "probe") == "probe"
    assert results.state() is BreakerState.CLOSED


async def test_a_failed_probe_reopens_for_a_fresh_cooldown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyBackend()
    results = backend(faulty)
    faulty.mode = UnavailableError("down", service="results")
    for _ in range(4):
        with pytest.raises(UnavailableError):
            await results.call(echo, 1)
    await trio.sleep(5)
    assert results.state() is BreakerState.HALF_OPEN
    with pytest.raises(UnavailableError):
        await results.call(echo, "probe")
    reopened = trio.current_time()
    assert results.state() is BreakerState.OPEN
    await trio.sleep_until(reopened + 5)
    assert results.state() is BreakerState.HALF_OPEN


async def test_client_errors_prove_the_backend_healthy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyBackend()
    results = backend(faulty)
    faulty.mode = NotFoundError("no such batch", service="results")
    for _ in range(20):
        with pytest.raises(NotFoundError):
            await results.call(echo, 1)
    assert results.state() is BreakerState.CLOSED


async def test_a_deadline_cut_counts_as_a_timeout_and_never_overruns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyBackend()
    results = backend(faulty)
    faulty.mode = "hang"
    for i in range(4):
        started = trio.current_time()
        with pytest.raises(DeadlineExceededError), route_budget(0.75):
            await results.call(echo, i, idempotent=True)
        assert trio.current_time() - started == pytest.approx(0.75)  # not a tick later
    assert results.state() is BreakerState.OPEN  # 4 timeouts of 4 calls


async def test_a_call_cancelled_for_another_reason_does_not_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyBackend()
    results = backend(faulty)
    faulty.mode = "hang"
    for i in range(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(results.call, echo, i)
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()  # e.g. the client went away
    assert results.state() is BreakerState.CLOSED
    assert results.breaker.statistics().failures_in_window == 0


async def test_idempotent_reads_retry_transient_failures_writes_never(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyBackend()
    results = backend(faulty)
    faulty.mode = UnavailableError("down", service="results")
    with pytest.raises(UnavailableError):
        await results.call(echo, "write")
    assert len(faulty.calls) == 1

    faulty.calls.clear()
    flaky = iter([UnavailableError("blip", service="results"), "ok"])

    async def flaky_method(request: Any) -> Any:
        outcome = next(flaky)
        if isinstance(outcome, HuleEduError):
            raise outcome
        return request

    fresh = backend(FaultyBackend())
    assert await fresh.call(flaky_method, "read", idempotent=True) == "read"

    # Client errors are never retried, reads or not.
    faulty.mode = NotFoundError("gone", service="results")
    other = backend(faulty)
    faulty.calls.clear()
    with pytest.raises(NotFoundError):
        await other.call(echo, "read", idempotent=True)
    assert len(faulty.calls) == 1


async def test_retries_stop_when_the_deadline_leaves_no_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    faulty = FaultyBackend()
    faulty.mode = UnavailableError("down", service="results")
    results = backend(faulty)
    started = trio.current_time()
    with pytest.raises(UnavailableError), route_budget(0.05):
        await results.call(echo, "read", idempotent=True)
    # Every retry began before the deadline, and the real error came back (not a timeout)
    # without sleeping into the deadline.
    assert all(t < started + 0.05 for t in faulty.calls)
    assert trio.current_time() < started + 0.05
    assert len(faulty.calls) <= SETTINGS.retry_attempts


@pytest.mark.parametrize(
    ("error", "status", "detail"),
    [
        (NotFoundError("batch b1 of user u2 not found"), 404, "batch not found"),
        (PermissionDeniedError("u1 may not read u2's batch b1"), 404, "batch not found"),
        (ValidationError("course_code 'x' too long", field="course_code"), 422, None),
        (ConflictError("pipeline p9 of u2 running"), 409, None),
        (PayloadTooLargeError("essay.docx over 10 MiB", field="max_file_bytes"), 413, None),
        (UnavailableError("results: UNAVAILABLE: connect 10.0.0.7:50061"), 503, None),
        (DeadlineExceededError("results: DEADLINE_EXCEEDED"), 504, None),
        (DependencyError("results: INTERNAL: Traceback ... user u2"), 502, None),
    ],
)
def test_public_error_keeps_the_status_never_the_backend_text(
    error: HuleEduError, status: int, detail: str | None
) -> None:
    public = public_error(error, "batch")
    assert public.http_status == status
    assert error.message not in public.detail
    for secret in ("u2", "b1", "10.0.0.7", "Traceback", "p9"):
        assert secret not in public.detail
    if detail is not None:
        assert public.detail == detail
    if error.field is not None:
        assert public.field == error.field
