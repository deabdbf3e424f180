"""Reliability acceptance over real sockets: slow clients (R9) and SIGTERM (R8).

R9: 1000 slow-body and 1000 slow-header clients (raw TLS, HTTP/1.1 by hand, in their own
process) against one gateway while a healthy client measures its latency. Offenders must be cut
within their deadlines (slow body: 408 problem+json, then the connection closed; slow header:
the connection closed by Hypercorn's ``keep_alive_timeout``), and the healthy p95 must stay
within 2x of the baseline measured just before.

R8: ``python -m gateway`` as a real process gets SIGTERM while a request body is still being
sent: readiness turns false first, then new connections are refused, the in-flight request gets
its whole response, and the process exits 0 within its grace period.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.settings import LimitSettings
from tests.integration.gateway._slowclients import (
    AttackPlan,
    Offence,
    client_tls,
    open_tls,
    parse_response,
)
from tests.integration.gateway.conftest import Gateway, GatewayFactory

pytestmark = pytest.mark.slow

SLOW_CLIENTS = Path(__file__).with_name("_slowclients.py")
JWKS = "/.well-known/jwks.json"
PROBLEM = "application/problem+json"
#: Enough for the healthy client never to be throttled (every request counts against its
#: address; the default budget is 300/min).
UNTHROTTLED = LimitSettings(limit=1_000_000, period_s=60, burst=1_000_000)


def split_url(url: str) -> tuple[str, int]:
    host, _, port = url.split("://", 1)[1].rpartition(":")
    return host, int(port)


def ensure_file_descriptors(needed: int) -> None:
    """Raise this process's soft ``RLIMIT_NOFILE`` to ``needed`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors; RLIMIT_NOFILE hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Lines:
    """Newline-delimited reads from a Trio receive stream."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = bytearray()

    async def next(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(1 << 20)
            if not chunk:
                raise EOFError(f"stream ended; unterminated: {bytes(self._buffer[-300:])!r}")
            self._buffer += chunk
        line, _, rest = self._buffer.partition(b"\n")
        self._buffer = bytearray(rest)
        return bytes(line)


async def drain(stream: trio.abc.ReceiveStream | None, into: bytearray) -> None:
    if stream is None:
        return
    while chunk := await stream.receive_some(1 << 16):
        into += chunk


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18]


# --- R9 ------------------------------------------------------------------------------------

OFFENDERS_PER_KIND = 1000
BODY_DEADLINE_S = 10.0
HEADER_DEADLINE_S = 10.0
#: One byte per offender per this many seconds (4000 TLS records/s at the gateway in all).
DRIBBLE_INTERVAL_S = 0.5
#: The healthy client sends one request per this many seconds (or back-to-back when slower).
HEALTHY_PACE_S = 0.005
BASELINE_S = 1.5
#: The attack window: from "every offender is dribbling" until this long, or until shortly
#: before the first offender's deadline, whichever comes first.
WINDOW_MAX_S = 2.0
WINDOW_MARGIN_S = 0.25
MIN_SAMPLES = 100
#: How late a cut may come. Hypercorn's and the edge's timers are exact; the slack is the time
#: the gateway's one event loop needs to work through ~2000 cuts falling due within a second.
CUT_SLACK_S = 1.5
#: An absolute floor under the 2x rule. The baseline p95 of one JWKS request on loopback is a
#: few milliseconds, where scheduler noise on a shared 2-CPU CI runner alone can double it; the
#: failure R9 guards against (offenders starving the event loop: 6x measured with a body
#: trickle and no body deadline) costs far more than 50 ms, so the floor keeps the test able
#: to fail without making it flaky.
P95_FLOOR_S = 0.050
#: How early a cut may seem. The offenders' timestamps are taken in the attacker process,
#: whose one event loop runs 2000 offenders: "head sent" is recorded when that loop gets back
#: to the offender, which can be a few hundred milliseconds after the server already has it.
EARLY_S = 0.3


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic() when the request started
    seconds: float
    status: int


async def healthy_client(client: httpx.AsyncClient, samples: list[Sample]) -> None:
    tick = trio.current_time()
    while True:
        started = time.monotonic()
        reply = await client.get(JWKS)
        samples.append(Sample(started, time.monotonic() - started, reply.status_code))
        tick = max(tick + HEALTHY_PACE_S, trio.current_time())
        await trio.sleep_until(tick)


def body_offence_faults(offence: Offence) -> list[str]:
    faults = []
    if offence.ending not in ("eof", "reset"):
        faults.append(f"connection {offence.ending}")
    response = parse_response(offence.received.encode("latin-1"))
    if response is None:
        return [*faults, f"no response, received {offence.received[:80]!r}"]
    if response.status != 408:
        faults.append(f"status {response.status}")
    if response.headers.get("content-type") != PROBLEM:
        faults.append(f"content-type {response.headers.get('content-type')!r}")
    if response.headers.get("connection", "").lower() != "close":
        faults.append("no Connection: close")
    if not response.complete:
        faults.append("incomplete body")
    else:
        problem = json.loads(response.body)
        if (problem.get("status"), problem.get("code"), problem.get("field")) != (
            408,
            "request_timeout",
            "body_timeout_s",
        ):
            faults.append(f"problem {problem}")
    assert offence.answered_at is not None and offence.closed_at is not None
    answered_after = offence.answered_at - offence.started_at
    if not BODY_DEADLINE_S - EARLY_S <= answered_after <= BODY_DEADLINE_S + CUT_SLACK_S:
        faults.append(f"answered after {answered_after:.3f} s")
    if offence.closed_at - offence.answered_at > CUT_SLACK_S:
        faults.append(f"closed {offence.closed_at - offence.answered_at:.3f} s after the answer")
    if offence.bytes_sent < 2:
        faults.append(f"only {offence.bytes_sent} body bytes sent: not a trickle")
    return faults


def header_offence_faults(offence: Offence) -> list[str]:
    faults = []
    if offence.ending not in ("eof", "reset"):
        return [f"connection {offence.ending}"]
    if offence.received:
        faults.append(f"received {offence.received[:80]!r}")
    assert offence.closed_at is not None
    cut_after = offence.closed_at - offence.connected_at
    if not HEADER_DEADLINE_S - EARLY_S <= cut_after <= HEADER_DEADLINE_S + CUT_SLACK_S:
        faults.append(f"closed after {cut_after:.3f} s")
    if offence.bytes_sent < 2:
        faults.append(f"only {offence.bytes_sent} header bytes sent: not a trickle")
    return faults


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


async def test_slow_clients_are_cut_and_healthy_latency_holds(
    start_gateway: GatewayFactory,
) -> None:
    # Gateway (this process) and attackers (a child) each hold one socket per offender.
    ensure_file_descriptors(2 * OFFENDERS_PER_KIND + 1024)
    gateway: Gateway = await start_gateway(
        body_timeout_s=BODY_DEADLINE_S,
        keep_alive_timeout_s=HEADER_DEADLINE_S,
        limit_address=UNTHROTTLED,
    )
    host, port = split_url(gateway.url)
    assert gateway.addresses.ca_file is not None
    plan = AttackPlan(
        host=host,
        port=port,
        ca_file=gateway.addresses.ca_file,
        bodies=OFFENDERS_PER_KIND,
        headers=OFFENDERS_PER_KIND,
        interval_s=DRIBBLE_INTERVAL_S,
        give_up_s=max(BODY_DEADLINE_S, HEADER_DEADLINE_S) + CUT_SLACK_S + 3.0,
    )
    command = [sys.executable, str(SLOW_CLIENTS), json.dumps(plan.__dict__)]
    samples: list[Sample] = []
    errors = bytearray()
    async with gateway.client() as client, trio.open_nursery() as nursery:
        for _ in range(20):  # warm-up: connection, code paths
            assert (await client.get(JWKS)).status_code == 200
        nursery.start_soon(healthy_client, client, samples)
        await trio.sleep(BASELINE_S)
        baseline = [s.seconds for s in samples]

        attackers: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                check=False,
            )
        )
        nursery.start_soon(drain, attackers.stderr, errors)
        lines = Lines(attackers.stdout)  # type: ignore[arg-type]
        launched = time.monotonic()
        with trio.fail_after(15):
            engaged: dict[str, Any] = json.loads(await lines.next())
        window_start = time.monotonic()
        window_end = min(
            window_start + WINDOW_MAX_S,
            engaged["first_connected_at"]
            + min(BODY_DEADLINE_S, HEADER_DEADLINE_S)
            - WINDOW_MARGIN_S,
        )
        await trio.sleep(max(0.0, window_end - time.monotonic()))
        with trio.fail_after(plan.give_up_s + 10):
            report: dict[str, Any] = json.loads(await lines.next())
            await attackers.wait()
        nursery.cancel_scope.cancel()

    assert attackers.returncode == 0, errors.decode(errors="replace")[-3000:]
    offences = [Offence(**o) for o in report["offences"]]
    assert len(offences) == 2 * OFFENDERS_PER_KIND
    not_connected = [o for o in offences if o.ending.startswith("error")]
    assert not not_connected, (
        f"{len(not_connected)} offenders could not connect: {not_connected[:3]}"
    )

    # The premise: every offender held its connection through the whole healthy window.
    absent = [
        o for o in offences if o.connected_at > window_start or (o.closed_at or 0) < window_end
    ]
    assert not absent, (
        f"{len(absent)} offenders were not connected throughout the window "
        f"[{window_start:.3f}, {window_end:.3f}] (connect phase "
        f"{engaged['last_connected_at'] - engaged['first_connected_at']:.2f} s)"
    )
    attack = [s.seconds for s in samples if window_start <= s.at and s.at + s.seconds <= window_end]
    assert len(baseline) >= MIN_SAMPLES and len(attack) >= MIN_SAMPLES, (
        f"too few samples: baseline {len(baseline)}, under attack {len(attack)} "
        f"(window {window_end - window_start:.2f} s)"
    )
    assert {s.status for s in samples} == {200}, {s.status for s in samples}

    bodies = [o for o in offences if o.kind == "body"]
    headers = [o for o in offences if o.kind == "header"]
    body_faults = {o.index: f for o in bodies if (f := body_offence_faults(o))}
    header_faults = {o.index: f for o in headers if (f := header_offence_faults(o))}
    body_cuts = [o.answered_at - o.started_at for o in bodies if o.answered_at]
    header_cuts = [o.closed_at - o.connected_at for o in headers if o.closed_at]
    base_p95, attack_p95 = p95(baseline), p95(attack)
    numbers = (
        f"baseline p95 {base_p95 * 1000:.1f} ms (n={len(baseline)}), under attack p95 "
        f"{attack_p95 * 1000:.1f} ms (n={len(attack)}, window "
        f"{window_end - window_start:.2f} s); connect phase "
        f"{engaged['last_connected_at'] - engaged['first_connected_at']:.2f} s "
        f"(engaged {engaged['at'] - launched:.2f} s after launch); slow-body 408 after "
        f"{min(body_cuts):.3f}..{max(body_cuts):.3f} s, slow-header closed after "
        f"{min(header_cuts):.3f}..{max(header_cuts):.3f} s"
    )
    print(numbers)
    assert not body_faults, (
        f"{len(body_faults)} of {len(bodies)} slow-body offenders not cut as promised, e.g. "
        f"{list(body_faults.items())[:3]}; {numbers}"
    )
    assert not header_faults, (
        f"{len(header_faults)} of {len(headers)} slow-header offenders not cut as promised, "
        f"e.g. {list(header_faults.items())[:3]}; {numbers}"
    )
    limit = max(2 * base_p95, base_p95 + P95_FLOOR_S)
    assert attack_p95 <= limit, f"healthy p95 over {limit * 1000:.1f} ms: {numbers}"

    async with httpx.AsyncClient(base_url=gateway.addresses.ops_url) as ops:
        text = (await ops.get("/metrics")).text
    assert metric(text, "huleedu_gateway_http_bodies_cut_total") == OFFENDERS_PER_KIND


# --- R8 ------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[3]
GRACE_S = 10.0
DRAIN_DELAY_S = 1.0


async def wait_for(predicate: Any, *, within_s: float, what: str) -> float:
    """Poll ``await predicate()`` until true; the time it took (fails after ``within_s``)."""
    started = time.monotonic()
    with trio.move_on_after(within_s):
        while not await predicate():
            await trio.sleep(0.02)
        return time.monotonic() - started
    raise AssertionError(f"{what}: not within {within_s} s")


async def test_sigterm_drains_in_flight_request_and_exits_zero(
    identity_port: int, tmp_path: Path
) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HULEEDU_GATEWAY_", "OTEL_"))
    }
    env.update(
        HULEEDU_GATEWAY_PORT="0",
        HULEEDU_GATEWAY_OPS_PORT="0",
        HULEEDU_GATEWAY_STATE_DIR=str(tmp_path),
        HULEEDU_GATEWAY_IDENTITY_TARGET=f"127.0.0.1:{identity_port}",
        HULEEDU_GATEWAY_SHUTDOWN_GRACE_S=str(GRACE_S),
        HULEEDU_GATEWAY_DRAIN_DELAY_S=str(DRAIN_DELAY_S),
        HULEEDU_GATEWAY_BODY_TIMEOUT_S="30",
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "gateway"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    errors = bytearray()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, process.stderr, errors)
            with trio.fail_after(30):
                ready = json.loads(await Lines(process.stdout).next())  # type: ignore[arg-type]
            await _sigterm_while_in_flight(process, ready)
            with trio.fail_after(GRACE_S + 5):
                code = await process.wait()
            assert code == 0, errors.decode(errors="replace")[-3000:]
            assert b"Traceback" not in errors, errors.decode(errors="replace")[-3000:]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def _sigterm_while_in_flight(process: trio.Process, ready: dict[str, Any]) -> None:
    host, port = split_url(ready["url"])
    ca_file = ready["ca_file"]
    async with (
        httpx.AsyncClient(base_url=ready["url"], verify=client_tls(ca_file)) as client,
        httpx.AsyncClient(base_url=ready["ops_url"]) as ops,
    ):
        assert (await ops.get("/readyz")).status_code == 200
        reply = await client.post(
            "/v1/auth/login",
            json={"email": "teacher@huleedu.test", "password": "correct horse battery staple"},
        )
        assert reply.status_code == 200, reply.text
        body = json.dumps({"refresh_token": reply.json()["refresh_token"]}).encode()

        # A refresh whose body is half sent when SIGTERM arrives.
        stream = await open_tls(host, port, client_tls(ca_file))
        async with stream:
            await _in_flight(process, ready, stream, body, client, ops)


async def _in_flight(
    process: trio.Process,
    ready: dict[str, Any],
    stream: trio.SSLStream[Any],
    body: bytes,
    client: httpx.AsyncClient,
    ops: httpx.AsyncClient,
) -> None:
    host, port = split_url(ready["url"])
    head = (
        f"POST /v1/auth/refresh HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    await stream.send_all(head + body[:10])
    await trio.sleep(0.2)

    process.send_signal(signal.SIGTERM)

    async def not_ready() -> bool:
        try:
            return (await ops.get("/readyz")).status_code == 503
        except httpx.TransportError:
            return False  # not yet: the ops listener closes only after the drain delay

    took = await wait_for(not_ready, within_s=DRAIN_DELAY_S, what="readiness false")
    # Still serving during the drain delay (the load balancer is being told to stop).
    assert (await client.get(JWKS)).status_code == 200

    ops_host, ops_port = split_url(ready["ops_url"])

    async def listeners_closed() -> bool:
        return await trio.to_thread.run_sync(refused, host, port) and await trio.to_thread.run_sync(
            refused, ops_host, ops_port
        )

    await wait_for(listeners_closed, within_s=DRAIN_DELAY_S + 2, what="listeners closed")

    # The in-flight request still completes with its whole response.
    await stream.send_all(body[10:])
    received = bytearray()
    with trio.fail_after(5):
        while (response := parse_response(bytes(received))) is None or not response.complete:
            chunk = await stream.receive_some(65_536)
            assert chunk, f"closed before a whole response: {bytes(received)!r}"
            received += chunk
    assert response.status == 200, response.body
    assert set(json.loads(response.body)) >= {"access_token", "refresh_token"}
    print(f"readiness false {took * 1000:.0f} ms after SIGTERM")
