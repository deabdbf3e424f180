from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ratelimit import Decision, GcraLimiter, RatePolicy, acquire

TEN_PER_S_BURST_5 = RatePolicy("api", limit=10, period_s=1.0, burst=5)


def test_burst_is_admitted_at_once_then_requests_are_spaced_by_the_interval() -> None:
    limiter = GcraLimiter(TEN_PER_S_BURST_5)
    burst = [limiter.check("u", 0.0).allowed for _ in range(6)]
    assert burst == [True] * 5 + [False], f"burst of 5 expected, got {burst}"
    assert limiter.check("u", 0.1 - 1e-6).allowed is False, "admitted before its slot"
    assert limiter.check("u", 0.1).allowed is True, "refused exactly at its slot"
    assert limiter.check("u", 0.15).allowed is False
    assert limiter.check("u", 0.2).allowed is True


def test_a_denial_says_exactly_when_to_come_back() -> None:
    limiter = GcraLimiter(TEN_PER_S_BURST_5)
    for _ in range(5):
        limiter.check("u", 0.0)
    denied = limiter.check("u", 0.03)
    assert denied == Decision(
        allowed=False,
        limit=10,
        remaining=0,
        reset_after_s=pytest.approx(0.47, abs=1e-9),  # type: ignore[arg-type]
        retry_after_s=pytest.approx(0.07, abs=1e-9),  # type: ignore[arg-type]
    )
    assert limiter.check("u", 0.03 + denied.retry_after_s).allowed, "retry_after was too short"


def test_remaining_and_reset_count_down_and_refill() -> None:
    limiter = GcraLimiter(TEN_PER_S_BURST_5)
    first = limiter.check("u", 0.0)
    assert first.remaining == 4 and first.reset_after_s == pytest.approx(0.1, abs=1e-9), first
    for _ in range(3):
        limiter.check("u", 0.0)
    last = limiter.check("u", 0.0)
    assert last.remaining == 0 and last.reset_after_s == pytest.approx(0.5, abs=1e-9), last
    assert limiter.peek("u", 0.25).remaining == 1, "2.5 refilled slots: one usable after this"
    assert limiter.peek("u", 0.5).remaining == 4, "full again half a second later"


def test_a_costly_request_uses_several_slots_and_an_impossible_cost_is_refused() -> None:
    limiter = GcraLimiter(TEN_PER_S_BURST_5)
    assert limiter.check("u", 0.0, cost=3).remaining == 2
    denied = limiter.check("u", 0.0, cost=3)
    assert not denied.allowed and denied.retry_after_s == pytest.approx(0.1, abs=1e-9)
    assert denied.remaining == 2, "a refused costly request must not hide the cheap slots left"
    with pytest.raises(ValueError, match="cost"):
        limiter.check("u", 0.0, cost=6)  # more than the burst: could never be admitted
    with pytest.raises(ValueError, match="cost"):
        limiter.check("u", 0.0, cost=0)


def test_headers_follow_the_draft_and_legacy_forms() -> None:
    policy = RatePolicy("login", limit=5, period_s=60)
    limiter = GcraLimiter(policy)
    allowed = limiter.check("1.2.3.4", 0.0)
    assert allowed.headers(policy) == {
        "RateLimit-Policy": '"login";q=5;w=60',
        "RateLimit": '"login";r=4;t=12',
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "4",
        "RateLimit-Reset": "12",
    }
    for _ in range(4):
        limiter.check("1.2.3.4", 0.0)
    denied = limiter.check("1.2.3.4", 0.5)
    assert denied.headers(policy) == {
        "RateLimit-Policy": '"login";q=5;w=60',
        "RateLimit": '"login";r=0;t=60',  # 59.5 s rounded up
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "Retry-After": "12",  # 11.5 s rounded up
    }


def test_retry_after_header_is_at_least_one_second() -> None:
    policy = RatePolicy("ws", limit=100, period_s=1.0, burst=1)
    limiter = GcraLimiter(policy)
    limiter.check("c", 0.0)
    denied = limiter.check("c", 0.0)
    assert denied.retry_after_s == pytest.approx(0.01, abs=1e-9)
    assert denied.headers(policy)["Retry-After"] == "1"
    assert denied.headers(policy)["RateLimit-Reset"] == "1"


def test_keys_are_isolated() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=1.0))
    assert limiter.check("a", 0.0).allowed
    assert not limiter.check("a", 0.0).allowed
    assert limiter.check("b", 0.0).allowed, "key b was charged for key a's request"
    assert limiter.check(("a", "/other"), 0.0).allowed, "tuple keys are separate keys"


def test_peek_counts_nothing() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=1.0))
    assert limiter.peek("a", 0.0).allowed and limiter.peek("a", 0.0).allowed
    stats = limiter.statistics()
    assert (stats.keys, stats.allowed, stats.denied) == (0, 0, 0), stats
    assert limiter.check("a", 0.0).allowed
    assert not limiter.check("a", 0.5).allowed
    stats = limiter.statistics()
    assert (stats.keys, stats.allowed, stats.denied) == (1, 1, 1), stats


def test_a_refund_gives_back_exactly_what_a_check_took() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=2, period_s=10.0, burst=2))
    assert limiter.check("a", 0.0).allowed and limiter.check("a", 0.0).allowed
    assert not limiter.peek("a", 0.0).allowed
    limiter.refund("a", 0.0)
    assert limiter.check("a", 0.0).allowed  # the refunded slot, and only that one
    assert not limiter.check("a", 0.0).allowed
    limiter.refund("a", 0.0)
    limiter.refund("a", 0.0)
    assert limiter.statistics().keys == 0  # nothing outstanding: the key is forgotten
    limiter.refund("never-seen", 0.0)  # harmless
    assert limiter.check("a", 0.0).remaining == 1  # never more than a fresh key


def test_full_buckets_are_evicted_first_and_memory_stays_bounded() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=10.0), max_keys=100)
    for i in range(100):
        limiter.check(f"idle{i}", 0.0)  # each TAT 10.0: full again from t=10
    limiter.check("busy", 15.0)
    stats = limiter.statistics()
    assert (stats.keys, stats.evicted_active) == (1, 0), "only the full buckets should go"
    for i in range(1000):
        limiter.check(f"k{i}", 20.0)
        assert limiter.statistics().keys <= 100, "max_keys exceeded"
    assert limiter.statistics().evicted_active > 0


def test_eviction_of_active_keys_drops_those_closest_to_full() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=1.0, burst=10), max_keys=10)
    for i in range(10):
        for _ in range(i + 1):
            limiter.check(f"k{i}", 0.0)  # k9 is 10 requests ahead, k0 only one
    limiter.check("new", 0.0)
    assert limiter.statistics().evicted_active == 1
    assert limiter.peek("k0", 0.0).remaining == 9, "k0 (least ahead) should have been dropped"
    assert limiter.peek("k9", 0.0).allowed is False, "k9 (most ahead) must keep its debt"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("limit", {"limit": 0, "period_s": 1}),
        ("limit", {"limit": 1.5, "period_s": 1}),
        ("period_s", {"limit": 1, "period_s": 0}),
        ("period_s", {"limit": 1, "period_s": float("inf")}),
        ("burst", {"limit": 1, "period_s": 1, "burst": 0}),
        ("name", {"name": 'a"b', "limit": 1, "period_s": 1}),
        ("name", {"name": "", "limit": 1, "period_s": 1}),
    ],
)
def test_invalid_policies_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    kwargs.setdefault("name", "p")
    with pytest.raises(ValueError, match=field):
        RatePolicy(**kwargs)  # type: ignore[arg-type]


def test_burst_defaults_to_limit() -> None:
    policy = RatePolicy("p", limit=7, period_s=1.0)
    assert policy.burst == 7 and policy.capacity == 7


async def test_acquire_ends_at_the_exact_scheduled_times(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = GcraLimiter(TEN_PER_S_BURST_5)
    start = trio.current_time()
    times = []
    for _ in range(8):
        await acquire(limiter, "u")
        times.append(trio.current_time() - start)
    assert times == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.2, 0.3], abs=1e-9), times
    assert limiter.statistics().denied == 0, "waiting in acquire is not a refusal"


async def test_acquire_is_a_checkpoint_even_when_admitted_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = GcraLimiter(TEN_PER_S_BURST_5)
    with trio.testing.assert_checkpoints():
        await acquire(limiter, "u")
    with trio.CancelScope() as scope:
        scope.cancel()
        await acquire(limiter, "u")
    assert limiter.statistics().allowed == 1, "a cancelled acquire consumed a slot"


async def test_concurrent_acquirers_share_the_rate(autojump_clock: trio.testing.MockClock) -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=10, period_s=1.0, burst=1))
    start = trio.current_time()
    times: list[float] = []

    async def worker() -> None:
        for _ in range(5):
            await acquire(limiter, "shared")
            times.append(trio.current_time() - start)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(worker)
    expected = [round(0.1 * i, 9) for i in range(15)]
    assert sorted(times) == pytest.approx(expected, abs=1e-9), sorted(times)


async def test_cancelled_acquire_consumes_nothing(autojump_clock: trio.testing.MockClock) -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=1.0))
    start = trio.current_time()
    await acquire(limiter, "u")
    with trio.move_on_after(0.5) as scope:
        await acquire(limiter, "u")
    assert scope.cancelled_caught, "second acquire should have had to wait"
    await acquire(limiter, "u")
    assert trio.current_time() - start == pytest.approx(1.0, abs=1e-9)


async def test_acquire_uses_the_injected_clock(autojump_clock: trio.testing.MockClock) -> None:
    class OffsetClock:
        """A clock 1000 s ahead of Trio's: proves acquire reads only the injected one."""

        def __init__(self) -> None:
            self.deadlines: list[float] = []

        def now(self) -> float:
            return trio.current_time() + 1000.0

        async def sleep_until(self, deadline: float) -> None:
            self.deadlines.append(deadline)
            await trio.sleep_until(deadline - 1000.0)

    clock = OffsetClock()
    limiter = GcraLimiter(RatePolicy("p", limit=2, period_s=1.0, burst=1))
    start = trio.current_time()
    await acquire(limiter, "u", clock=clock)
    await acquire(limiter, "u", clock=clock)
    assert clock.deadlines == [pytest.approx(start + 1000.5, abs=1e-9)]
    assert trio.current_time() - start == pytest.approx(0.5, abs=1e-9)


async def test_p4_acquire_sustains_the_configured_rate_over_ten_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=100, period_s=1.0, burst=10))
    for _ in range(10):
        await acquire(limiter, "u")  # drain the burst
    start = trio.current_time()
    admitted = 0
    while True:
        await acquire(limiter, "u")
        if trio.current_time() - start > 10.0 + 1e-9:
            break
        admitted += 1
    # Admissions at start + 0.01, +0.02, ..., +10.00.
    assert admitted == 1000, f"P4: expected 1000 admissions in 10 s at 100/s, got {admitted}"


@settings(max_examples=30, deadline=None)
@given(rate=st.integers(10, 100), burst=st.integers(2, 20), seed=st.integers(0, 2**32 - 1))
def test_p4_saturating_random_traffic_is_admitted_at_the_configured_rate(
    rate: int, burst: int, seed: int
) -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=rate, period_s=1.0, burst=burst))
    rng = random.Random(seed)
    now, admitted = 0.0, 0
    while True:
        now += rng.expovariate(20 * rate)  # Poisson arrivals at 20x the limit
        if now > 10.0:
            break
        admitted += limiter.check("k", now).allowed
    expected = rate * 10 + burst
    assert abs(admitted - expected) <= 0.01 * expected, (
        f"P4: {admitted} admitted in 10 s, expected {expected} (rate {rate}/s + burst {burst})"
    )


@settings(max_examples=200, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.floats(min_value=0, max_value=0.3), st.integers(1, 3)),
        min_size=1,
        max_size=300,
    ),
    limit=st.integers(1, 50),
    period_s=st.sampled_from([0.5, 1.0, 3.0]),
    burst=st.integers(3, 20),
)
def test_p4_no_window_admits_more_than_burst_plus_rate_times_window(
    requests: list[tuple[float, int]], limit: int, period_s: float, burst: int
) -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=limit, period_s=period_s, burst=burst))
    rate = limit / period_s
    now = 0.0
    admitted: list[tuple[float, int]] = []
    for gap, cost in requests:
        now += gap
        if limiter.check("k", now, cost).allowed:
            admitted.append((now, cost))
    # For every window [t_i, t_j]: sum(cost_i..cost_j) <= burst + rate * (t_j - t_i).
    # With S_j the running sum this is S_j - rate*t_j - min_i(S_{i-1} - rate*t_i) <= burst.
    total, best = 0.0, float("inf")
    for t, cost in admitted:
        best = min(best, total - rate * t)
        total += cost
        excess = total - rate * t - best
        assert excess <= burst + 1e-6, f"a window ending at {t} admitted {excess} over the rate"
