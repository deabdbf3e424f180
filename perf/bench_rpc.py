"""P12: the gRPC bridge tax - unary round trips through ``common/rpc`` (Trio on both ends,
grpclib under trio-asyncio) vs plain asyncio grpclib with the same messages, in one run.

The plain baseline runs in a child process (importing trio-asyncio replaces asyncio's loop
policy for the whole process). Rounds alternate baseline and ours; each round has RUNS runs of
CALLS calls, sequential (one caller) and concurrent (16 callers), after WARMUP calls.

    python -m perf.bench_rpc            # full benchmark, writes perf/results/rpc_bridge.*
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from functools import partial
from typing import Any

ROUNDS = 2
RUNS = 3
CALLS = 2000
WARMUP = 200
CONCURRENCY = 16


def _request() -> Any:
    from common.contracts.huleedu.common import v1 as common_v1
    from common.contracts.huleedu.results import v1 as results_v1

    return results_v1.GetBatchRequest(
        actor=common_v1.Actor(user_id="u-123", org_id="o-1", roles=["teacher"]),
        batch_id="b-0001",
        include_essays=False,
    )


def _response(batch_id: str) -> Any:
    from common.contracts.huleedu.results import v1 as results_v1

    return results_v1.GetBatchResponse(
        batch=results_v1.BatchView(
            batch_id=batch_id,
            owner_user_id="u-123",
            course_code="ENG5",
            status=results_v1.BatchStatus.PROCESSING,
            expected_essay_count=25,
            essays_received=25,
            version=7,
        )
    )


# -- the plain asyncio baseline (child process) ------------------------------------------------


async def _baseline_async() -> dict[str, list[float]]:
    from grpclib.client import Channel
    from grpclib.server import Server

    from common.contracts.huleedu.results import v1 as results_v1

    class Plain(results_v1.ResultServiceBase):
        async def get_batch(self, message: Any) -> Any:
            return _response(message.batch_id)

    server = Server([Plain()])
    await server.start("127.0.0.1", 0)
    port = server._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    channel = Channel("127.0.0.1", port)
    stub = results_v1.ResultServiceStub(channel)
    request = _request()
    out: dict[str, list[float]] = {"seq": [], "c16": [], "lat": []}
    for _ in range(WARMUP):
        await stub.get_batch(request, timeout=10)
    for _ in range(RUNS):
        start = time.perf_counter()
        for _ in range(CALLS):
            t = time.perf_counter()
            await stub.get_batch(request, timeout=10)
            out["lat"].append(time.perf_counter() - t)
        out["seq"].append(CALLS / (time.perf_counter() - start))

        async def worker(n: int) -> None:
            for _ in range(n):
                await stub.get_batch(request, timeout=10)

        start = time.perf_counter()
        await asyncio.gather(*(worker(CALLS // CONCURRENCY) for _ in range(CONCURRENCY)))
        out["c16"].append(CALLS // CONCURRENCY * CONCURRENCY / (time.perf_counter() - start))
    channel.close()
    server.close()
    await server.wait_closed()
    return out


# -- ours ------------------------------------------------------------------------------------


async def _ours_async() -> dict[str, list[float]]:
    import trio

    from common.contracts.huleedu.results import v1 as results_v1
    from common.rpc import open_channel, open_rpc_loop, serve_grpc

    class TrioResults(results_v1.ResultServiceBase):
        async def get_batch(self, message: Any) -> Any:
            return _response(message.batch_id)

    out: dict[str, list[float]] = {"seq": [], "c16": [], "lat": []}
    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_grpc, [TrioResults()]))
        async with open_channel(f"127.0.0.1:{port}", service="results") as channel:
            stub = channel.stub(results_v1.ResultServiceStub)
            request = _request()
            for _ in range(WARMUP):
                await channel.call(stub.get_batch, request)
            for _ in range(RUNS):
                start = time.perf_counter()
                for _ in range(CALLS):
                    t = time.perf_counter()
                    await channel.call(stub.get_batch, request)
                    out["lat"].append(time.perf_counter() - t)
                out["seq"].append(CALLS / (time.perf_counter() - start))

                async def worker(n: int) -> None:
                    for _ in range(n):
                        await channel.call(stub.get_batch, request)

                start = time.perf_counter()
                async with trio.open_nursery() as workers:
                    for _ in range(CONCURRENCY):
                        workers.start_soon(worker, CALLS // CONCURRENCY)
                out["c16"].append(
                    CALLS // CONCURRENCY * CONCURRENCY / (time.perf_counter() - start)
                )
        nursery.cancel_scope.cancel()
    return out


def _ours() -> dict[str, list[float]]:
    import trio

    return trio.run(_ours_async)


def _baseline_in_child() -> dict[str, list[float]]:
    result = subprocess.run(
        [sys.executable, "-m", "perf.bench_rpc", "--baseline"],
        capture_output=True,
        text=True,
        check=True,
    )
    data: dict[str, list[float]] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


def main() -> None:
    from perf._report import median, percentile, write_report

    totals: dict[str, dict[str, list[float]]] = {
        "plain": {"seq": [], "c16": [], "lat": []},
        "ours": {"seq": [], "c16": [], "lat": []},
    }
    for round_no in range(ROUNDS):
        for name, run in (("plain", _baseline_in_child), ("ours", _ours)):
            data = run()
            for key in ("seq", "c16", "lat"):
                totals[name][key] += data[key]
            print(
                f"round {round_no + 1} {name}: seq {median(data['seq']):.0f}/s "
                f"c16 {median(data['c16']):.0f}/s",
                flush=True,
            )
    summary: dict[str, dict[str, float]] = {}
    for name, data in totals.items():
        summary[name] = {
            "seq_per_s": median(data["seq"]),
            "c16_per_s": median(data["c16"]),
            "p50_ms": percentile(data["lat"], 50) * 1000,
            "p99_ms": percentile(data["lat"], 99) * 1000,
        }
    ratio_seq = summary["ours"]["seq_per_s"] / summary["plain"]["seq_per_s"]
    ratio_c16 = summary["ours"]["c16_per_s"] / summary["plain"]["c16_per_s"]
    rows = [
        [
            label,
            f"{summary[k]['seq_per_s']:.0f}",
            f"{summary[k]['c16_per_s']:.0f}",
            f"{summary[k]['p50_ms']:.3f}",
            f"{summary[k]['p99_ms']:.3f}",
        ]
        for k, label in (
            ("plain", "grpclib, plain asyncio"),
            ("ours", "common/rpc (Trio both ends)"),
        )
    ]
    rows.append(
        ["ratio ours / plain (P12, target >= 0.8)", f"{ratio_seq:.2f}", f"{ratio_c16:.2f}", "", ""]
    )
    write_report(
        "rpc_bridge",
        title="P12: gRPC bridge tax (unary GetBatch, one process, loopback)",
        columns=["path", "seq calls/s", "c16 calls/s", "seq p50 ms", "seq p99 ms"],
        rows=rows,
        data={
            "summary": summary,
            "ratio_seq": ratio_seq,
            "ratio_c16": ratio_c16,
            "method": {
                "rounds": ROUNDS,
                "runs": RUNS,
                "calls": CALLS,
                "warmup": WARMUP,
                "concurrency": CONCURRENCY,
            },
        },
        notes=[
            f"{ROUNDS} interleaved rounds x {RUNS} runs x {CALLS} calls, medians; "
            f"{WARMUP} warm-up calls; the plain baseline runs in a child process.",
            "Ours includes what production calls carry: client and server spans (no-op "
            "provider), traceparent and correlation-id metadata, deadline from the Trio scope.",
        ],
    )
    print(f"P12 ratio: seq {ratio_seq:.2f}, c16 {ratio_c16:.2f}")


if __name__ == "__main__":
    if "--baseline" in sys.argv:
        print(json.dumps(asyncio.run(_baseline_async())))
    else:
        main()
