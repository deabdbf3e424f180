"""One trace across the hops: the caller's ``traceparent`` -> the gateway's HTTP server span ->
the gRPC client span of the IdentityService call (and the span names use route templates)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from common.tracing import setup_tracing
from tests.integration.gateway.conftest import TEACHER, Gateway

pytestmark = pytest.mark.slow

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


async def test_login_is_one_trace_from_the_caller_to_the_identity_call(start_gateway: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = setup_tracing("gateway-test", exporter=exporter)
    gateway: Gateway = await start_gateway(tracer_provider=provider)
    async with gateway.client() as client:
        reply = await client.post(
            "/v1/auth/login",
            json={"email": TEACHER.email, "password": TEACHER.password},
            headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01"},
        )
    assert reply.status_code == 200
    # The server span ends just after the response is written: wait for it.
    with trio.fail_after(5):
        while not any(s.kind is trace.SpanKind.SERVER for s in exporter.get_finished_spans()):
            await trio.sleep(0.01)
    spans = exporter.get_finished_spans()
    server = next(s for s in spans if s.kind is trace.SpanKind.SERVER)
    assert server.name == "POST /v1/auth/login"
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/auth/login"
    assert server.attributes["http.response.status_code"] == 200
    grpc = [s for s in spans if s.kind is trace.SpanKind.CLIENT]
    assert grpc, [s.name for s in spans]
    assert all(s.context.trace_id == server.context.trace_id for s in grpc)
    assert any(s.parent is not None and s.parent.span_id == server.context.span_id for s in grpc)
