"""Drive an ASGI app in process (no sockets), so tests run on Trio's virtual clock."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str,
    path: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | Sequence[bytes] = b"",
    gaps_s: float = 0.0,
    client: tuple[str, int] = ("203.0.113.7", 40000),
    http_version: str = "2",
) -> Reply:
    """One request; ``body`` may be chunks, sent ``gaps_s`` apart (a slow client)."""
    chunks = [body] if isinstance(body, bytes) else list(body)
    path, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http_version,
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": client,
        "server": ("127.0.0.1", 8443),
        "extensions": {},
    }
    position = 0
    responded = trio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal position
        if position < len(chunks):
            if position and gaps_s:
                await trio.sleep(gaps_s)
            chunk = chunks[position]
            position += 1
            return {"type": "http.request", "body": chunk, "more_body": position < len(chunks)}
        await responded.wait()
        return {"type": "http.disconnect"}

    status = 0
    out_headers: dict[str, str] = {}
    out = bytearray()

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            for k, v in message.get("headers", ()):
                out_headers[k.decode().lower()] = v.decode()
        elif message["type"] == "http.response.body":
            out.extend(message.get("body", b""))
            if not message.get("more_body", False):
                responded.set()

    await app(scope, receive, send)
    return Reply(status, out_headers, bytes(out))
