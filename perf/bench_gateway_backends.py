"""P1/P2: the gateway on a gRPC-backed read, and a 1 GiB streaming upload's memory.

* **P1**: USERS closed-loop clients (one keep-alive TLS connection and session each) on
  ``GET /v1/batches/{id}`` (gateway -> gRPC -> the real aggregator), p50/p95/p99 and errors;
* **P2**: the same read straight from ``ResultService.GetBatch`` over gRPC with the same
  concurrency, in the same run: the gateway's added latency and its throughput share;
* **upload**: one 1 GiB file streamed as multipart into ``POST /v1/batches/{id}/files``
  (gateway -> client-streaming gRPC -> the sandbox file backend, stored on disk); the
  gateway process's RSS sampled every 20 ms, and its peak growth over the idle baseline.

The gateway runs as ``python -m gateway`` (its own process, so its RSS and CPU are its own);
the sandbox identity/batch/file backends and the aggregator run in a second child process.

    python -m perf.bench_gateway_backends     # writes perf/results/gateway_backends.*
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import trio

from common.tls import client_context
from perf._report import percentile, write_report
from perf.bench_gateway import (
    MEASURE_S,
    SERVER_START_S,
    TEACHER,
    USERS,
    WARMUP_S,
    _drive_sync,
    _Server,
)

UPLOAD_BYTES = 1 << 30
UPLOAD_CHUNK = 1 << 20
RSS_SAMPLE_S = 0.02
ROOT = Path(__file__).resolve().parents[1]


# -- child processes ---------------------------------------------------------------------------


async def _serve_backends(folder: Path) -> None:
    from aggregator.serve import serve_aggregator
    from aggregator.settings import AggregatorSettings
    from common.bus import open_memory_bus
    from common.rpc import open_rpc_loop
    from deploy.sandbox.files import FileLimits
    from deploy.sandbox.identity import ScryptParams, serve_sandbox_identity
    from deploy.sandbox.serve import SandboxSettings, serve_sandbox_backends

    stop = trio.Event()
    async with open_rpc_loop(), open_memory_bus() as bus, trio.open_nursery() as nursery:
        identity = await nursery.start(
            partial(
                serve_sandbox_identity, scrypt=ScryptParams(n=2**10), shutdown_trigger=stop.wait
            )
        )
        sandbox = await nursery.start(
            partial(
                serve_sandbox_backends,
                SandboxSettings(
                    grpc_port=0,
                    state_dir=folder / "sandbox",
                    files=FileLimits(max_file_bytes=2 * UPLOAD_BYTES),
                ),
                bus=bus,
                shutdown_trigger=stop.wait,
            )
        )
        aggregator_stop = trio.Event()
        aggregator = await nursery.start(
            partial(
                serve_aggregator,
                AggregatorSettings(
                    grpc_port=0, ops_port=0, db_path=folder / "aggregator.db", log_level="warning"
                ),
                shutdown=aggregator_stop,
                bus=bus,
            )
        )
        ports = {"identity": identity, "sandbox": sandbox.port, "results": aggregator.grpc_port}
        print(json.dumps(ports), flush=True)
        await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
        aggregator_stop.set()
        stop.set()


def _start(args: list[str], log: Path, env: dict[str, str] | None = None) -> _Server:
    with log.open("wb") as err:
        process = subprocess.Popen(  # nosec B603 - our own interpreter and module
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env, cwd=ROOT
        )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=SERVER_START_S)
        raise RuntimeError(f"{args} did not start:\n{log.read_text()[-4000:]}")
    return _Server(process, json.loads(line), log)


def _start_gateway(folder: Path, ports: dict[str, int]) -> _Server:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HULEEDU_")}
    roomy = {"LIMIT": "1000000", "PERIOD_S": "1", "BURST": "1000000"}
    env.update(
        {
            "HULEEDU_GATEWAY_PORT": "0",
            "HULEEDU_GATEWAY_OPS_PORT": "0",
            "HULEEDU_GATEWAY_STATE_DIR": str(folder / "gateway"),
            "HULEEDU_GATEWAY_LOG_LEVEL": "warning",
            "HULEEDU_GATEWAY_IDENTITY_TARGET": f"127.0.0.1:{ports['identity']}",
            "HULEEDU_GATEWAY_BATCH_BACKEND__TARGET": f"127.0.0.1:{ports['sandbox']}",
            "HULEEDU_GATEWAY_FILE_BACKEND__TARGET": f"127.0.0.1:{ports['sandbox']}",
            "HULEEDU_GATEWAY_RESULT_BACKEND__TARGET": f"127.0.0.1:{ports['results']}",
            "HULEEDU_GATEWAY_UPLOAD_MAX_FILE_BYTES": str(2 * UPLOAD_BYTES),
            "HULEEDU_GATEWAY_UPLOAD_MAX_TOTAL_BYTES": str(2 * UPLOAD_BYTES),
            **{
                f"HULEEDU_GATEWAY_LIMIT_{p}__{k}": v
                for p in ("USER", "ADDRESS", "LOGIN_ADDRESS", "LOGIN_ACCOUNT")
                for k, v in roomy.items()
            },
        }
    )
    return _start([sys.executable, "-m", "gateway"], folder / "gateway.log", env)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# -- the runs ------------------------------------------------------------------------------------


def _prepare(url: str, ca_file: str) -> tuple[list[str], str, str]:
    """USERS sessions and a batch with three essays and a finished pipeline."""
    verify = client_context(ca_file)
    with httpx.Client(base_url=url, verify=verify, timeout=30) as client:
        tokens = []
        for _ in range(USERS):
            reply = client.post(
                "/v1/auth/login", json={"email": TEACHER[0], "password": TEACHER[1]}
            )
            reply.raise_for_status()
            tokens.append(str(reply.json()["access_token"]))
        auth = {"Authorization": f"Bearer {tokens[0]}"}
        batch = client.post(
            "/v1/batches",
            json={"course_code": "ENG5", "essay_instructions": "Bench.", "expected_essay_count": 3},
            headers=auth,
        ).json()
        batch_id = batch["batch_id"]
        body, content_type = _multipart_small()
        client.post(
            f"/v1/batches/{batch_id}/files",
            content=body,
            headers={**auth, "content-type": content_type},
        ).raise_for_status()
        client.post(
            f"/v1/batches/{batch_id}/pipelines",
            json={"phases": ["spellcheck", "cj_assessment"]},
            headers=auth,
        ).raise_for_status()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            view = client.get(f"/v1/batches/{batch_id}", headers=auth).json()
            if view.get("status") == "completed_successfully":
                break
            time.sleep(0.1)
        user_id = client.get("/v1/auth/me", headers=auth).json()["user_id"]
    return tokens, batch_id, user_id


def _multipart_small() -> tuple[bytes, str]:
    out = bytearray()
    for i in range(3):
        out += (
            f'--b0undary\r\nContent-Disposition: form-data; name="files"; '
            f'filename="essay{i}.txt"\r\nContent-Type: text/plain\r\n\r\n'
        ).encode()
        out += f"Essay number {i}. ".encode() * 200 + b"\r\n"
    out += b"--b0undary--\r\n"
    return bytes(out), "multipart/form-data; boundary=b0undary"


async def _direct(port: int, batch_id: str, user_id: str, users: int) -> dict[str, Any]:
    """``users`` concurrent callers of ResultService.GetBatch (what the gateway route calls)."""
    from common.contracts.huleedu.common import v1 as common_v1
    from common.contracts.huleedu.results import v1 as results_v1
    from common.rpc import open_channel, open_rpc_loop

    latencies: list[float] = []
    errors = 0
    measuring = False
    done = False
    async with open_rpc_loop(), open_channel(f"127.0.0.1:{port}", service="results") as channel:
        stub = channel.stub(results_v1.ResultServiceStub)
        request = results_v1.GetBatchRequest(
            actor=common_v1.Actor(user_id=user_id), batch_id=batch_id, include_essays=True
        )

        async def caller() -> None:
            nonlocal errors
            while not done:
                started = time.perf_counter()
                try:
                    await channel.call(stub.get_batch, request, idempotent=True)
                except Exception:
                    errors += 1
                    continue
                if measuring:
                    latencies.append(time.perf_counter() - started)

        async with trio.open_nursery() as nursery:
            for _ in range(users):
                nursery.start_soon(caller)
            await trio.sleep(WARMUP_S)
            measuring = True
            t0 = time.perf_counter()
            await trio.sleep(MEASURE_S)
            measuring = False
            elapsed = time.perf_counter() - t0
            done = True
    n = len(latencies)
    return {
        "requests": n,
        "rps": n / elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p95_ms": percentile(latencies, 95) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "errors": errors,
    }


def _upload_stream(total: int) -> Iterator[bytes]:
    head = (
        b'--b1gboundary\r\nContent-Disposition: form-data; name="files"; '
        b'filename="huge.txt"\r\nContent-Type: text/plain\r\n\r\n'
    )
    yield head
    block = (b"All work and no play makes a long essay. " * 26000)[:UPLOAD_CHUNK]
    sent = 0
    while sent < total:
        piece = block[: min(UPLOAD_CHUNK, total - sent)]
        sent += len(piece)
        yield piece
    yield b"\r\n--b1gboundary--\r\n"


def _upload(gateway: _Server, token: str) -> dict[str, Any]:
    url, ca_file = gateway.info["url"], gateway.info["ca_file"]
    verify = client_context(ca_file)
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, verify=verify, timeout=600) as client:
        batch_id = client.post(
            "/v1/batches",
            json={"course_code": "BIG", "essay_instructions": "Bench.", "expected_essay_count": 1},
            headers=auth,
        ).json()["batch_id"]
        pid = gateway.process.pid
        baseline = _rss_kib(pid)
        samples: list[int] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append(_rss_kib(pid))
                time.sleep(RSS_SAMPLE_S)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        reply = client.post(
            f"/v1/batches/{batch_id}/files",
            content=_upload_stream(UPLOAD_BYTES),
            headers={**auth, "content-type": "multipart/form-data; boundary=b1gboundary"},
        )
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join()
    reply.raise_for_status()
    stored = reply.json()["files"][0]
    expected = hashlib.sha256()
    for piece in list(_upload_stream(UPLOAD_BYTES))[1:-1]:
        expected.update(piece)
    return {
        "bytes": UPLOAD_BYTES,
        "seconds": elapsed,
        "mb_per_s": UPLOAD_BYTES / elapsed / 1e6,
        "rss_baseline_mib": baseline / 1024,
        "rss_peak_mib": max(samples) / 1024,
        "rss_growth_mib": (max(samples) - baseline) / 1024,
        "rss_samples": len(samples),
        "stored_size_ok": stored["size_bytes"] == UPLOAD_BYTES,
        "stored_sha_ok": stored["sha256"] == expected.hexdigest(),
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-backends":
        from common.logs import configure_logging

        configure_logging(service="bench-backends", level="warning")
        trio.run(_serve_backends, Path(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backends = _start(
            [sys.executable, "-m", "perf.bench_gateway_backends", "--serve-backends", tmp],
            folder / "backends.log",
        )
        try:
            ports = {k: int(v) for k, v in backends.info.items()}
            gateway = _start_gateway(folder, ports)
            try:
                url, ca_file = gateway.info["url"], gateway.info["ca_file"]
                tokens, batch_id, user_id = _prepare(url, ca_file)
                p1 = _drive_sync(url, f"/v1/batches/{batch_id}", tokens, ca_file, False, gateway)
                print(f"P1 gateway: {p1}", flush=True)
                direct = trio.run(_direct, ports["results"], batch_id, user_id, USERS)
                print(f"P2 direct: {direct}", flush=True)
                # Unloaded: one user at a time, where latency is cost, not queueing.
                path = f"/v1/batches/{batch_id}"
                solo = _drive_sync(url, path, tokens[:1], ca_file, False, gateway)
                print(f"P2 gateway c=1: {solo}", flush=True)
                solo_direct = trio.run(_direct, ports["results"], batch_id, user_id, 1)
                print(f"P2 direct c=1: {solo_direct}", flush=True)
                upload = _upload(gateway, tokens[0])
                print(f"upload: {upload}", flush=True)
            finally:
                gateway.process.send_signal(signal.SIGTERM)  # python -m gateway drains on it
                gateway.stop()
        finally:
            backends.stop()
    _report(p1, direct, solo, solo_direct, upload)


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _report(
    p1: dict[str, Any],
    direct: dict[str, Any],
    solo: dict[str, Any],
    solo_direct: dict[str, Any],
    upload: dict[str, Any],
) -> None:
    overhead = solo["p50_ms"] - solo_direct["p50_ms"]
    share = p1["rps"] / direct["rps"]
    p1_met = p1["p95_ms"] <= 50 and p1["p99_ms"] <= 100 and p1["errors"] == 0
    rows = [
        [
            f"P1 gateway GET /v1/batches/{{id}} (c={USERS}, TLS h1.1)",
            f"{p1['rps']:.0f}",
            f"{p1['p50_ms']:.1f} / {p1['p95_ms']:.1f} / {p1['p99_ms']:.1f}",
            str(p1["errors"]),
            f"p95 <= 50, p99 <= 100, 0 errors: {'met' if p1_met else 'NOT met'}",
        ],
        [
            f"P2 reference: ResultService.GetBatch direct over gRPC (c={USERS})",
            f"{direct['rps']:.0f}",
            f"{direct['p50_ms']:.1f} / {direct['p95_ms']:.1f} / {direct['p99_ms']:.1f}",
            str(direct["errors"]),
            "",
        ],
        [
            "P2 one user at a time: gateway route / direct call",
            f"{solo['rps']:.0f} / {solo_direct['rps']:.0f}",
            f"{solo['p50_ms']:.2f} / {solo_direct['p50_ms']:.2f} (p50)",
            str(solo["errors"] + solo_direct["errors"]),
            f"overhead p50 +{overhead:.2f} ms <= +1.5 ms: {_met(overhead <= 1.5)}",
        ],
        [
            "P2 throughput at c=100: gateway / direct",
            f"{share:.0%}",
            "",
            "",
            "",
        ],
        [
            "1 GiB multipart upload, gateway RSS",
            f"{upload['mb_per_s']:.0f} MB/s",
            f"growth {upload['rss_growth_mib']:.1f} MiB (baseline "
            f"{upload['rss_baseline_mib']:.0f}, peak {upload['rss_peak_mib']:.0f})",
            "0" if upload["stored_sha_ok"] and upload["stored_size_ok"] else "1",
            f"< 50 MB: {'met' if upload['rss_growth_mib'] * 1.048576 < 50 else 'NOT met'}",
        ],
    ]
    notes = [
        f"{USERS} closed-loop users, {WARMUP_S:g} s warm-up, {MEASURE_S:g} s measured; "
        "the gateway is `python -m gateway` in its own process; the aggregator (its query "
        "cache on, as deployed) and the sandbox backends share a second process; the load "
        "client is a third. All on one 2-core machine, so the client's and the backends' "
        "CPU compete with the gateway's.",
        "The direct reference runs the same concurrency over one gRPC channel from a Trio "
        "client, i.e. what the gateway itself does per request.",
        "Upload: one file of 1 GiB (text), 1 MiB client writes; RSS sampled every "
        f"{RSS_SAMPLE_S * 1000:.0f} ms from /proc; the stored file's size and SHA-256 "
        "checked against what was sent.",
    ]
    write_report(
        "gateway_backends",
        title="Gateway on gRPC-backed reads (P1, P2) and a 1 GiB streaming upload",
        columns=["measure", "rps", "p50 / p95 / p99 ms", "errors", "target"],
        rows=rows,
        data={
            "p1": p1,
            "direct": direct,
            "solo": solo,
            "solo_direct": solo_direct,
            "upload": upload,
        },
        notes=notes,
    )


if __name__ == "__main__":
    main()
