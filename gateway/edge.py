"""The request pipeline in front of the app: an ASGI wrapper, in this order per request.

1. ``CONNECT`` -> 405 and ``Upgrade: h2c`` -> 400 (Hypercorn would tunnel / switch protocols);
2. header-size cap -> 431 (Hypercorn's own limit is per read, not per request);
3. correlation id: a well-formed ``X-Correlation-ID`` is kept, anything else replaced; bound
   for logs, gRPC metadata and events, and echoed on the response;
4. client-sent identity headers (``X-User-ID`` and the like) removed, whatever their case;
5. the client address resolved (trusted proxies only) into ``scope["huleedu.client"]``;
6. CORS: preflights answered here for allowed origins, ``Access-Control-*`` on responses;
7. the body read here, before the app runs: ``Content-Length`` over the limit -> 413 at once,
   more bytes than the limit -> 413, slower than ``body_timeout_s`` from start to end -> 408 and
   the connection closed. The app then gets the whole body in one message (JSON routes need
   no streaming). Streaming routes (``streaming``: uploads) get a pull-based
   :class:`~gateway.bodystream.BodyStream` in ``scope["huleedu.body"]`` instead, with their
   own size limit and idle timeout;
8. security headers on every response, ``Cache-Control: no-store`` unless the app set one;
9. request counts and durations per route template (set by the app) for ``/metrics``.

Every refusal here is an RFC 9457 problem document with ``code`` and ``correlation_id``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import trio
from opentelemetry import trace

from common import correlation
from common.errors import (
    PROBLEM_CONTENT_TYPE,
    ClientError,
    HeadersTooLargeError,
    HuleEduError,
    MethodNotAllowedError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RequestTimeoutError,
    to_problem,
)
from common.logs import get_logger
from common.tracing import extract_context
from gateway.bodystream import SCOPE_KEY as BODY_SCOPE_KEY
from gateway.bodystream import BodyStream
from gateway.limits import ClientAddress

__all__ = [
    "EdgeConfig",
    "EdgeMiddleware",
    "EdgeStatistics",
    "header_values",
    "problem_response_parts",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

log = get_logger("gateway.edge")

#: Identity headers only the gateway may set (downstream, from a verified token).
IDENTITY_HEADERS = frozenset(
    {
        b"x-user-id",
        b"x-user-roles",
        b"x-user-role",
        b"x-user-email",
        b"x-org-id",
        b"x-organization-id",
        b"x-tenant-id",
        b"x-roles",
        b"x-actor",
        b"x-authenticated-user",
        b"x-authenticated-userid",
        b"x-forwarded-user",
        b"x-forwarded-email",
        b"x-remote-user",
        b"remote-user",
        b"remote-addr",
        b"x-huleedu-user",
    }
)
IDENTITY_PREFIXES = (b"x-user-", b"x-auth-", b"x-huleedu-")

_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})
OVERSIZED_CREDENTIAL = b"Oversized credential"
SECURITY_HEADERS = (
    (b"strict-transport-security", b"max-age=63072000; includeSubDomains"),
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
EXPOSED_HEADERS = (
    b"RateLimit, RateLimit-Policy, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, "
    b"Retry-After, X-Correlation-ID, WWW-Authenticate"
)
ALLOWED_REQUEST_HEADERS = b"Authorization, Content-Type, X-Correlation-ID, Idempotency-Key"
ALLOWED_METHODS = b"GET, POST, PUT, PATCH, DELETE"


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    max_body_bytes: int
    body_timeout_s: float
    max_header_bytes: int
    cors_origins: frozenset[str]
    client_address: ClientAddress
    #: An ``Authorization`` value longer than this is replaced by an invalid placeholder.
    max_credential_bytes: int = 8192
    #: ``(method, path)`` -> the limits of a route that reads its body as a stream
    #: (``(max_bytes, idle_timeout_s)``), or None for a route whose body the edge reads.
    streaming: Callable[[str, str], tuple[int, float] | None] = lambda method, path: None


@dataclass
class EdgeStatistics:
    #: ``(method, route template, status)`` -> count and summed seconds.
    requests: dict[tuple[str, str, int], int] = field(default_factory=dict)
    seconds: dict[tuple[str, str, int], float] = field(default_factory=dict)
    #: Buckets for the latency histogram (upper bounds in seconds) -> counts per key.
    buckets: dict[tuple[str, str, int], list[int]] = field(default_factory=dict)
    bodies_cut: int = 0
    in_flight: int = 0

    BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def observe(self, key: tuple[str, str, int], seconds: float) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        counts = self.buckets.setdefault(key, [0] * len(self.BOUNDS))
        for i, bound in enumerate(self.BOUNDS):
            if seconds <= bound:
                counts[i] += 1
                break


def problem_response_parts(
    error: HuleEduError, correlation_id: str | None, instance: str | None = None
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of the problem response for ``error``."""
    body = json.dumps(
        to_problem(error, correlation_id=correlation_id, instance=instance), separators=(",", ":")
    ).encode()
    headers = [(b"content-type", PROBLEM_CONTENT_TYPE.encode())]
    extra = error.extra.get("headers") if isinstance(error, ClientError) else None
    if isinstance(extra, dict):
        headers += [(k.lower().encode(), str(v).encode()) for k, v in extra.items()]
    elif error.retry_after is not None:
        headers.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
    if error.http_status == 401:
        headers.append((b"www-authenticate", b'Bearer error="invalid_token"'))
    return error.http_status, headers, body


class _BodyCut(Exception):
    def __init__(self, error: HuleEduError, close: bool) -> None:
        self.error = error
        self.close = close


def _is_identity(name: bytes) -> bool:
    return name in IDENTITY_HEADERS or name.startswith(IDENTITY_PREFIXES)


class EdgeMiddleware:
    def __init__(
        self,
        app: App,
        config: EdgeConfig,
        stats: EdgeStatistics | None = None,
        *,
        tracer_provider: trace.TracerProvider | None = None,
    ) -> None:
        self.app = app
        self.config = config
        self.stats = stats or EdgeStatistics()
        self._tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer(
            "huleedu.gateway"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        self.stats.in_flight += 1
        status_seen = [0]
        method = str(scope.get("method", ""))
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", ())
            if k in _TRACE_HEADERS
        }
        parent = extract_context(carrier) if carrier else None
        with self._tracer.start_as_current_span(
            f"HTTP {method}", context=parent, kind=trace.SpanKind.SERVER
        ) as span:
            try:
                await self._http(scope, receive, send, status_seen)
            finally:
                self.stats.in_flight -= 1
                route = str(scope.get("huleedu.route") or "(unmatched)")
                self.stats.observe((method, route, status_seen[0]), time.perf_counter() - started)
                if span.is_recording():
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.request.method", method)
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status_seen[0])
                    span.set_attribute("url.scheme", str(scope.get("scheme", "")))
                    span.set_attribute("network.protocol.version", str(scope.get("http_version")))
                    cid = scope.get("huleedu.correlation_id")
                    if cid:
                        span.set_attribute("huleedu.correlation_id", str(cid))
                    if status_seen[0] >= 500:
                        span.set_status(trace.StatusCode.ERROR)

    async def _http(
        self, scope: Scope, receive: Receive, send: Send, status_seen: list[int]
    ) -> None:
        raw_headers: list[tuple[bytes, bytes]] = list(scope.get("headers", ()))
        kept: list[tuple[bytes, bytes]] = []
        incoming_cid: str | None = None
        origin: str | None = None
        forwarded: list[str] = []
        header_bytes = 0
        upgrade_h2c = False
        preflight = False
        content_length: int | None = None
        bad_length = False
        for name, value in raw_headers:
            lname = name.lower()
            if lname == b"authorization" and len(value) > self.config.max_credential_bytes:
                # An oversized credential is an invalid one (401 from the route, like any other
                # bad token), not an oversized request; it is never decoded.
                kept.append((lname, OVERSIZED_CREDENTIAL))
                continue
            header_bytes += len(name) + len(value)
            if _is_identity(lname):
                continue
            if lname == b"x-correlation-id":
                incoming_cid = value.decode("latin-1")
                continue
            if lname == b"origin":
                origin = value.decode("latin-1")
            elif lname == b"x-forwarded-for":
                forwarded.append(value.decode("latin-1"))
            elif lname == b"upgrade" and b"h2c" in value.lower():
                upgrade_h2c = True
            elif lname == b"access-control-request-method":
                preflight = True
            elif lname == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    bad_length = True
            kept.append((lname, value))
        scope["headers"] = kept
        cid = correlation.parse_correlation_id(incoming_cid) or correlation.new_correlation_id()
        scope["huleedu.correlation_id"] = cid
        client = scope.get("client")
        peer = str(client[0]) if client else ""
        scope["huleedu.client"] = self.config.client_address.resolve(peer, forwarded)
        allowed_origin = (
            origin if origin is not None and origin in self.config.cors_origins else None
        )

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen[0] = int(message["status"])
                headers = list(message.get("headers", ()))
                names = {n.lower() for n, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in names]
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                headers.append((b"x-correlation-id", cid.encode()))
                if allowed_origin is not None:
                    headers += [
                        (b"access-control-allow-origin", allowed_origin.encode()),
                        (b"access-control-expose-headers", EXPOSED_HEADERS),
                        (b"vary", b"Origin"),
                    ]
                message["headers"] = headers
            await send(message)

        async def refuse(error: HuleEduError, *, close: bool = False) -> None:
            log.info("request refused at the edge", code=error.code, reason=error.message)
            status, headers, body = problem_response_parts(error, cid, scope.get("path"))
            if close:
                headers.append((b"connection", b"close"))
            headers.append((b"content-length", str(len(body)).encode()))
            await send_wrapped(
                {"type": "http.response.start", "status": status, "headers": headers}
            )
            await send_wrapped({"type": "http.response.body", "body": body, "more_body": False})

        with correlation.bind_correlation_id(cid):
            method = scope.get("method", "")
            if method == "CONNECT":
                await refuse(MethodNotAllowedError("CONNECT is not supported", field="method"))
                return
            if upgrade_h2c:
                await refuse(ClientError("Upgrade: h2c is not supported", field="upgrade"))
                return
            if header_bytes > self.config.max_header_bytes:
                await refuse(
                    HeadersTooLargeError(
                        f"request headers exceed {self.config.max_header_bytes} bytes",
                        field="max_header_bytes",
                    ),
                    close=True,
                )
                return
            if preflight and method == "OPTIONS":
                await self._preflight(allowed_origin, origin, refuse, send_wrapped)
                return
            if bad_length:
                await refuse(ClientError("Content-Length is not a number", field="content-length"))
                return
            limits = self.config.streaming(method, str(scope.get("path", "")))
            if limits is not None:
                stream = BodyStream(
                    receive,
                    max_bytes=limits[0],
                    idle_timeout_s=limits[1],
                    content_length=content_length,
                )
                scope[BODY_SCOPE_KEY] = stream
                await self.app(scope, stream.app_receive(), send_wrapped)
                return
            try:
                body, tail = await self._read_body(receive, content_length)
            except _BodyCut as cut:
                if isinstance(cut.error, RequestTimeoutError):
                    self.stats.bodies_cut += 1
                await refuse(cut.error, close=cut.close)
                return
            await self.app(scope, self._replay(body, tail, receive), send_wrapped)

    async def _preflight(
        self,
        allowed_origin: str | None,
        origin: str | None,
        refuse: Callable[..., Awaitable[None]],
        send: Send,
    ) -> None:
        if allowed_origin is None:
            await refuse(PermissionDeniedError(f"origin {origin!r} is not allowed", field="origin"))
            return
        headers = [
            (b"access-control-allow-methods", ALLOWED_METHODS),
            (b"access-control-allow-headers", ALLOWED_REQUEST_HEADERS),
            (b"access-control-max-age", b"600"),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _read_body(
        self, receive: Receive, content_length: int | None
    ) -> tuple[bytes, Message | None]:
        limit = self.config.max_body_bytes
        if content_length is not None and content_length > limit:
            raise _BodyCut(
                PayloadTooLargeError(
                    f"request body of {content_length} bytes exceeds {limit}",
                    field="max_body_bytes",
                ),
                close=True,
            )
        chunks: list[bytes] = []
        size = 0
        with trio.move_on_after(self.config.body_timeout_s) as scope:
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return b"".join(chunks), message  # disconnect: the app sees it
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _BodyCut(
                        PayloadTooLargeError(
                            f"request body exceeds {limit} bytes", field="max_body_bytes"
                        ),
                        close=True,
                    )
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks), None
        assert scope.cancelled_caught
        raise _BodyCut(
            RequestTimeoutError(
                f"request body not received within {self.config.body_timeout_s:g} s",
                field="body_timeout_s",
            ),
            close=True,
        )

    @staticmethod
    def _replay(body: bytes, tail: Message | None, receive: Receive) -> Receive:
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                if tail is not None and not body:
                    return tail
                return {"type": "http.request", "body": body, "more_body": False}
            if tail is not None:
                return tail
            return await receive()

        return replay


def header_values(scope: Scope, name: bytes) -> Iterable[str]:
    for key, value in scope.get("headers", ()):
        if key == name:
            yield value.decode("latin-1")
