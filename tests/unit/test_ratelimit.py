from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from common.ratelimit import GcraLimiter, RatePolicy, acquire

TEN_PER_S = RatePolicy("api", limit=10, period_s=1.0, burst=5)


def test_burst_then_exact_spacing() -> None:
    limiter = GcraLimiter(TEN_PER_S)
    assert [limiter.check("u", 0.0).allowed for _ in range(6)] == [True] * 5 + [False]
    denied = limiter.check("u", 0.0)
    assert denied.retry_after_s == pytest.approx(0.1, abs=1e-9)
    assert limiter.check("u", 0.1 - 1e-6).allowed is False
    assert limiter.check("u", 0.1).allowed is True
    assert limiter.check("u", 0.15).allowed is False
    assert limiter.check("u", 0.2).allowed is True


def test_remaining_and_reset_count_down() -> None:
    limiter = GcraLimiter(TEN_PER_S)
    first = limiter.check("u", 0.0)
    assert (first.remaining, first.reset_after_s) == (4, pytest.approx(0.1))
    for _ in range(3):
        limiter.check("u", 0.0)
    last = limiter.check("u", 0.0)
    assert (last.remaining, last.reset_after_s) == (0, pytest.approx(0.5))
    assert limiter.peek("u", 0.5).remaining == 4  # full again half a second later


def test_headers_follow_the_draft_and_legacy_forms() -> None:
    limiter = GcraLimiter(RatePolicy("login", limit=5, period_s=60, burst=5))
    allowed = limiter.check("1.2.3.4", 0.0)
    assert allowed.headers(limiter.policy) == {
        "RateLimit-Policy": '"login";q=5;w=60',
        "RateLimit": '"login";r=4;t=12',
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "4",
        "RateLimit-Reset": "12",
    }
    for _ in range(4):
        limiter.check("1.2.3.4", 0.0)
    denied = limiter.check("1.2.3.4", 0.0)
    assert denied.allowed is False
    assert denied.headers(limiter.policy)["Retry-After"] == "12"
    assert denied.headers(limiter.policy)["RateLimit"] == '"login";r=0;t=60'


def test_keys_are_isolated() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=1.0))
    assert limiter.check("a", 0.0).allowed
    assert not limiter.check("a", 0.0).allowed
    assert limiter.check("b", 0.0).allowed


def test_peek_counts_nothing() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=1.0))
    assert limiter.peek("a", 0.0).allowed and limiter.peek("a", 0.0).allowed
    assert limiter.statistics().allowed == 0
    assert limiter.check("a", 0.0).allowed


def test_memory_stays_bounded_and_idle_keys_go_first() -> None:
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=10.0), max_keys=100)
    for i in range(100):
        limiter.check(f"old{i}", 0.0)  # TAT 10.0
    limiter.check("busy", 15.0)  # the old ones are full again by now: evicted first
    assert limiter.statistics().keys == 1
    for i in range(1000):
        limiter.check(f"k{i}", 20.0)
    assert limiter.statistics().keys <= 100


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("limit", {"limit": 0, "period_s": 1}),
        ("period_s", {"limit": 1, "period_s": 0}),
        ("burst", {"limit": 1, "period_s": 1, "burst": -1}),
        ("name", {"name": 'a"b', "limit": 1, "period_s": 1}),
    ],
)
def test_invalid_policies_name_the_field(field: str, kwargs: dict[str, object]) -> None:
    kwargs.setdefault("name", "p")
    with pytest.raises(ValueError, match=field):
        RatePolicy(**kwargs)  # type: ignore[arg-type]


async def test_acquire_waits_exactly_on_virtual_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = GcraLimiter(TEN_PER_S)
    start = trio.current_time()
    times = []
    for _ in range(8):
        await acquire(limiter, "u")
        times.append(trio.current_time() - start)
    assert times == pytest.approx([0, 0, 0, 0, 0, 0.1, 0.2, 0.3], abs=1e-9)


async def test_p4_sustained_rate_is_within_one_percent_over_ten_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = RatePolicy("p", limit=100, period_s=1.0, burst=10)
    limiter = GcraLimiter(policy)
    start = trio.current_time()
    admitted = 0
    while trio.current_time() - start < 10.0:
        await acquire(limiter, "u")
        admitted += 1
    expected = 100 * 10 + 10  # the sustained rate plus the initial burst
    assert abs(admitted - expected) <= 0.01 * expected, admitted


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=300),
    limit=st.integers(1, 50),
    burst=st.integers(1, 20),
)
def test_no_window_admits_more_than_burst_plus_rate(
    gaps: list[float], limit: int, burst: int
) -> None:
    policy = RatePolicy("p", limit=limit, period_s=1.0, burst=burst)
    limiter = GcraLimiter(policy)
    now, admitted = 0.0, []
    for gap in gaps:
        now += gap
        if limiter.check("k", now).allowed:
            admitted.append(now)
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            window = admitted[j] - start
            count = j - i + 1
            assert count <= burst + limit * window + 1e-6, (count, window)
