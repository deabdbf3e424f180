from __future__ import annotations

import trio
import trio.lowlevel
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.tracing import (
    current_trace_ids,
    extract_context,
    extract_kafka_headers,
    inject_headers,
    inject_kafka_headers,
    setup_tracing,
)


def _provider() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = setup_tracing("test-svc", exporter=exporter)
    return provider.get_tracer("t"), exporter


def test_http_style_round_trip_continues_the_trace() -> None:
    tracer, exporter = _provider()
    carrier: dict[str, str] = {}
    with tracer.start_as_current_span("client") as client:
        inject_headers(carrier)
    assert carrier["traceparent"].startswith("00-")
    with tracer.start_as_current_span(
        "server", context=extract_context({"TraceParent": carrier["traceparent"]})
    ):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["server"].context.trace_id == client.get_span_context().trace_id
    assert spans["server"].parent is not None
    assert spans["server"].parent.span_id == client.get_span_context().span_id
    assert spans["server"].resource.attributes["service.name"] == "test-svc"


def test_kafka_headers_round_trip() -> None:
    tracer, exporter = _provider()
    headers: list[tuple[str, bytes]] = [("event_type", b"x")]
    with tracer.start_as_current_span("produce") as produce:
        inject_kafka_headers(headers)
    assert headers[0] == ("event_type", b"x")
    assert dict(headers)["traceparent"].startswith(b"00-")
    with tracer.start_as_current_span("consume", context=extract_kafka_headers(headers)):
        pass
    consume = next(s for s in exporter.get_finished_spans() if s.name == "consume")
    assert consume.context.trace_id == produce.get_span_context().trace_id


def test_malformed_context_starts_a_new_trace_without_error() -> None:
    tracer, exporter = _provider()
    for junk in (
        [("traceparent", b"\xff\xfe")],
        [("traceparent", b"00-zz-yy-01")],
        [("traceparent", None)],
    ):
        with tracer.start_as_current_span("c", context=extract_kafka_headers(junk)) as span:
            assert span.get_span_context().is_valid
    assert all(s.parent is None for s in exporter.get_finished_spans())


async def test_context_flows_into_child_tasks_and_threads() -> None:
    tracer, exporter = _provider()

    async def child() -> None:
        with tracer.start_as_current_span("child-task"):
            await trio.lowlevel.checkpoint()

    def in_thread() -> None:
        with tracer.start_as_current_span("in-thread"):
            pass

    with tracer.start_as_current_span("parent") as parent:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        await trio.to_thread.run_sync(in_thread)
    pid = parent.get_span_context().span_id
    for name in ("child-task", "in-thread"):
        span = next(s for s in exporter.get_finished_spans() if s.name == name)
        assert span.parent is not None and span.parent.span_id == pid, name


def test_current_trace_ids() -> None:
    tracer, _ = _provider()
    assert current_trace_ids() is None
    with tracer.start_as_current_span("s") as span:
        ids = current_trace_ids()
    assert ids == (
        format(span.get_span_context().trace_id, "032x"),
        format(span.get_span_context().span_id, "016x"),
    )
