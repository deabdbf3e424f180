"""Serving betterproto2 servicers whose handlers are Trio code.

Write a servicer as usual - subclass the generated ``...ServiceBase`` and implement its async
methods - but write those methods as **Trio** code (``trio.sleep``, nurseries, our clients).
:func:`serve_grpc` receives and sends messages on grpclib's asyncio side and crosses into Trio
once per call for the method. Inside the method:

* ``trio.current_effective_deadline()`` is the caller's deadline (from ``grpc-timeout``), so
  nested calls inherit the remaining budget; at the deadline the method is cancelled and the
  caller gets DEADLINE_EXCEEDED; a caller that goes away cancels it too;
* the server span is current (its parent is the caller's span, via ``traceparent``) and the
  caller's correlation id is bound;
* raising an error of our tree answers its gRPC status with its client-safe detail (and the
  field name in trailing metadata); any other exception answers INTERNAL with a generic
  message and is logged with its traceback.

Client-streaming methods receive an async iterator of messages they ``async for`` over.
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

import trio
import trio_asyncio
from grpclib import GRPCError
from grpclib.const import Cardinality, Handler, Status
from grpclib.server import Server, Stream
from opentelemetry import trace

from common import correlation
from common.errors import GRPC_FIELD_METADATA_KEY, DeadlineExceededError, HuleEduError
from common.rpc._loop import open_rpc_loop
from common.rpc._tracing import extract_metadata, get_tracer

__all__ = ["serve_grpc"]

log = logging.getLogger(__name__)

#: Seconds in-flight calls get to finish when the server stops.
DEFAULT_GRACE_S = 5.0


class _Failed:
    """Marker: the call already ended with an error status."""


_FAILED = _Failed()


class _InFlight:
    """Counts calls being handled so shutdown can wait for them to finish.

    Updated from grpclib's handlers, which run on the trio-asyncio loop inside this Trio run,
    so touching the Trio event here is safe.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def enter(self) -> None:
        if self.count == 0:
            self._idle = trio.Event()
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _TrioServicer:
    """Presents ``impl``'s methods to grpclib, running each in Trio."""

    def __init__(self, impl: Any, tracer: trace.Tracer, in_flight: _InFlight) -> None:
        self._tracer = tracer
        self._in_flight = in_flight
        self._mapping: dict[str, Handler] = {}
        for path, handler in impl.__mapping__().items():
            service, _, rpc = path.rpartition("/")
            # The generated handler is ``__rpc_<method name>``: exact, unlike re-casing ``rpc``.
            method = getattr(impl, handler.func.__name__.removeprefix("__rpc_"))
            span_name = f"{service.lstrip('/')}/{rpc}"
            if handler.cardinality is Cardinality.UNARY_UNARY:
                func = self._unary(method, span_name)
            elif handler.cardinality is Cardinality.STREAM_UNARY:
                func = self._stream_unary(method, span_name)
            else:
                raise NotImplementedError(f"{path}: {handler.cardinality.name} is not supported")
            self._mapping[path] = Handler(
                func, handler.cardinality, handler.request_type, handler.reply_type
            )

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping

    def _unary(
        self, method: Callable[[Any], Awaitable[Any]], span_name: str
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def handle(stream: Stream[Any, Any]) -> None:
            await self._respond(stream, method, await stream.recv_message(), span_name)

        return handle

    def _stream_unary(
        self, method: Callable[[Any], Awaitable[Any]], span_name: str
    ) -> Callable[[Stream[Any, Any]], Awaitable[None]]:
        async def handle(stream: Stream[Any, Any]) -> None:
            async def messages() -> AsyncGenerator[Any, None]:
                while True:
                    message = await trio_asyncio.aio_as_trio(stream.recv_message)()
                    if message is None:
                        return
                    yield message

            incoming = messages()
            try:
                await self._respond(stream, method, incoming, span_name)
            finally:
                # A method that stops early (an error after the header) leaves it suspended;
                # closing runs no await, so it is safe from this (asyncio) side.
                await incoming.aclose()

        return handle

    async def _respond(
        self,
        stream: Stream[Any, Any],
        method: Callable[[Any], Awaitable[Any]],
        argument: Any,
        span_name: str,
    ) -> None:
        # Counted until the response is sent, so a drain never cuts a reply short.
        self._in_flight.enter()
        try:
            response = await self._run(stream, method, argument, span_name)
            if response is not _FAILED:
                await stream.send_message(response)
        finally:
            self._in_flight.leave()

    async def _run(
        self,
        stream: Stream[Any, Any],
        method: Callable[[Any], Awaitable[Any]],
        argument: Any,
        span_name: str,
    ) -> Any:
        """On asyncio: run ``method`` in Trio; turn our errors into gRPC statuses."""
        try:
            return await trio_asyncio.trio_as_aio(self._in_trio)(
                stream, method, argument, span_name
            )
        except HuleEduError as err:
            metadata = {GRPC_FIELD_METADATA_KEY: err.field} if err.field else None
            await stream.send_trailing_metadata(
                status=err.grpc_status, status_message=err.detail, metadata=metadata
            )
            return _FAILED
        except GRPCError:
            raise  # a status the handler chose itself (e.g. the generated UNIMPLEMENTED)
        except Exception:
            log.exception("unhandled error in gRPC handler %s", span_name)
            await stream.send_trailing_metadata(
                status=Status.INTERNAL, status_message="internal error"
            )
            return _FAILED

    async def _in_trio(
        self,
        stream: Stream[Any, Any],
        method: Callable[[Any], Awaitable[Any]],
        argument: Any,
        span_name: str,
    ) -> Any:
        metadata = {k: v for k, v in (stream.metadata or {}).items() if isinstance(v, str)}
        cid = correlation.parse_correlation_id(metadata.get(correlation.METADATA_KEY))
        remaining = stream.deadline.time_remaining() if stream.deadline else math.inf
        with (
            correlation.bind_correlation_id(cid or correlation.new_correlation_id()),
            self._tracer.start_as_current_span(
                span_name,
                context=extract_metadata(metadata),
                kind=trace.SpanKind.SERVER,
                attributes={
                    "rpc.system": "grpc",
                    "rpc.service": span_name.rpartition("/")[0],
                    "rpc.method": span_name.rpartition("/")[2],
                },
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
        ):
            with trio.move_on_after(remaining) as scope:
                try:
                    result = await method(argument)
                except HuleEduError as err:
                    span.set_attribute("rpc.grpc.status_code", err.grpc_status.value)
                    raise
                span.set_attribute("rpc.grpc.status_code", 0)
                return result
            if scope.cancelled_caught:
                span.set_attribute("rpc.grpc.status_code", Status.DEADLINE_EXCEEDED.value)
            raise DeadlineExceededError(f"{span_name}: deadline exceeded", service=span_name)


async def serve_grpc(
    servicers: Sequence[Any],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ssl.SSLContext | None = None,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    grace_s: float = DEFAULT_GRACE_S,
    tracer_provider: trace.TracerProvider | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``servicers`` (generated ``...ServiceBase`` subclasses with Trio methods).

    Reports the bound port through ``task_status`` once listening. Runs until
    ``shutdown_trigger`` returns or until cancelled; either way it then drains: stops
    accepting connections, lets in-flight calls finish for up to ``grace_s`` (grpclib's own
    ``close()`` would cancel them at once), then cancels what is left.
    """
    tracer = get_tracer(tracer_provider)
    in_flight = _InFlight()
    async with open_rpc_loop():
        server = Server([_TrioServicer(s, tracer, in_flight) for s in servicers])
        await trio_asyncio.aio_as_trio(server.start)(host, port, ssl=tls)
        sockets = getattr(server._server, "sockets", None) or ()
        bound = sockets[0].getsockname()[1] if sockets else port
        task_status.started(bound)
        try:
            if shutdown_trigger is None:
                await trio.sleep_forever()
            else:
                await shutdown_trigger()
        finally:
            with trio.CancelScope(shield=True):
                listener = server._server
                if listener is not None:
                    listener.close()  # no new connections
                with trio.move_on_after(grace_s):
                    await in_flight.wait_idle()
                if in_flight.count:
                    log.warning("gRPC shutdown: cancelling %d unfinished calls", in_flight.count)
                server.close()
                with trio.move_on_after(grace_s):
                    await trio_asyncio.aio_as_trio(server.wait_closed)()
