"""Trio-native gRPC client calls over grpclib.

Every call:

* gets its timeout from the caller's Trio deadline (``trio.current_effective_deadline()``),
  sent as ``grpc-timeout``; without a deadline it uses the channel's ``default_timeout_s``;
* carries ``traceparent`` (the client span) and ``x-correlation-id`` in metadata;
* raises only errors of our tree (see :func:`common.errors.from_grpc_status`): an unreachable
  server is :class:`~common.errors.UnavailableError`, a timeout
  :class:`~common.errors.DeadlineExceededError`; the field a server named for
  INVALID_ARGUMENT comes back in ``error.field``.

When the *caller's* own Trio scope expires first, the caller sees Trio's usual ``Cancelled`` /
``TooSlowError``; the asyncio call is cancelled too, grpclib resets the HTTP/2 stream and the
server's Trio handler is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import h2.exceptions
import trio
import trio_asyncio
from grpclib import GRPCError
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.events import RecvTrailingMetadata, listen
from grpclib.exceptions import StreamTerminatedError
from opentelemetry import trace

from common import correlation
from common.errors import (
    GRPC_FIELD_METADATA_KEY,
    DeadlineExceededError,
    HuleEduError,
    PayloadTooLargeError,
    UnavailableError,
    from_grpc_status,
)
from common.rpc._tracing import get_tracer, inject_metadata

__all__ = ["ClientStatistics", "RpcChannel", "StreamCall", "open_channel"]

Req = TypeVar("Req")
Resp = TypeVar("Resp")
StubT = TypeVar("StubT")

#: Seconds a call may take when the caller set no deadline.
DEFAULT_TIMEOUT_S = 10.0
#: Messages a client-streaming call buffers between the Trio sender and grpclib; bounds
#: memory to this many x the largest message (upload chunks are <= 1 MiB).
STREAM_BUFFER = 4


class _Trailers:
    __slots__ = ("field",)

    def __init__(self) -> None:
        self.field: str | None = None


_trailers: contextvars.ContextVar[_Trailers | None] = contextvars.ContextVar(
    "huleedu_rpc_trailers", default=None
)


async def _on_trailers(event: RecvTrailingMetadata) -> None:
    holder = _trailers.get()
    if holder is not None:
        value = event.metadata.get(GRPC_FIELD_METADATA_KEY)
        holder.field = value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    calls: int
    errors_by_code: dict[str, int]


class RpcChannel:
    """One HTTP/2 connection to a backend. Build with :func:`open_channel`."""

    def __init__(
        self,
        channel: Channel,
        *,
        service: str,
        default_timeout_s: float,
        tracer_provider: trace.TracerProvider | None,
    ) -> None:
        self._channel = channel
        self.service = service
        self._default_timeout_s = default_timeout_s
        self._tracer = get_tracer(tracer_provider)
        self._calls = 0
        self._errors: dict[str, int] = {}
        listen(channel, RecvTrailingMetadata, _on_trailers)

    def stub(self, stub_type: Callable[[Channel], StubT]) -> StubT:
        """A betterproto2 stub bound to this channel; pass its methods to :meth:`call`."""
        return stub_type(self._channel)

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(calls=self._calls, errors_by_code=dict(self._errors))

    def _timeout(self) -> float:
        deadline = trio.current_effective_deadline()
        if math.isinf(deadline):
            return self._default_timeout_s
        remaining = deadline - trio.current_time()
        if remaining <= 0:
            raise DeadlineExceededError(
                f"{self.service}: no time left for the call", service=self.service
            )
        return remaining

    def _metadata(self) -> dict[str, str]:
        metadata: dict[str, str] = {}
        cid = correlation.current_correlation_id()
        if cid:
            metadata[correlation.METADATA_KEY] = cid
        inject_metadata(metadata)
        return metadata

    def _map(self, exc: BaseException, holder: _Trailers) -> HuleEduError | None:
        if isinstance(exc, GRPCError):
            return from_grpc_status(
                exc.status, exc.message, service=self.service, field=holder.field
            )
        if isinstance(exc, asyncio.TimeoutError | TimeoutError):
            return DeadlineExceededError(f"{self.service}: deadline exceeded", service=self.service)
        if isinstance(exc, h2.exceptions.StreamClosedError):
            # The server ended a client stream while we were still sending (it refused the
            # upload); grpclib then fails on the closed HTTP/2 stream before it reads the
            # server's status, so all that is known is that the call was refused.
            return UnavailableError(
                f"{self.service}: the server closed the stream before it ended",
                service=self.service,
            )
        if isinstance(exc, StreamTerminatedError | ConnectionError | OSError):
            return UnavailableError(
                f"{self.service}: {type(exc).__name__}: {exc}", service=self.service
            )
        return None

    def _count_error(self, err: HuleEduError) -> None:
        self._errors[err.code] = self._errors.get(err.code, 0) + 1

    async def call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Any,
        *,
        idempotent: bool = False,
    ) -> Resp:
        """Call a unary stub ``method`` (e.g. ``stub.get_batch``) with ``request``.

        ``idempotent`` marks reads that a retry layer may repeat; this layer itself never
        retries. Raises errors of our tree only (and Trio's ``Cancelled``).
        """
        self._calls += 1
        name = getattr(method, "__name__", "call")
        with self._tracer.start_as_current_span(
            f"{self.service}/{name}",
            kind=trace.SpanKind.CLIENT,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": self.service,
                "rpc.method": name,
                "huleedu.idempotent": idempotent,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            holder = _Trailers()
            token = _trailers.set(holder)
            try:
                timeout = self._timeout()
                response: Resp = await trio_asyncio.aio_as_trio(method)(
                    request, timeout=timeout, metadata=self._metadata()
                )
            except (GRPCError, TimeoutError, StreamTerminatedError, OSError) as exc:
                mapped = self._map(exc, holder)
                if mapped is None:
                    raise
                self._count_error(mapped)
                span.set_attribute("rpc.grpc.status_code", mapped.grpc_status.value)
                span.set_status(trace.Status(trace.StatusCode.ERROR, mapped.code))
                raise mapped from None
            except DeadlineExceededError as exc:
                self._count_error(exc)
                raise
            finally:
                _trailers.reset(token)
            span.set_attribute("rpc.grpc.status_code", 0)
            return response

    @asynccontextmanager
    async def stream_unary(
        self, method: Callable[..., Awaitable[Resp]]
    ) -> AsyncIterator[StreamCall[Any, Resp]]:
        """A client-streaming call (e.g. ``stub.upload_files``)::

            async with channel.stream_unary(stub.upload_files) as call:
                await call.send(header)
                ...
                response = await call.finish()

        Leaving the block without ``finish()`` (an error, a cancel) cancels the call, which
        the server sees as an aborted stream. Sending waits while the buffer is full.
        """
        self._calls += 1
        name = getattr(method, "__name__", "call")
        send, receive = trio.open_memory_channel[Any](STREAM_BUFFER)
        call: StreamCall[Any, Resp] = StreamCall(send)
        with self._tracer.start_as_current_span(
            f"{self.service}/{name}",
            kind=trace.SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": self.service, "rpc.method": name},
            record_exception=False,
            set_status_on_exception=False,
        ):
            timeout = self._timeout()
            metadata = self._metadata()
            holder = _Trailers()

            async def messages() -> AsyncIterator[Any]:
                # Runs on asyncio; pulls each message from the Trio side.
                while True:
                    item = await trio_asyncio.trio_as_aio(receive.receive)()
                    if item is _END:
                        return
                    yield item

            async def run() -> None:
                token = _trailers.set(holder)
                try:
                    call._response = await trio_asyncio.aio_as_trio(method)(
                        messages(), timeout=timeout, metadata=metadata
                    )
                except (
                    GRPCError,
                    TimeoutError,
                    StreamTerminatedError,
                    OSError,
                    h2.exceptions.StreamClosedError,
                ) as exc:
                    mapped = self._map(exc, holder)
                    if mapped is None:
                        raise
                    if isinstance(exc, GRPCError) and exc.status is Status.RESOURCE_EXHAUSTED:
                        # In a client stream this is a size/count limit. When the server ends
                        # the call mid-stream grpclib drops the trailers (and the field).
                        mapped = PayloadTooLargeError(
                            exc.message or "limit exceeded",
                            field=holder.field,
                            service=self.service,
                        )
                    self._count_error(mapped)
                    call._error = mapped
                except trio.ClosedResourceError:
                    pass  # the caller aborted the stream (see _abort): its error is raised
                finally:
                    _trailers.reset(token)
                    # Unblock a sender waiting on a full buffer: the call is over.
                    receive.close()
                    call._done.set()

            # The caller's own exception is re-raised after the nursery, never wrapped in an
            # ExceptionGroup.
            body_error: BaseException | None = None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                try:
                    yield call
                except BaseException as exc:
                    body_error = exc
                    _abort(receive, nursery)
                else:
                    if not call._finished:
                        _abort(receive, nursery)
            if body_error is not None:
                raise body_error
            if call._error is not None:
                raise call._error


_END: Any = object()


def _abort(receive: trio.MemoryReceiveChannel[Any], nursery: trio.Nursery) -> None:
    """Abort a client stream whose caller gave up.

    Closing the receive side first makes the asyncio-side message iterator, if it is waiting
    for the next message, raise at once (a waiting ``trio_as_aio`` receive is not reliably
    woken by cancelling the asyncio task alone: measured, the call could hang forever). The
    iterator raising (never ending) makes grpclib reset the stream, so the server sees an
    aborted upload, not a complete one. Cancelling then cuts whatever else is in flight.
    """
    receive.close()
    nursery.cancel_scope.cancel()


class StreamCall(Generic[Req, Resp]):
    """The sending side of a client-streaming call; see :meth:`RpcChannel.stream_unary`."""

    def __init__(self, send: trio.MemorySendChannel[Any]) -> None:
        self._send = send
        self._done = trio.Event()
        self._response: Resp | None = None
        self._error: HuleEduError | None = None
        self._finished = False

    async def send(self, message: Req) -> None:
        """Queue one message; raises the call's error if the server already ended it."""
        if self._done.is_set():
            self._raise()
        try:
            await self._send.send(message)
        except trio.BrokenResourceError:
            # The server ended the call mid-stream (e.g. a limit): report why.
            await self._done.wait()
            self._raise()
            raise UnavailableError("the stream was closed by the server", service="rpc") from None

    async def finish(self) -> Resp:
        """Half-close and wait for the server's response."""
        self._finished = True
        if not self._done.is_set():
            with contextlib.suppress(trio.BrokenResourceError):
                await self._send.send(_END)
            await self._done.wait()
        self._raise()
        if self._response is None:
            raise UnavailableError("stream ended without a response", service="rpc")
        return self._response

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        from common.errors import ValidationError

        raise ValidationError(f"gRPC target must be host:port, got {target!r}", field="target")
    return host.strip("[]"), int(port)


@asynccontextmanager
async def open_channel(
    target: str,
    *,
    service: str,
    tls: ssl.SSLContext | None = None,
    default_timeout_s: float = DEFAULT_TIMEOUT_S,
    tracer_provider: trace.TracerProvider | None = None,
) -> AsyncIterator[RpcChannel]:
    """A channel to ``target`` (``host:port``) named ``service`` in errors, spans and metrics.

    Must be used inside :func:`~common.rpc.open_rpc_loop`. The connection is made lazily on
    the first call and closed when the block ends.
    """
    host, port = _split_target(target)
    channel = Channel(host, port, ssl=tls)
    try:
        yield RpcChannel(
            channel,
            service=service,
            default_timeout_s=default_timeout_s,
            tracer_provider=tracer_provider,
        )
    finally:
        channel.close()
