"""P4: GCRA limiter decision cost and accuracy (``common/ratelimit.py``).

Decision cost: ``GcraLimiter.check`` over CALLS calls spread across KEYS keys, median of RUNS
runs, for a mix of admitted/refused answers, for all-admitted traffic, for ``peek``, and with
a stream of new keys that keeps the ``max_keys`` sweep busy (amortised eviction cost).

Accuracy over 10 s of simulated time: saturating Poisson arrivals (20x the limit, seeded)
through ``check``, and queued callers through ``acquire`` on Trio's ``MockClock``; each
reports admissions against the ideal ``rate x 10 s + burst``.

    python -m perf.bench_ratelimit      # writes perf/results/ratelimit.*
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import trio
import trio.testing

from common.ratelimit import GcraLimiter, RatePolicy, acquire
from perf._report import median, write_report

RUNS = 7
CALLS = 200_000
KEYS = 1_000
SIM_S = 10.0
POLICIES = [
    RatePolicy("api", limit=10, period_s=1.0, burst=5),
    RatePolicy("api", limit=100, period_s=1.0, burst=20),
    RatePolicy("api", limit=1000, period_s=1.0, burst=50),
]


def _cost_us(make: Callable[[], Callable[[], None]]) -> tuple[float, list[float]]:
    """Median µs per call of the loop ``make()`` returns (it runs CALLS decisions)."""
    runs = []
    for _ in range(RUNS):
        loop = make()
        start = time.perf_counter()
        loop()
        runs.append((time.perf_counter() - start) / CALLS * 1e6)
    return median(runs), runs


def _keys(n: int) -> list[str]:
    return [f"user-{i:06d}" for i in range(n)]


def _check_loop(policy: RatePolicy, step_s: float, *, peek: bool = False) -> Callable[[], None]:
    limiter = GcraLimiter(policy)
    keys = _keys(KEYS)
    decide = limiter.peek if peek else limiter.check
    schedule = [(keys[i % KEYS], i * step_s) for i in range(CALLS)]

    def loop() -> None:
        for key, now in schedule:
            decide(key, now)

    return loop


def _eviction_loop() -> Callable[[], None]:
    # Every call is a new key and the table holds 10k: a sweep every 1k calls, all keys live.
    limiter = GcraLimiter(RatePolicy("p", limit=1, period_s=3600.0), max_keys=10_000)
    schedule = [(f"addr-{i}", i * 1e-6) for i in range(CALLS)]

    def loop() -> None:
        for key, now in schedule:
            limiter.check(key, now)
        assert limiter.statistics().keys <= 10_000

    return loop


def _ideal(policy: RatePolicy) -> int:
    """The most GCRA can admit in [0, SIM_S]: the burst at 0, then one per interval."""
    return policy.capacity + int(SIM_S / policy.interval_s + 1e-9)


def _accuracy_check(policy: RatePolicy, seed: int) -> dict[str, Any]:
    limiter = GcraLimiter(policy)
    rng = random.Random(seed)  # reproducible traffic; nothing secret depends on it
    rate = policy.limit / policy.period_s
    now, offered, admitted = 0.0, 0, 0
    while True:
        now += rng.expovariate(20 * rate)
        if now > SIM_S:
            break
        offered += 1
        admitted += limiter.check("k", now).allowed
    ideal = _ideal(policy)
    return {
        "policy": f"{policy.limit}/{policy.period_s:g}s burst {policy.capacity}",
        "offered": offered,
        "admitted": admitted,
        "ideal": ideal,
        "error_pct": (admitted - ideal) / ideal * 100,
    }


def _accuracy_acquire(policy: RatePolicy) -> dict[str, Any]:
    limiter = GcraLimiter(policy)
    admitted = 0

    async def run() -> None:
        nonlocal admitted

        async def caller() -> None:
            nonlocal admitted
            while True:
                await acquire(limiter, "k")
                admitted += 1

        with trio.move_on_after(SIM_S + 1e-9):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(caller)

    start = time.perf_counter()
    trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    real_ms = (time.perf_counter() - start) * 1e3
    ideal = _ideal(policy)
    return {
        "policy": f"{policy.limit}/{policy.period_s:g}s burst {policy.capacity}",
        "admitted": admitted,
        "ideal": ideal,
        "error_pct": (admitted - ideal) / ideal * 100,
        "real_ms": real_ms,
    }


def main() -> None:
    mixed, mixed_runs = _cost_us(lambda: _check_loop(POLICIES[0], 1e-5))
    # 2e-5 s per call over 1k keys = 50/s per key: under 100/s, so every call is admitted.
    allowed, allowed_runs = _cost_us(lambda: _check_loop(POLICIES[1], 2e-5))
    refused, refused_runs = _cost_us(lambda: _check_loop(POLICIES[1], 0.0))
    peek, peek_runs = _cost_us(lambda: _check_loop(POLICIES[0], 1e-5, peek=True))
    evict, evict_runs = _cost_us(_eviction_loop)
    check_acc = [_accuracy_check(p, seed) for seed, p in enumerate(POLICIES)]
    acquire_acc = [_accuracy_acquire(p) for p in POLICIES[:2]]

    rows: list[list[Any]] = [
        ["check, mixed admit/refuse (10/s burst 5, 1k keys)", f"{mixed:.2f}", ""],
        ["check, all admitted (100/s burst 20, 50/s per key)", f"{allowed:.2f}", ""],
        ["check, all refused after the burst (same instant)", f"{refused:.2f}", ""],
        ["peek (10/s burst 5, 1k keys)", f"{peek:.2f}", ""],
        ["check, new key every call at max_keys=10k (sweeps)", f"{evict:.2f}", ""],
    ]
    for acc in check_acc:
        rows.append(
            [
                f"P4 accuracy, check under 20x Poisson load, {acc['policy']}",
                "",
                f"{acc['admitted']} / {acc['ideal']} ({acc['error_pct']:+.2f}%)",
            ]
        )
    for acc in acquire_acc:
        rows.append(
            [
                f"P4 accuracy, acquire x4 callers on MockClock, {acc['policy']}",
                "",
                f"{acc['admitted']} / {acc['ideal']} ({acc['error_pct']:+.2f}%), "
                f"{acc['real_ms']:.0f} ms real",
            ]
        )
    data = {
        "calls": CALLS,
        "keys": KEYS,
        "runs": RUNS,
        "check_mixed_us": {"median": mixed, "runs": mixed_runs},
        "check_admitted_us": {"median": allowed, "runs": allowed_runs},
        "check_refused_us": {"median": refused, "runs": refused_runs},
        "peek_us": {"median": peek, "runs": peek_runs},
        "check_new_keys_with_eviction_us": {"median": evict, "runs": evict_runs},
        "accuracy_check": check_acc,
        "accuracy_acquire": acquire_acc,
    }
    write_report(
        "ratelimit",
        title="GCRA limiter: decision cost and accuracy (P4)",
        columns=["measure", "µs per decision (median)", "admitted / ideal in 10 s"],
        rows=rows,
        data=data,
        notes=[
            f"cost: median of {RUNS} runs of {CALLS} calls over {KEYS} keys, one thread, "
            "precomputed (key, now) schedule; includes building the Decision.",
            "ideal = burst + rate x 10 s (the burst at t=0, then one admission per interval up "
            "to and including t=10 s); accuracy runs are on simulated time and seeded. Random "
            "arrivals cannot land exactly on the t=10 s slot, hence -1 there.",
        ],
    )
    print(data)


if __name__ == "__main__":
    main()
