"""common/rpc over real sockets (127.0.0.1, port 0): typed round trips, error mapping,
deadline propagation and cancellation into the server's Trio code, trace parentage, TLS,
client streaming and graceful shutdown."""

from __future__ import annotations

import contextlib
import math
import ssl
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
import trio.lowlevel
import trustme
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common import correlation
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import (
    DeadlineExceededError,
    DependencyError,
    NotFoundError,
    PayloadTooLargeError,
    UnavailableError,
    ValidationError,
)
from common.rpc import RpcChannel, open_channel, open_rpc_loop, serve_grpc

pytestmark = pytest.mark.slow

ACTOR = common_v1.Actor(user_id="u1", org_id="o1", roles=["teacher"])


class Results(results_v1.ResultServiceBase):
    """A Trio servicer: its methods use Trio primitives only."""

    def __init__(self, tracer_provider: TracerProvider) -> None:
        self.tracer = tracer_provider.get_tracer("test-business")
        self.cancelled = trio.Event()
        self.started = trio.Event()
        self.seen_deadline_s: float | None = None
        self.seen_correlation: str | None = None
        self.finished_slow = False

    async def get_batch(self, message: results_v1.GetBatchRequest) -> results_v1.GetBatchResponse:
        self.seen_correlation = correlation.current_correlation_id()
        with self.tracer.start_as_current_span("business"):
            await trio.lowlevel.checkpoint()
        if message.batch_id == "missing":
            raise NotFoundError("batch missing not found")
        if message.batch_id == "bad":
            raise ValidationError("batch_id must be a UUID", field="batch_id")
        if message.batch_id == "boom":
            raise RuntimeError("database password is hunter2")
        if message.batch_id in ("slow", "drain"):
            self.seen_deadline_s = trio.current_effective_deadline() - trio.current_time()
            self.started.set()
            try:
                await trio.sleep(0.5 if message.batch_id == "drain" else 60)
            except trio.Cancelled:
                self.cancelled.set()
                raise
            self.finished_slow = True
        return results_v1.GetBatchResponse(
            batch=results_v1.BatchView(
                batch_id=message.batch_id,
                owner_user_id=message.actor.user_id if message.actor else "",
                status=results_v1.BatchStatus.PROCESSING,
            )
        )


class Files(files_v1.FileServiceBase):
    def __init__(self) -> None:
        self.aborted = trio.Event()
        self.receiving = trio.Event()

    async def upload_files(
        self, messages: AsyncIterator[files_v1.UploadFilesRequest]
    ) -> files_v1.UploadFilesResponse:
        chunks: list[bytes] = []
        header = None
        try:
            async for message in messages:
                self.receiving.set()
                if message.chunk is not None and len(message.chunk) > 10_000:
                    raise PayloadTooLargeError("file over 10 kB", field="max_file_bytes")
                if message.header is not None:
                    header = message.header
                elif message.chunk is not None:
                    chunks.append(message.chunk)
        except trio.Cancelled:
            self.aborted.set()
            raise
        data = b"".join(chunks)
        return files_v1.UploadFilesResponse(
            upload_id=header.upload_id if header else "",
            files=[files_v1.FileInfo(file_id="f1", size_bytes=len(data), sha256=data[:8].hex())],
        )


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
async def served(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> AsyncIterator[tuple[Results, Files, RpcChannel]]:
    provider, _ = spans
    results, files = Results(provider), Files()
    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_grpc, [results, files], tracer_provider=provider))
        async with open_channel(
            f"127.0.0.1:{port}", service="results", tracer_provider=provider
        ) as channel:
            yield results, files, channel
        nursery.cancel_scope.cancel()


def _request(batch_id: str) -> results_v1.GetBatchRequest:
    return results_v1.GetBatchRequest(actor=ACTOR, batch_id=batch_id)


async def test_typed_round_trip(served: tuple[Results, Files, RpcChannel]) -> None:
    _, _, channel = served
    stub = channel.stub(results_v1.ResultServiceStub)
    reply = await channel.call(stub.get_batch, _request("b1"), idempotent=True)
    assert isinstance(reply, results_v1.GetBatchResponse)
    assert reply.batch is not None
    assert (reply.batch.batch_id, reply.batch.owner_user_id) == ("b1", "u1")
    assert reply.batch.status is results_v1.BatchStatus.PROCESSING


async def test_not_found_and_validation_errors_map_with_the_field(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    _, _, channel = served
    stub = channel.stub(results_v1.ResultServiceStub)
    with pytest.raises(NotFoundError) as nf:
        await channel.call(stub.get_batch, _request("missing"))
    assert nf.value.detail == "batch missing not found"
    with pytest.raises(ValidationError) as bad:
        await channel.call(stub.get_batch, _request("bad"))
    assert bad.value.field == "batch_id"
    assert channel.statistics().errors_by_code == {"not_found": 1, "validation_failed": 1}


async def test_unexpected_server_error_leaks_nothing(
    served: tuple[Results, Files, RpcChannel], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, channel = served
    stub = channel.stub(results_v1.ResultServiceStub)
    with pytest.raises(DependencyError) as info:
        await channel.call(stub.get_batch, _request("boom"))
    assert "hunter2" not in info.value.detail
    assert "hunter2" not in info.value.message
    assert any("unhandled error" in r.message for r in caplog.records)


async def test_unreachable_server_is_unavailable() -> None:
    async with open_rpc_loop():
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        listener.close()  # nothing listens there now
        async with open_channel(f"127.0.0.1:{port}", service="results") as channel:
            stub = channel.stub(results_v1.ResultServiceStub)
            with trio.fail_after(5), pytest.raises(UnavailableError) as info:
                await channel.call(stub.get_batch, _request("b1"))
    assert info.value.service == "results"


async def test_caller_deadline_is_sent_and_cancels_the_server_code(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    results, _, channel = served
    stub = channel.stub(results_v1.ResultServiceStub)
    # The server's copy of the deadline and the caller's own scope expire together: the
    # caller sees whichever fires first - its own cancellation or DEADLINE_EXCEEDED.
    with trio.move_on_after(0.4):
        with contextlib.suppress(DeadlineExceededError):
            await channel.call(stub.get_batch, _request("slow"))
            raise AssertionError("the slow call returned")
    with trio.fail_after(2):
        await results.cancelled.wait()
    assert results.seen_deadline_s is not None
    # The caller's remaining budget arrived (not the 10 s default, not unbounded).
    assert 0 < results.seen_deadline_s <= 0.4, results.seen_deadline_s


async def test_call_without_a_caller_deadline_uses_the_default_timeout(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    results, _, channel = served
    outcome: list[BaseException] = []
    async with open_channel(
        f"127.0.0.1:{channel_port(channel)}", service="results", default_timeout_s=0.3
    ) as short:
        stub = short.stub(results_v1.ResultServiceStub)
        async with trio.open_nursery() as nursery:

            async def call_without_deadline() -> None:
                # No Trio deadline here, so grpc-timeout is the channel default (0.3 s).
                assert math.isinf(trio.current_effective_deadline())
                try:
                    await short.call(stub.get_batch, _request("slow"))
                except DeadlineExceededError as exc:
                    outcome.append(exc)
                nursery.cancel_scope.cancel()

            async def watchdog() -> None:
                await trio.sleep(5)
                outcome.append(AssertionError("the call outlived its 0.3 s default timeout"))
                nursery.cancel_scope.cancel()

            nursery.start_soon(call_without_deadline)
            nursery.start_soon(watchdog)
    assert len(outcome) == 1
    assert isinstance(outcome[0], DeadlineExceededError), outcome
    with trio.fail_after(2):
        await results.cancelled.wait()


def channel_port(channel: RpcChannel) -> int:
    return int(channel.stub(lambda ch: ch)._port)


async def test_client_cancellation_reaches_the_server_trio_code(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    results, _, channel = served
    stub = channel.stub(results_v1.ResultServiceStub)
    async with trio.open_nursery() as nursery:
        cancel = trio.CancelScope()

        async def caller() -> None:
            with cancel:
                await channel.call(stub.get_batch, _request("slow"))

        nursery.start_soon(caller)
        with trio.fail_after(2):
            await results.started.wait()
        assert math.isinf(trio.current_effective_deadline())
        cancel.cancel()
    with trio.fail_after(2):
        await results.cancelled.wait()


async def test_one_trace_across_client_server_and_business_spans(
    served: tuple[Results, Files, RpcChannel],
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    results, _, channel = served
    provider, exporter = spans
    stub = channel.stub(results_v1.ResultServiceStub)
    with (
        correlation.bind_correlation_id("corr-123"),
        provider.get_tracer("test").start_as_current_span("edge") as edge,
    ):
        await channel.call(stub.get_batch, _request("b1"))
    assert results.seen_correlation == "corr-123"
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    client = by_name["results/get_batch"]
    server = by_name["huleedu.results.v1.ResultService/GetBatch"]
    business = by_name["business"]
    trace_id = edge.get_span_context().trace_id
    assert {client.context.trace_id, server.context.trace_id, business.context.trace_id} == {
        trace_id
    }
    assert client.kind is trace.SpanKind.CLIENT and server.kind is trace.SpanKind.SERVER
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert business.parent is not None and business.parent.span_id == server.context.span_id


async def test_client_streaming_upload_arrives_in_order(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    _, _, channel = served
    stub = channel.stub(files_v1.FileServiceStub)
    payload = bytes(range(256)) * 64
    async with channel.stream_unary(stub.upload_files) as call:
        await call.send(
            files_v1.UploadFilesRequest(
                header=files_v1.UploadHeader(actor=ACTOR, batch_id="b1", upload_id="up-1")
            )
        )
        for i in range(0, len(payload), 1000):
            await call.send(files_v1.UploadFilesRequest(chunk=payload[i : i + 1000]))
        reply = await call.finish()
    assert reply.upload_id == "up-1"
    assert reply.files[0].size_bytes == len(payload)
    assert reply.files[0].sha256 == payload[:8].hex()


async def test_abandoned_upload_is_cancelled_on_the_server(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    _, files, channel = served
    stub = channel.stub(files_v1.FileServiceStub)
    with pytest.raises(KeyError):
        async with channel.stream_unary(stub.upload_files) as call:
            await call.send(files_v1.UploadFilesRequest(chunk=b"partial"))
            with trio.fail_after(2):
                await files.receiving.wait()
            raise KeyError("client gave up")
    with trio.fail_after(2):
        await files.aborted.wait()


async def test_giving_up_while_the_sender_waits_for_the_next_message_never_hangs(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    # Regression: the caller raising while grpclib's side waited for the next message left
    # the call hanging forever (cancelling the asyncio task did not wake that wait).
    _, _, channel = served
    stub = channel.stub(files_v1.FileServiceStub)
    for messages in range(1, 30):
        with trio.fail_after(5), pytest.raises(KeyError):
            async with channel.stream_unary(stub.upload_files) as call:
                for _ in range(messages):
                    await call.send(files_v1.UploadFilesRequest(chunk=b"essay"))
                raise KeyError("client gave up")


async def test_a_limit_hit_mid_upload_ends_the_senders_wait_with_the_error(
    served: tuple[Results, Files, RpcChannel],
) -> None:
    _, _, channel = served
    stub = channel.stub(files_v1.FileServiceStub)
    with trio.fail_after(10), pytest.raises(PayloadTooLargeError):
        async with channel.stream_unary(stub.upload_files) as call:
            for _ in range(100):  # far more than the stream buffer holds
                await call.send(files_v1.UploadFilesRequest(chunk=b"x" * 20_000))
            await call.finish()


async def test_unimplemented_methods_answer_unimplemented_not_internal(
    served: tuple[Results, Files, RpcChannel], caplog: pytest.LogCaptureFixture
) -> None:
    _, _, channel = served
    stub = channel.stub(results_v1.ResultServiceStub)
    with pytest.raises(DependencyError) as info:
        await channel.call(stub.list_batches, results_v1.ListBatchesRequest(actor=ACTOR))
    assert "UNIMPLEMENTED" in info.value.message
    assert not any("unhandled error" in r.message for r in caplog.records)


async def test_graceful_shutdown_lets_an_in_flight_call_finish(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, _ = spans
    results = Results(provider)
    stop = trio.Event()
    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_grpc, [results], shutdown_trigger=stop.wait))
        async with open_channel(f"127.0.0.1:{port}", service="results") as channel:
            stub = channel.stub(results_v1.ResultServiceStub)

            async def stop_when_started() -> None:
                await results.started.wait()
                stop.set()

            nursery.start_soon(stop_when_started)
            with trio.fail_after(5):
                reply = await channel.call(stub.get_batch, _request("drain"))
    assert reply.batch is not None and reply.batch.batch_id == "drain"
    assert results.finished_slow


async def test_round_trip_over_tls() -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    server_ctx.set_alpn_protocols(["h2"])
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    client_ctx.set_alpn_protocols(["h2"])
    provider = TracerProvider()
    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(
            partial(serve_grpc, [Results(provider)], tls=server_ctx, tracer_provider=provider)
        )
        async with open_channel(f"127.0.0.1:{port}", service="results", tls=client_ctx) as channel:
            stub = channel.stub(results_v1.ResultServiceStub)
            with trio.fail_after(5):
                reply = await channel.call(stub.get_batch, _request("tls"))
        nursery.cancel_scope.cancel()
    assert reply.batch is not None and reply.batch.batch_id == "tls"
