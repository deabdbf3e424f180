"""P5/P6/P10 for the WebSocket manager: fan-out to 1000 connections over TLS.

A child process runs the gateway (token authority, JWKS) and the wsmanager on the memory bus;
this process opens CONNECTIONS authenticated trio-websocket connections of one user and drives
the child over stdin:

* **P10**: the child's RSS before and after the connections are open (per-connection cost
  of an idle authenticated WSS connection, TLS included);
* **P6**: one event to all CONNECTIONS subscribers: time from the publish (child's monotonic
  clock, the same clock in every process on Linux) to the last client's receipt, over ROUNDS
  rounds (p50/p99 of the per-round last-arrival latency and of all arrivals);
* **P5**: BURST events published back to back: deliveries per second until every client has
  all of them, and the child's CPU per delivery.

The load client shares the 2-core machine with the server: its own receive cost (Python
trio-websocket) is large, so these are lower bounds of what the server can do.

    python -m perf.bench_wsmanager      # writes perf/results/wsmanager.*
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio_websocket

from common.tls import client_context
from perf._report import percentile, write_report

CONNECTIONS = 1000
ROUNDS = 20
BURST = 50
ORIGIN = "https://bench.huleedu.test"
USER = "bench-user"
ROOT = Path(__file__).resolve().parents[1]


# -- the child ----------------------------------------------------------------------------------


async def _serve(folder: Path) -> None:
    from common.bus import open_memory_bus
    from common.contracts.huleedu.events import v1 as events_v1
    from common.events import envelope_headers, make_envelope
    from common.rpc import open_rpc_loop
    from common.tokens import TokenSigner
    from deploy.sandbox.identity import ScryptParams, serve_sandbox_identity
    from gateway.keys import load_signing_keys
    from gateway.serve import serve_gateway
    from gateway.settings import GatewaySettings
    from wsmanager.serve import serve_wsmanager
    from wsmanager.settings import WsManagerSettings

    stop = trio.Event()
    async with open_rpc_loop(), open_memory_bus() as bus, trio.open_nursery() as nursery:
        identity = await nursery.start(
            partial(
                serve_sandbox_identity, scrypt=ScryptParams(n=2**10), shutdown_trigger=stop.wait
            )
        )
        gw_settings = GatewaySettings(
            port=0,
            ops_port=0,
            state_dir=folder,
            identity_target=f"127.0.0.1:{identity}",
            log_level="warning",
        )
        gateway = await nursery.start(partial(serve_gateway, gw_settings, shutdown=stop, bus=bus))
        ws_settings = WsManagerSettings(
            port=0,
            ops_port=0,
            state_dir=folder,
            jwks_url=f"{gateway.url}/.well-known/jwks.json",
            jwks_ca_file=Path(gateway.ca_file),
            allowed_origins=(ORIGIN,),
            max_connections_per_user=CONNECTIONS,
            send_queue_frames=BURST * 2,
            log_level="warning",
        )
        ws = await nursery.start(partial(serve_wsmanager, ws_settings, shutdown=stop, bus=bus))
        keys = load_signing_keys(gw_settings.under_state(gw_settings.keys_dir))
        signer = TokenSigner(
            keys.private,
            keys.kid,
            issuer=gw_settings.issuer,
            audience=gw_settings.audience,
            ttl_s=900,
        )
        token = signer.issue(sub=USER, org="org", roles=("teacher",), sid="s1", now=time.time())
        await trio.sleep(1.5)  # the consumer catches up (empty topic)
        print(json.dumps({"url": ws.url, "ca_file": ws.ca_file, "token": token}), flush=True)

        async def publish(count: int) -> float:
            first = 0.0
            for i in range(count):
                envelope = make_envelope(
                    events_v1.TeacherNotificationRequested(
                        teacher_id=USER,
                        notification_type="batch_status_changed",
                        category=events_v1.NotificationCategory.BATCH_PROGRESS,
                        batch_id="b1",
                        payload_json=f'{{"batch_id":"b1","status":"processing","n":{i}}}',
                    ),
                    source_service="bench",
                    user_id=USER,
                )
                if i == 0:
                    first = time.monotonic()
                await bus.publish(
                    envelope.event_type,
                    bytes(envelope),
                    key=USER.encode(),
                    headers=envelope_headers(envelope),
                )
            return first

        stdin = trio.lowlevel.FdStream(os.dup(0))
        buffer = b""
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, _, buffer = buffer.partition(b"\n")
                count = int(line.decode().split()[1])
                t0 = await publish(count)
                print(json.dumps({"t0": t0}), flush=True)
        stop.set()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the driver ---------------------------------------------------------------------------------


async def _drive(child: subprocess.Popen[bytes], info: dict[str, Any]) -> dict[str, Any]:
    assert child.stdin is not None and child.stdout is not None
    context = client_context(info["ca_file"], alpn=["http/1.1"])
    rss_before = _rss_kib(child.pid)
    arrivals: list[list[float]] = []
    expected = 0
    all_in = trio.Event()
    received = [0] * CONNECTIONS
    sockets: list[trio_websocket.WebSocketConnection] = []

    async def client(index: int, task_status: trio.TaskStatus[None]) -> None:
        async with trio_websocket.open_websocket_url(
            f"{info['url']}/v1/ws",
            context,
            extra_headers=[(b"origin", ORIGIN.encode())],
            message_queue_size=BURST * 2,
        ) as socket:
            await socket.send_message(json.dumps({"type": "auth", "token": info["token"]}))
            assert json.loads(await socket.get_message())["type"] == "welcome"
            sockets.append(socket)
            task_status.started()
            while True:
                text = await socket.get_message()
                if '"type":"event"' not in text:
                    continue
                now = time.monotonic()
                received[index] += 1
                if arrivals:
                    arrivals[-1].append(now)
                if sum(received) >= expected and expected:
                    all_in.set()

    def command(count: int) -> float:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(f"pub {count}\n".encode())
        child.stdin.flush()
        return float(json.loads(child.stdout.readline())["t0"])

    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as nursery:

        async def start_one(i: int) -> None:
            async with limiter:
                await nursery.start(client, i)

        async with trio.open_nursery() as starting:
            for i in range(CONNECTIONS):
                starting.start_soon(start_one, i)
        await trio.sleep(1.0)
        rss_after = _rss_kib(child.pid)

        latencies_last, latencies_all = [], []
        for _ in range(ROUNDS):
            all_in = trio.Event()
            arrivals.append([])
            expected = sum(received) + CONNECTIONS
            t0 = await trio.to_thread.run_sync(command, 1)
            with trio.fail_after(30):
                await all_in.wait()
            latencies_last.append(max(arrivals[-1]) - t0)
            latencies_all += [a - t0 for a in arrivals[-1]]
            await trio.sleep(0.2)

        all_in = trio.Event()
        arrivals.append([])
        expected = sum(received) + CONNECTIONS * BURST
        cpu0 = _cpu_s(child.pid)
        t0 = await trio.to_thread.run_sync(command, BURST)
        with trio.fail_after(120):
            await all_in.wait()
        burst_s = max(arrivals[-1]) - t0
        cpu1 = _cpu_s(child.pid)
        nursery.cancel_scope.cancel()
    deliveries = CONNECTIONS * BURST
    return {
        "connections": CONNECTIONS,
        "rss_before_mib": rss_before / 1024,
        "rss_after_mib": rss_after / 1024,
        "rss_per_connection_kib": (rss_after - rss_before) / CONNECTIONS,
        "p6_last_arrival_ms": {
            "p50": percentile(latencies_last, 50) * 1e3,
            "p99": percentile(latencies_last, 99) * 1e3,
        },
        "p6_all_arrivals_ms": {
            "p50": percentile(latencies_all, 50) * 1e3,
            "p99": percentile(latencies_all, 99) * 1e3,
        },
        "p5_burst": {
            "events": BURST,
            "deliveries": deliveries,
            "seconds": burst_s,
            "deliveries_per_s": deliveries / burst_s,
            "server_cpu_s": cpu1 - cpu0,
            "deliveries_per_server_cpu_s": deliveries / max(cpu1 - cpu0, 1e-9),
        },
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        from common.logs import configure_logging

        configure_logging(service="bench-ws", level="warning")
        trio.run(_serve, Path(sys.argv[2]))
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "child.log"
        with log.open("wb") as err:
            child = subprocess.Popen(  # nosec B603 - our own interpreter and module
                [sys.executable, "-m", "perf.bench_wsmanager", "--serve", tmp],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=ROOT,
            )
        assert child.stdout is not None
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(log.read_text()[-3000:])
        try:
            result = trio.run(_drive, child, json.loads(line))
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=30)
    print(json.dumps(result, indent=2))
    p5 = result["p5_burst"]
    rows = [
        [
            "P10 RSS per idle authenticated WSS connection (TLS)",
            f"{result['rss_per_connection_kib']:.1f} KiB",
            f"{CONNECTIONS} connections: {result['rss_before_mib']:.0f} -> "
            f"{result['rss_after_mib']:.0f} MiB",
            "<= 32 KiB",
        ],
        [
            "P6 one event to all subscribers, last arrival",
            f"p50 {result['p6_last_arrival_ms']['p50']:.1f} / p99 "
            f"{result['p6_last_arrival_ms']['p99']:.1f} ms",
            f"all arrivals p50 {result['p6_all_arrivals_ms']['p50']:.1f} / p99 "
            f"{result['p6_all_arrivals_ms']['p99']:.1f} ms",
            "p99 <= 50 ms",
        ],
        [
            "P5 burst fan-out",
            f"{p5['deliveries_per_s']:.0f} deliveries/s (wall)",
            f"{p5['deliveries_per_server_cpu_s']:.0f} deliveries per server CPU-second",
            ">= 20k/s/core",
        ],
    ]
    write_report(
        "wsmanager",
        title=f"WebSocket manager fan-out to {CONNECTIONS} TLS connections (P5, P6, P10)",
        columns=["measure", "result", "detail", "target"],
        rows=rows,
        data=result,
        notes=[
            "One 2-core machine: the Python load client (trio-websocket over TLS, 1000 "
            "connections) competes with the server for CPU, so wall-clock numbers are lower "
            "bounds; server CPU per delivery is the fairer P5 figure.",
            "The server process also runs the gateway (idle) and the sandbox identity; RSS "
            "is the delta from opening the connections.",
            f"P6: {ROUNDS} rounds of one event; P5: {BURST} events back to back to all "
            f"{CONNECTIONS} connections.",
        ],
    )


if __name__ == "__main__":
    main()
