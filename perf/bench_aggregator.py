"""P8 and P9: aggregator intake into SQLite, and cached vs uncached ``GetBatch`` over gRPC.

* P8 intake: realistic result events (registration, slots, spellcheck, outcomes, CJ,
  completion; 11 per batch) applied (a) straight through the store transaction path and
  (b) end to end through ``run_consumer`` on the memory bus (decode, dedup, project, outbox,
  offsets, commit). Target: >= 20k events/s per process.
* P9 queries: ``GetBatch`` (with essays) over real gRPC on loopback at 16 concurrent callers,
  answered from the cache and with the cache defeated (every answer expired at once).
  Target: p99 <= 5 ms at c=16, >= 1.5k rps per core.

    python -m perf.bench_aggregator
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio

from aggregator.consumer import ConsumerStatistics, run_consumer
from aggregator.outbox import dead_letter, notifications_for
from aggregator.queries import ResultQueries
from aggregator.store import open_sqlite_store
from common.bus import open_memory_bus
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.events import envelope_headers
from common.rpc import open_rpc_loop, serve_grpc
from common.ttlcache import TtlCache
from perf._report import median, percentile, write_report
from tests.unit.aggregator import events as E

BATCHES = 2000
CHUNK = 500
RUNS = 3
QUERY_CALLS = 4000
CONCURRENCY = 16


def _events(prefix: str) -> list[Any]:
    return [e for i in range(BATCHES) for e in E.full_run(f"{prefix}-{i}")]


async def _intake_store(folder: Path, run: int) -> float:
    store = await open_sqlite_store(folder / f"store-{run}.db")
    records = E.as_records(_events(f"s{run}"))
    start = time.perf_counter()
    for i in range(0, len(records), CHUNK):
        await store.apply_records(records[i : i + CHUNK], notifications_for, dead_letter)
    elapsed = time.perf_counter() - start
    await store.close()
    return len(records) / elapsed


async def _intake_consumer(folder: Path, run: int) -> float:
    store = await open_sqlite_store(folder / f"consumer-{run}.db")
    envelopes = _events(f"c{run}")
    stats = ConsumerStatistics()
    async with open_memory_bus(max_records_per_partition=1_000_000) as bus:
        for i in range(0, len(envelopes), 1000):
            await bus.publish_many(
                [
                    (e.event_type, b"k", bytes(e), envelope_headers(e))
                    for e in envelopes[i : i + 1000]
                ]
            )
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(run_consumer, bus, store, invalidate=lambda _: None, stats=stats)
            )
            # The consumer's counters are a polled snapshot.
            while sum(c for (_, r), c in stats.by_topic.items() if r == "applied") < len(envelopes):  # noqa: ASYNC110
                await trio.sleep(0.01)
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
    await store.close()
    return len(envelopes) / elapsed


async def _client_async(port: int) -> dict[str, list[float]]:
    """Plain asyncio grpclib client (child process): the aggregator is measured alone."""
    import asyncio

    from grpclib.client import Channel

    channel = Channel("127.0.0.1", port)
    stub = results_v1.ResultServiceStub(channel)
    actor = common_v1.Actor(user_id="teacher-1")
    latencies: list[float] = []

    async def caller(n: int, k: int, record: bool) -> None:
        for j in range(n):
            request = results_v1.GetBatchRequest(
                actor=actor, batch_id=f"q-{(k * 7 + j) % 200}", include_essays=True
            )
            t = time.perf_counter()
            await stub.get_batch(request, timeout=10)
            if record:
                latencies.append(time.perf_counter() - t)

    await caller(400, 99, False)  # warm-up (fills the cache when cached)
    start = time.perf_counter()
    await asyncio.gather(*(caller(QUERY_CALLS // CONCURRENCY, k, True) for k in range(CONCURRENCY)))
    elapsed = time.perf_counter() - start
    channel.close()
    return {"latencies": latencies, "elapsed": [elapsed]}


async def _queries(folder: Path, cached: bool) -> dict[str, float]:
    store = await open_sqlite_store(folder / f"query-{cached}.db")
    records = E.as_records(_events("q")[: 200 * 11])
    for i in range(0, len(records), CHUNK):
        await store.apply_records(records[i : i + CHUNK], notifications_for, dead_letter)
    # "Uncached": every answer expires the instant it is stored.
    cache: TtlCache[Any, Any] = TtlCache(ttl_s=300 if cached else 1e-12)
    queries = ResultQueries(store, cache)
    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_grpc, [queries]))
        done = await trio.run_process(
            [sys.executable, "-m", "perf.bench_aggregator", "--client", str(port)],
            capture_stdout=True,
        )
        nursery.cancel_scope.cancel()
    data = json.loads(done.stdout.decode().strip().splitlines()[-1])
    latencies, elapsed = data["latencies"], data["elapsed"][0]
    stats = cache.statistics()
    await store.close()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "hit_ratio": stats.hits / max(1, stats.hits + stats.misses),
    }


async def _main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store_rates = [await _intake_store(folder, r) for r in range(RUNS)]
        consumer_rates = [await _intake_consumer(folder, r) for r in range(RUNS)]
        cached = [await _queries(folder, True) for _ in range(RUNS)]
        uncached = [await _queries(folder, False) for _ in range(RUNS)]

    def med(runs: list[dict[str, float]]) -> dict[str, float]:
        return {k: median([r[k] for r in runs]) for k in runs[0]}

    return {
        "intake_store_per_s": median(store_rates),
        "intake_consumer_per_s": median(consumer_rates),
        "cached": med(cached),
        "uncached": med(uncached),
    }


def main() -> None:
    r = trio.run(_main)
    rows = [
        ["P8 intake, store transaction path (events/s)", f"{r['intake_store_per_s']:.0f}", "", ""],
        [
            "P8 intake, consumer on the memory bus (events/s)",
            f"{r['intake_consumer_per_s']:.0f}",
            "",
            "",
        ],
        [
            "P9 GetBatch cached, c=16 (rps / p50 / p99 ms)",
            f"{r['cached']['rps']:.0f}",
            f"{r['cached']['p50_ms']:.2f}",
            f"{r['cached']['p99_ms']:.2f}",
        ],
        [
            "P9 GetBatch uncached, c=16 (rps / p50 / p99 ms)",
            f"{r['uncached']['rps']:.0f}",
            f"{r['uncached']['p50_ms']:.2f}",
            f"{r['uncached']['p99_ms']:.2f}",
        ],
    ]
    write_report(
        "aggregator",
        title="Aggregator intake (P8) and GetBatch queries (P9)",
        columns=["measure", "rate", "p50 ms", "p99 ms"],
        rows=rows,
        data=r,
        notes=[
            f"median of {RUNS} runs; {BATCHES} batches x 11 events for intake, chunks of {CHUNK}.",
            f"queries: {QUERY_CALLS} GetBatch calls (3 essays each) over loopback gRPC from a "
            "plain asyncio client in a child process (the aggregator measured alone, both "
            "processes on the same 2 cores); cached hit ratio "
            f"{r['cached']['hit_ratio']:.2f}, uncached {r['uncached']['hit_ratio']:.2f}.",
        ],
    )
    print(r)


if __name__ == "__main__":
    if "--client" in sys.argv:
        import asyncio

        port = int(sys.argv[sys.argv.index("--client") + 1])
        print(json.dumps(asyncio.run(_client_async(port))))
    else:
        main()
