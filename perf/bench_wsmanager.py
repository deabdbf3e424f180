"""P5/P6/P7/P10/P11 for the WebSocket manager: fan-out to 1000 connections over TLS.

A child process runs the gateway (token authority, JWKS) and the wsmanager on the memory bus;
this process opens CONNECTIONS authenticated trio-websocket connections of one user and drives
the child over stdin:

* **P10**: the child's RSS before and after the connections are open (per-connection cost
  of an idle authenticated WSS connection, TLS included);
* **P6**: one event to all CONNECTIONS subscribers: time from the publish (child's monotonic
  clock, the same clock in every process on Linux) to the last client's receipt, over ROUNDS
  rounds (p50/p99 of the per-round last-arrival latency and of all arrivals);
* **P5**: BURST events published back to back: deliveries per second until every client has
  all of them, and the child's CPU per delivery;
* **P7** (when ``KAFKA_BOOTSTRAP`` names a broker): a second child whose wsmanager reads the
  REAL Kafka broker; P7_EVENTS events are produced to it at P7_RATE_PER_S, each carrying its
  publish time (monotonic, taken just before the produce call), to CONNECTIONS clients:
  p50/p99 of publish -> frame received over all deliveries;
* **P11**: a reconnect storm: the CONNECTIONS clients drop their sockets together, one
  event is published while they are away, and all reconnect at once with ``since``; the time
  until every client has its welcome and the missed event;
* **P10 at scale** (``--p10 N``): a third child, N connections spread over N/1000 users (the
  per-user cap), RSS only.

The load client shares the 2-core machine with the server: its own receive cost (Python
trio-websocket) is large, so these are lower bounds of what the server can do.

    python -m perf.bench_wsmanager                  # writes perf/results/wsmanager.*
    KAFKA_BOOTSTRAP=127.0.0.1:19093 python -m perf.bench_wsmanager --p10 10000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio
import trio_websocket

from common.tls import client_context
from perf._report import percentile, write_report

CONNECTIONS = 1000
ROUNDS = 20
BURST = 50
#: P7: events produced to Kafka and their pace (x CONNECTIONS = deliveries per second).
P7_EVENTS = 200
P7_RATE_PER_S = 5.0
#: P7 again at a tenth of the connections: the pipeline's latency when the box is not full.
P7_LIGHT_CONNECTIONS = 100
#: The wsmanager's cap on connections of one user (its settings allow at most 1000).
PER_USER = 1000
ORIGIN = "https://bench.huleedu.test"
ROOT = Path(__file__).resolve().parents[1]


# -- the child ----------------------------------------------------------------------------------


async def _serve(folder: Path, connections: int, kafka_bootstrap: str) -> None:
    import httpx

    from common.bus import open_memory_bus, open_service_bus
    from common.contracts.huleedu.events import v1 as events_v1
    from common.events import envelope_headers, make_envelope
    from common.rpc import open_rpc_loop
    from common.settings import KafkaSettings
    from common.tokens import TokenSigner
    from deploy.sandbox.identity import ScryptParams, serve_sandbox_identity
    from gateway.keys import load_signing_keys
    from gateway.serve import serve_gateway
    from gateway.settings import GatewaySettings
    from wsmanager.serve import serve_wsmanager
    from wsmanager.settings import WsManagerSettings

    stop = trio.Event()
    # A fresh user per run: a Kafka topic keeps earlier runs' events (the consumer reads from
    # the earliest record), and those must go to nobody here.
    users = [f"bench-{uuid.uuid4().hex[:8]}-{i}" for i in range(math.ceil(connections / PER_USER))]
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap, client_id="bench-ws")
    async with (
        open_rpc_loop(),
        open_memory_bus() as memory_bus,
        open_service_bus(kafka) as bus,
        trio.open_nursery() as nursery,
    ):
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
        gateway = await nursery.start(
            partial(serve_gateway, gw_settings, shutdown=stop, bus=memory_bus)
        )
        ws_settings = WsManagerSettings(
            port=0,
            ops_port=0,
            state_dir=folder,
            jwks_url=f"{gateway.url}/.well-known/jwks.json",
            jwks_ca_file=Path(gateway.ca_file),
            allowed_origins=(ORIGIN,),
            max_connections_per_user=min(connections, PER_USER),
            send_queue_frames=BURST * 2,
            kafka=kafka,  # P7: the wsmanager opens its own bus on the broker, as in production
            service_name=f"bench-ws-{uuid.uuid4().hex[:8]}",
            log_level="warning",
        )
        ws = await nursery.start(
            partial(
                serve_wsmanager,
                ws_settings,
                shutdown=stop,
                bus=None if kafka_bootstrap else bus,
            )
        )
        keys = load_signing_keys(gw_settings.under_state(gw_settings.keys_dir))
        signer = TokenSigner(
            keys.private,
            keys.kid,
            issuer=gw_settings.issuer,
            audience=gw_settings.audience,
            ttl_s=900,
        )
        tokens = [
            signer.issue(sub=user, org="org", roles=("teacher",), sid="s1", now=time.time())
            for user in users
        ]
        async with httpx.AsyncClient() as ops:
            # Ready = the consumer has caught up with the topic (polled from outside, as a
            # load balancer would).
            for _ in range(1200):
                if (await ops.get(f"{ws.ops_url}/readyz")).status_code == 200:
                    break
                await trio.sleep(0.1)
            else:
                raise RuntimeError("the wsmanager never became ready")
        print(json.dumps({"url": ws.url, "ca_file": ws.ca_file, "tokens": tokens}), flush=True)

        async def publish(count: int, rate_per_s: float = 0.0) -> float:
            first = 0.0
            start = trio.current_time()
            for i in range(count):
                if rate_per_s:
                    await trio.sleep_until(start + i / rate_per_s)
                for user in users:
                    # The payload carries the publish time, read just before the produce call.
                    sent = time.monotonic()
                    envelope = make_envelope(
                        events_v1.TeacherNotificationRequested(
                            teacher_id=user,
                            notification_type="batch_status_changed",
                            category=events_v1.NotificationCategory.BATCH_PROGRESS,
                            batch_id="b1",
                            payload_json=f'{{"batch_id":"b1","n":{i},"sent":{sent!r}}}',
                        ),
                        source_service="bench",
                        user_id=user,
                    )
                    if i == 0:
                        first = time.monotonic()
                    await bus.publish(
                        envelope.event_type,
                        bytes(envelope),
                        key=user.encode(),
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
                _, count, rate = line.decode().split()
                t0 = await publish(int(count), float(rate))
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


async def _drive(
    child: subprocess.Popen[bytes], info: dict[str, Any], mode: str, connections: int
) -> dict[str, Any]:
    """``mode``: "fanout" (P10, P6, P5), "p7" (Kafka -> frame) or "p10" (RSS only)."""
    assert child.stdin is not None and child.stdout is not None
    context = client_context(info["ca_file"], alpn=["http/1.1"])
    tokens: list[str] = info["tokens"]
    rss_before = _rss_kib(child.pid)
    arrivals: list[list[float]] = []
    p7_latencies: list[float] = []
    expected = 0
    all_in = trio.Event()
    received = [0] * connections

    async def client(index: int, task_status: trio.TaskStatus[None]) -> None:
        async with trio_websocket.open_websocket_url(
            f"{info['url']}/v1/ws",
            context,
            extra_headers=[(b"origin", ORIGIN.encode())],
            message_queue_size=BURST * 2,
        ) as socket:
            token = tokens[index % len(tokens)]
            await socket.send_message(json.dumps({"type": "auth", "token": token}))
            assert json.loads(await socket.get_message())["type"] == "welcome"
            task_status.started()
            while True:
                text = await socket.get_message()
                if '"type":"event"' not in text:
                    if '"type":"ping"' in text:  # the server's heartbeat: answer it
                        nonce = json.loads(text)["nonce"]
                        await socket.send_message(json.dumps({"type": "pong", "nonce": nonce}))
                    continue
                now = time.monotonic()
                received[index] += 1
                if mode == "p7":
                    p7_latencies.append(now - json.loads(text)["data"]["sent"])
                elif arrivals:
                    arrivals[-1].append(now)
                if sum(received) >= expected and expected:
                    all_in.set()

    def command(count: int, rate_per_s: float = 0.0) -> float:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(f"pub {count} {rate_per_s}\n".encode())
        child.stdin.flush()
        return float(json.loads(child.stdout.readline())["t0"])

    limiter = trio.CapacityLimiter(50)
    result: dict[str, Any] = {"connections": connections}
    async with trio.open_nursery() as nursery:

        async def start_one(i: int) -> None:
            async with limiter:
                await nursery.start(client, i)

        opened = time.monotonic()
        async with trio.open_nursery() as starting:
            for i in range(connections):
                starting.start_soon(start_one, i)
        result["open_s"] = time.monotonic() - opened
        await trio.sleep(1.0)
        rss_after = _rss_kib(child.pid)
        result.update(
            rss_before_mib=rss_before / 1024,
            rss_after_mib=rss_after / 1024,
            rss_per_connection_kib=(rss_after - rss_before) / connections,
        )
        if mode == "p7":
            expected = connections * P7_EVENTS
            cpu0 = _cpu_s(child.pid)
            t0 = await trio.to_thread.run_sync(command, P7_EVENTS, P7_RATE_PER_S)
            with trio.fail_after(60):
                await all_in.wait()
            took = time.monotonic() - t0
            result["p7"] = {
                "events": P7_EVENTS,
                "rate_per_s": P7_RATE_PER_S,
                "deliveries": len(p7_latencies),
                "deliveries_per_s": len(p7_latencies) / took,
                "server_cpu_s": _cpu_s(child.pid) - cpu0,
                "p50_ms": percentile(p7_latencies, 50) * 1e3,
                "p99_ms": percentile(p7_latencies, 99) * 1e3,
                "max_ms": max(p7_latencies) * 1e3,
            }
        elif mode == "fanout":
            latencies_last: list[float] = []
            latencies_all: list[float] = []
            for _ in range(ROUNDS):
                all_in = trio.Event()
                arrivals.append([])
                expected = sum(received) + connections
                t0 = await trio.to_thread.run_sync(command, 1)
                with trio.fail_after(30):
                    await all_in.wait()
                latencies_last.append(max(arrivals[-1]) - t0)
                latencies_all += [a - t0 for a in arrivals[-1]]
                await trio.sleep(0.2)

            all_in = trio.Event()
            arrivals.append([])
            expected = sum(received) + connections * BURST
            cpu0 = _cpu_s(child.pid)
            t0 = await trio.to_thread.run_sync(command, BURST)
            with trio.fail_after(120):
                await all_in.wait()
            burst_s = max(arrivals[-1]) - t0
            cpu1 = _cpu_s(child.pid)
            deliveries = connections * BURST
            result.update(
                p6_last_arrival_ms={
                    "p50": percentile(latencies_last, 50) * 1e3,
                    "p99": percentile(latencies_last, 99) * 1e3,
                },
                p6_all_arrivals_ms={
                    "p50": percentile(latencies_all, 50) * 1e3,
                    "p99": percentile(latencies_all, 99) * 1e3,
                },
                p5_burst={
                    "events": BURST,
                    "deliveries": deliveries,
                    "seconds": burst_s,
                    "deliveries_per_s": deliveries / burst_s,
                    "server_cpu_s": cpu1 - cpu0,
                    "deliveries_per_server_cpu_s": deliveries / max(cpu1 - cpu0, 1e-9),
                },
            )
        nursery.cancel_scope.cancel()
    return result


async def _storm(
    child: subprocess.Popen[bytes], info: dict[str, Any], connections: int
) -> dict[str, Any]:
    """P11: ``connections`` clients drop their sockets together, one event is published while
    they are away, and all reconnect at once with ``since`` (TLS + WS + auth + resume): the
    time until the last one has its welcome and the missed event."""
    context = client_context(info["ca_file"], alpn=["http/1.1"])
    tokens: list[str] = info["tokens"]
    last: list[str] = [""] * connections
    got = [0] * connections
    arrived = trio.Event()

    def publish(count: int) -> None:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(f"pub {count} 0\n".encode())
        child.stdin.flush()
        child.stdout.readline()

    async def client(index: int, since: str, task_status: trio.TaskStatus[None]) -> None:
        url = f"{info['url']}/v1/ws" + (f"?since={quote(since, safe='')}" if since else "")
        async with trio_websocket.open_websocket_url(
            url, context, extra_headers=[(b"origin", ORIGIN.encode())], disconnect_timeout=1
        ) as socket:
            try:
                token = tokens[index % len(tokens)]
                await socket.send_message(json.dumps({"type": "auth", "token": token}))
                welcome = json.loads(await socket.get_message())
                assert welcome["type"] == "welcome", welcome
                assert not since or welcome["resume"]["recovered"], welcome
                task_status.started()
                while True:
                    frame = json.loads(await socket.get_message())
                    if frame["type"] == "ping":
                        await socket.send_message(
                            json.dumps({"type": "pong", "nonce": frame["nonce"]})
                        )
                    elif frame["type"] == "event":
                        last[index] = f"{frame['epoch']}:{frame['offset']}"
                        got[index] += 1
                        if all(got):
                            arrived.set()
            finally:
                await trio.aclose_forcefully(socket._stream)

    limiter = trio.CapacityLimiter(50)
    async with trio.open_nursery() as first:

        async def start_one(i: int) -> None:
            async with limiter:
                await first.start(client, i, "")

        async with trio.open_nursery() as starting:
            for i in range(connections):
                starting.start_soon(start_one, i)
        await trio.to_thread.run_sync(publish, 1)
        with trio.fail_after(60):
            await arrived.wait()
        first.cancel_scope.cancel()  # every client drops its socket at once
    await trio.sleep(2.0)  # the server notices the closes and frees the per-user slots
    await trio.to_thread.run_sync(publish, 1)  # missed while away
    got[:] = [0] * connections
    arrived = trio.Event()
    cpu0 = _cpu_s(child.pid)
    began = time.monotonic()
    async with trio.open_nursery() as storm:
        for i in range(connections):
            storm.start_soon(partial(storm.start, client, i, last[i]))
        with trio.fail_after(120):
            await arrived.wait()
        took = time.monotonic() - began
        storm.cancel_scope.cancel()
    return {
        "connections": connections,
        "seconds": took,
        "server_cpu_s": _cpu_s(child.pid) - cpu0,
    }


def _run_child(mode: str, connections: int, kafka_bootstrap: str = "") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "child.log"
        with log.open("wb") as err:
            child = subprocess.Popen(  # nosec B603 - our own interpreter and module
                [
                    sys.executable,
                    "-m",
                    "perf.bench_wsmanager",
                    "--serve",
                    tmp,
                    str(connections),
                    kafka_bootstrap,
                ],
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
            if mode == "p11":
                return trio.run(_storm, child, json.loads(line), connections)
            return trio.run(_drive, child, json.loads(line), mode, connections)
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait(timeout=60)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        from common.logs import configure_logging

        configure_logging(service="bench-ws", level="warning")
        trio.run(_serve, Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--p10", type=int, default=0, metavar="N", help="also measure RSS at N connections"
    )
    args = parser.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(CONNECTIONS, args.p10) * 2 + 1024  # the driver and each child hold one fd each
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, want)), hard))
    result = _run_child("fanout", CONNECTIONS)
    result["p11_storm"] = _run_child("p11", CONNECTIONS)
    kafka_bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "")
    if kafka_bootstrap:
        result["p7_kafka"] = _run_child("p7", CONNECTIONS, kafka_bootstrap)
        # The latency floor: the same pipeline at a tenth of the load.
        result["p7_light"] = _run_child("p7", P7_LIGHT_CONNECTIONS, kafka_bootstrap)
    if args.p10:
        result["p10_large"] = _run_child("p10", args.p10)
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
    ]
    if "p10_large" in result:
        big = result["p10_large"]
        rows.append(
            [
                f"P10 at {big['connections']} connections",
                f"{big['rss_per_connection_kib']:.1f} KiB per connection, "
                f"{big['rss_after_mib']:.0f} MiB RSS",
                f"{big['rss_before_mib']:.0f} -> {big['rss_after_mib']:.0f} MiB; "
                f"{math.ceil(big['connections'] / PER_USER)} users; opened in "
                f"{big['open_s']:.0f} s",
                "10k connections <= 400 MB RSS",
            ]
        )
    rows += [
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
        [
            "P11 reconnect storm",
            f"{result['p11_storm']['seconds']:.2f} s",
            f"{CONNECTIONS} clients at once, TLS + WS + auth + resume (one missed event "
            f"replayed each); server CPU {result['p11_storm']['server_cpu_s']:.2f} s",
            "<= 2 s",
        ],
    ]
    if "p7_kafka" in result:
        for key, connections in (("p7_kafka", CONNECTIONS), ("p7_light", P7_LIGHT_CONNECTIONS)):
            if key not in result:
                continue
            p7 = result[key]["p7"]
            rows.append(
                [
                    "P7 Kafka produce -> WSS frame received",
                    f"p50 {p7['p50_ms']:.1f} / p99 {p7['p99_ms']:.1f} ms",
                    f"{p7['events']} events at {p7['rate_per_s']:g}/s to {connections} "
                    f"connections: {p7['deliveries_per_s']:.0f} deliveries/s, max "
                    f"{p7['max_ms']:.0f} ms",
                    "p50 <= 20 ms, p99 <= 100 ms at >= 5k deliveries/s",
                ]
            )
    else:
        rows.append(
            [
                "P7 Kafka produce -> WSS frame received",
                "not measured",
                "set KAFKA_BOOTSTRAP to a broker",
                "p50 <= 20 ms, p99 <= 100 ms at >= 5k deliveries/s",
            ]
        )
    write_report(
        "wsmanager",
        title=f"WebSocket manager fan-out to {CONNECTIONS} TLS connections (P5, P6, P7, P10, P11)",
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
            f"{CONNECTIONS} connections (memory bus).",
            "P7: a separate server process whose wsmanager consumes the real Kafka broker "
            "(its own consumer group, as in production); the publisher is a Kafka producer in "
            "that process; latency runs from just before the produce call to the client's "
            "receipt (CLOCK_MONOTONIC, shared by the processes), over every delivery. The "
            "Kafka broker (a JVM) shares the 2 cores too.",
        ],
    )


if __name__ == "__main__":
    main()
