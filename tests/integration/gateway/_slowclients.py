"""Slow HTTP/1.1 clients over raw TLS sockets, for the resilience tests (R9, R8).

Two kinds of offender, each on its own TLS connection, with HTTP/1.1 written by hand:

* **slow body**: sends a complete request head announcing a body, then dribbles the body one
  byte per ``interval_s``; the gateway must answer 408 problem+json and close the connection
  once its body-read deadline (``body_timeout_s``) has passed;
* **slow header**: sends a request line and dribbles one header, one byte per ``interval_s``,
  never finishing the head; Hypercorn's ``keep_alive_timeout`` must close the connection.

An offender stops writing as soon as the server answers, and keeps reading until the server
closes the connection (EOF or reset), so what it records is what a client would see.

Run as a script it is the attacker process of the R9 test (attackers in their own process, so
their CPU is not charged to the gateway's event loop): ``python _slowclients.py '<json>'``
with the keys of :class:`AttackPlan`. It prints one JSON line ``{"engaged": ...}`` once every
offender is connected and has started dribbling, then one ``{"offences": [...]}`` line when all
are finished. Times are ``time.monotonic()`` (the same clock in every process on Linux).
"""

from __future__ import annotations

import json
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import trio

#: What a slow-body offender announces; far more than it ever sends before its deadline.
BODY_LENGTH = 4096
#: TLS handshakes in progress at once: stays under the listener's backlog (Hypercorn: 100), so
#: no SYN is dropped and retried a second later.
CONNECT_CONCURRENCY = 50


@dataclass
class Offence:
    """What one offender did and saw."""

    kind: str  # "body" or "header"
    index: int
    #: After the TLS handshake.
    connected_at: float = 0.0
    #: After the request head (slow body) or the request line (slow header) was sent: from
    #: here the server's deadline runs.
    started_at: float = 0.0
    #: First response byte, if any.
    answered_at: float | None = None
    #: The server closed the connection (EOF or reset).
    closed_at: float | None = None
    #: "eof", "reset", "still-open" (gave up waiting) or "error: ..." (could not connect).
    ending: str = ""
    bytes_sent: int = 0
    received: str = ""  # latin-1


@dataclass(frozen=True)
class AttackPlan:
    host: str
    port: int
    ca_file: str
    bodies: int
    headers: int
    interval_s: float
    #: An offender still connected this long after it started gives up ("still-open").
    give_up_s: float
    body_path: str = "/v1/auth/refresh"
    header_path: str = "/.well-known/jwks.json"


@dataclass
class ParsedResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    #: The body has as many bytes as ``Content-Length`` says.
    complete: bool
    extra: bytes = field(default=b"")


def parse_response(raw: bytes) -> ParsedResponse | None:
    """One HTTP/1.1 response with a ``Content-Length`` body (None: no complete head)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "-1"))
    body, extra = (rest[:length], rest[length:]) if length >= 0 else (rest, b"")
    return ParsedResponse(int(parts[1]), headers, body, len(body) == length, extra)


def client_tls(ca_file: str) -> ssl.SSLContext:
    """A verifying client context speaking HTTP/1.1 only (ALPN), like a plain HTTPS client."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


async def open_tls(host: str, port: int, context: ssl.SSLContext) -> trio.SSLStream[Any]:
    stream = await trio.open_ssl_over_tcp_stream(
        host, port, ssl_context=context, https_compatible=True
    )
    await stream.do_handshake()
    return stream


async def dribble_until_closed(
    stream: trio.SSLStream[Any],
    offence: Offence,
    *,
    interval_s: float,
    phase_s: float,
    give_up_s: float,
    byte: bytes,
) -> None:
    """Send ``byte`` every ``interval_s`` (first after ``phase_s``) until the server answers;
    read until the server closes the connection, or ``give_up_s`` after ``started_at``."""
    answered = trio.Event()

    async def read() -> None:
        received = bytearray()
        try:
            while True:
                data = await stream.receive_some(65_536)
                if not data:
                    offence.ending = "eof"
                    break
                if not received:
                    offence.answered_at = time.monotonic()
                    answered.set()
                received += data
        except trio.BrokenResourceError:
            offence.ending = "reset"
        offence.closed_at = time.monotonic()
        offence.received = received.decode("latin-1")

    async def write() -> None:
        tick = trio.current_time() + phase_s
        while not answered.is_set():
            await trio.sleep_until(tick)
            tick += interval_s
            if answered.is_set():
                return
            try:
                await stream.send_all(byte)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return  # the reader sees the close
            offence.bytes_sent += 1

    with trio.move_on_at(trio.current_time() + give_up_s):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await read()
            nursery.cancel_scope.cancel()
    if offence.closed_at is None:
        offence.ending = "still-open"
    await trio.aclose_forcefully(stream)


async def run_offenders(
    plan: AttackPlan, on_engaged: Callable[[list[Offence]], None]
) -> list[Offence]:
    """Run every offender of ``plan`` to its end; ``on_engaged`` once all are dribbling."""
    context = client_tls(plan.ca_file)
    total = plan.bodies + plan.headers
    # Interleaved, so both kinds are spread over the connect phase alike.
    order = sorted(
        [(i / plan.bodies, "body") for i in range(plan.bodies)]
        + [(i / plan.headers, "header") for i in range(plan.headers)]
    )
    offences = [Offence(kind, i) for i, (_, kind) in enumerate(order)]
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)
    engaged = 0

    def one_more() -> None:
        nonlocal engaged
        engaged += 1
        if engaged == total:
            on_engaged(offences)

    async def offend(offence: Offence) -> None:
        # A deterministic spread of the dribble phases (golden-ratio sequence).
        phase = plan.interval_s * ((offence.index * 0.6180339887) % 1.0)
        try:
            async with limiter:
                stream = await open_tls(plan.host, plan.port, context)
        except OSError as exc:
            offence.ending = f"error: {exc!r}"
            one_more()
            return
        except trio.BrokenResourceError as exc:
            offence.ending = f"error: {exc.__cause__!r}"
            one_more()
            return
        offence.connected_at = time.monotonic()
        try:
            if offence.kind == "body":
                head = (
                    f"POST {plan.body_path} HTTP/1.1\r\nHost: {plan.host}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {BODY_LENGTH}\r\n\r\n"
                )
                byte = b" "  # JSON whitespace: the body is well-formed so far
            else:
                head = f"GET {plan.header_path} HTTP/1.1\r\nHost: {plan.host}\r\nX-Slow-Header: "
                byte = b"a"
            await stream.send_all(head.encode())
        except trio.BrokenResourceError as exc:
            offence.ending = f"error: {exc.__cause__!r}"
            one_more()
            return
        offence.started_at = time.monotonic()
        one_more()
        await dribble_until_closed(
            stream,
            offence,
            interval_s=plan.interval_s,
            phase_s=phase,
            give_up_s=plan.give_up_s,
            byte=byte,
        )

    async with trio.open_nursery() as nursery:
        for offence in offences:
            nursery.start_soon(offend, offence)
    return offences


def _engaged_line(offences: list[Offence]) -> None:
    connected = [o.connected_at for o in offences if o.connected_at]
    line = {
        "engaged": len(offences),
        "connected": len(connected),
        "first_connected_at": min(connected, default=0.0),
        "last_connected_at": max(connected, default=0.0),
        "at": time.monotonic(),
    }
    print(json.dumps(line), flush=True)


async def _main(plan: AttackPlan) -> None:
    offences = await run_offenders(plan, _engaged_line)
    print(json.dumps({"offences": [asdict(o) for o in offences]}), flush=True)


if __name__ == "__main__":
    trio.run(_main, AttackPlan(**json.loads(sys.argv[1])))
