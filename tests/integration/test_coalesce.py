"""Coalesced writes (``common.coalesce``) on a real Hypercorn TLS listener: frames an app
sends back to back leave in fewer TLS writes and arrive complete and in order; a peer that
stops reading still stalls the sender (bounded buffering); the close frame follows the data;
a listener without ``enable`` keeps one write per frame."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket

from common import coalesce
from common.httpserver import answer_lifespan, listener_config, serve_listener
from common.tls import client_context, ensure_dev_certificates

Message = MutableMapping[str, Any]
FRAMES = 200


def websocket_only(handler: Any) -> Any:
    """An ASGI app: ``handler`` for WebSocket scopes; lifespan answered; HTTP ignored."""

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            await handler(scope, receive, send)
        elif scope["type"] == "lifespan":
            await answer_lifespan(receive, send)

    return app


def burst_app(count: int, size: int = 64) -> Any:
    """Accept, send ``count`` numbered frames back to back, then close 1000."""

    async def app(scope: Message, receive: Callable[[], Awaitable[Message]], send: Any) -> None:
        if scope["type"] != "websocket":
            return
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        for number in range(count):
            await send(
                {"type": "websocket.send", "text": json.dumps({"n": number, "pad": "x" * size})}
            )
        await send({"type": "websocket.close", "code": 1000, "reason": "done"})

    return websocket_only(app)


@pytest.fixture
def certificates(tmp_path: Path) -> Any:
    return ensure_dev_certificates(tmp_path)


async def start(nursery: trio.Nursery, app: Any, certificates: Any, *, coalescing: bool) -> str:
    config = listener_config("127.0.0.1", 0, grace_s=1, tls=certificates.tls_settings())
    config.alpn_protocols = ["http/1.1"]
    if coalescing:
        coalesce.enable(config)
    stop = trio.Event()
    url: str = await nursery.start(partial(serve_listener, app, config, shutdown_trigger=stop.wait))
    nursery.start_soon(_stop_later, stop)
    return url.replace("https://", "wss://")


async def _stop_later(stop: trio.Event) -> None:
    try:
        await trio.sleep_forever()
    finally:
        stop.set()


async def receive_all(url: str, certificates: Any) -> tuple[list[int], int | None]:
    tls = client_context(str(certificates.ca_cert), alpn=["http/1.1"])
    numbers: list[int] = []
    async with trio_websocket.open_websocket_url(url + "/", tls) as socket:
        try:
            while True:
                numbers.append(json.loads(await socket.get_message())["n"])
        except trio_websocket.ConnectionClosed as closed:
            code = closed.reason.code if closed.reason else None
        finally:
            await trio.aclose_forcefully(socket._stream)
    return numbers, code


@pytest.mark.parametrize("coalescing", [True, False])
async def test_a_burst_arrives_whole_and_in_order(
    nursery: trio.Nursery, certificates: Any, coalescing: bool
) -> None:
    url = await start(nursery, burst_app(FRAMES), certificates, coalescing=coalescing)
    before = (coalesce.stats.events, coalesce.stats.writes)
    with trio.fail_after(10):
        numbers, code = await receive_all(url, certificates)
    assert numbers == list(range(FRAMES)) and code == 1000
    events = coalesce.stats.events - before[0]
    writes = coalesce.stats.writes - before[1]
    if coalescing:
        assert events >= FRAMES + 2  # the 101 response, every frame, the close frame
        assert writes < events / 10, (events, writes)
    else:
        assert (events, writes) == (0, 0)  # Hypercorn's own path, untouched


async def test_a_peer_that_stops_reading_stalls_the_sender(
    nursery: trio.Nursery, certificates: Any
) -> None:
    sent = 0
    stalled = trio.Event()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        nonlocal sent
        await receive()
        await send({"type": "websocket.accept"})
        frame = "y" * 16_384
        while True:
            with trio.move_on_after(1) as waited:
                await send({"type": "websocket.send", "text": frame})
            if waited.cancelled_caught:
                stalled.set()
                await trio.sleep_forever()
            sent += len(frame)

    url = await start(nursery, websocket_only(app), certificates, coalescing=True)
    host, port = url.removeprefix("wss://").rsplit(":", 1)
    tls = client_context(str(certificates.ca_cert), alpn=["http/1.1"])
    # A raw client that upgrades and then never reads (trio-websocket reads in the background).
    stream = await trio.open_ssl_over_tcp_stream(host, int(port), ssl_context=tls)
    async with stream:
        await stream.send_all(
            f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        assert b" 101 " in await stream.receive_some(4096)
        with trio.fail_after(30):
            await stalled.wait()  # the client reads nothing more: the app's send must block
    # What was accepted is bounded by the kernel's socket buffers plus HIGH_WATER.
    assert sent < 64 << 20
