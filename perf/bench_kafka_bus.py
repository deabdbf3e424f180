"""KafkaBus throughput and latency on the local broker (``KAFKA_BOOTSTRAP``, default
127.0.0.1:19092; ``make perf`` starts one).

* publish, sequential: one awaited ``publish`` at a time (acks=all round trip each);
* publish, batched: ``publish_many`` of BATCH records at a time (many in flight);
* consume: records/s through ``get_batch`` (batched ``consume`` hops into Trio) + commit;
* latency: a paced producer (RATE/s) stamps each value; the consumer measures
  publish-start -> record-in-Trio, for 64 B and 1 KiB values.

    python -m perf.bench_kafka_bus
"""

from __future__ import annotations

import os
import struct
import time
import uuid

import trio

from common.bus import open_kafka_bus
from common.settings import KafkaSettings
from perf._report import median, percentile, write_report

RUNS = 3
SEQ_N = 1000
BATCH_N = 20_000
BATCH = 1000
LAT_N = 2000
RATE = 1000  # records/s for the latency runs


def _settings() -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=os.environ.get("KAFKA_BOOTSTRAP", "127.0.0.1:19092"),
        client_id="perf",
        consume_timeout_s=0.1,
    )


async def _run_once(size: int) -> dict[str, float]:
    value = b"x" * size
    topic = f"perf-{size}-{uuid.uuid4().hex[:8]}"
    out: dict[str, float] = {}
    async with open_kafka_bus(_settings()) as bus:
        await bus.ensure_topics([topic], partitions=3)
        await bus.publish(topic, value, key=b"warm")  # metadata + connection warm-up

        start = time.perf_counter()
        for i in range(SEQ_N):
            await bus.publish(topic, value, key=f"k{i % 32}".encode())
        out["publish_seq_per_s"] = SEQ_N / (time.perf_counter() - start)

        start = time.perf_counter()
        for base in range(0, BATCH_N, BATCH):
            await bus.publish_many(
                [(topic, f"k{i % 32}".encode(), value, ()) for i in range(base, base + BATCH)]
            )
        out["publish_batched_per_s"] = BATCH_N / (time.perf_counter() - start)

        total = SEQ_N + BATCH_N + 1
        got = 0
        async with bus.subscribe([topic], f"perf-{uuid.uuid4().hex[:8]}") as sub:
            first = await sub.get_batch(timeout_s=30)  # includes the group join
            got += len(first)
            await sub.commit(first)
            start = time.perf_counter()
            while got < total:
                batch = await sub.get_batch(max_records=500, timeout_s=5)
                if not batch:
                    break
                got += len(batch)
                await sub.commit(batch)
            out["consume_per_s"] = (got - len(first)) / (time.perf_counter() - start)

        lat_topic = topic + "-lat"
        await bus.ensure_topics([lat_topic], partitions=3)
        latencies: list[float] = []
        async with bus.subscribe([lat_topic], f"perf-lat-{uuid.uuid4().hex[:8]}") as sub:
            with trio.fail_after(60):
                while not sub.assignment():
                    await sub.get_batch(timeout_s=0.2)

            async def produce() -> None:
                interval = 1 / RATE
                next_at = trio.current_time()
                for i in range(LAT_N):
                    stamp = struct.pack("!d", time.perf_counter())
                    await bus.publish(lat_topic, stamp + value[8:], key=f"k{i % 32}".encode())
                    next_at += interval
                    await trio.sleep_until(next_at)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                while len(latencies) < LAT_N:
                    batch = await sub.get_batch(max_records=500, timeout_s=5)
                    now = time.perf_counter()
                    if not batch:
                        break
                    latencies += [now - struct.unpack("!d", r.value[:8])[0] for r in batch]
                    await sub.commit(batch)
        out["lat_p50_ms"] = percentile(latencies, 50) * 1000
        out["lat_p99_ms"] = percentile(latencies, 99) * 1000
    return out


def main() -> None:
    results: dict[int, dict[str, float]] = {}
    for size in (64, 1024):
        runs = [trio.run(_run_once, size) for _ in range(RUNS)]
        results[size] = {key: median([r[key] for r in runs]) for key in runs[0]}
        print(size, results[size], flush=True)
    rows = [
        [
            f"{size} B",
            f"{r['publish_seq_per_s']:.0f}",
            f"{r['publish_batched_per_s']:.0f}",
            f"{r['consume_per_s']:.0f}",
            f"{r['lat_p50_ms']:.2f}",
            f"{r['lat_p99_ms']:.2f}",
        ]
        for size, r in results.items()
    ]
    write_report(
        "kafka_bus",
        title="KafkaBus on the local single-node broker (acks=all, idempotent)",
        columns=[
            "value",
            "publish seq/s",
            f"publish_many({BATCH}) rec/s",
            "consume+commit rec/s",
            f"latency p50 ms @{RATE}/s",
            "latency p99 ms",
        ],
        rows=rows,
        data={
            "results": {str(k): v for k, v in results.items()},
            "method": {
                "runs": RUNS,
                "seq_n": SEQ_N,
                "batch_n": BATCH_N,
                "batch": BATCH,
                "latency_n": LAT_N,
                "rate_per_s": RATE,
            },
        },
        notes=[
            f"median of {RUNS} runs; broker and benchmark share the 2-core box.",
            "latency = publish start -> record returned by get_batch in the consuming task.",
        ],
    )


if __name__ == "__main__":
    main()
