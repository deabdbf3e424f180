"""OpenTelemetry set-up and W3C trace-context propagation for HTTP, gRPC and Kafka.

:func:`setup_tracing` builds a provider for a service: OTLP/HTTP export when an endpoint is
configured, an explicit exporter for tests (e.g. ``InMemorySpanExporter``), otherwise no
export (spans still exist, so logs get trace ids). It installs the provider globally only
when asked: OpenTelemetry refuses to replace a global provider, so tests pass providers
explicitly instead.

Propagation uses the W3C ``traceparent`` / ``tracestate`` (and baggage) formats everywhere:
:func:`inject_headers` / :func:`extract_context` for string mappings (HTTP headers, gRPC
metadata), :func:`inject_kafka_headers` / :func:`extract_kafka_headers` for Kafka's
``(str, bytes)`` header lists. Malformed incoming context is ignored (a new trace starts).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter

__all__ = [
    "current_trace_ids",
    "extract_context",
    "extract_kafka_headers",
    "inject_headers",
    "inject_kafka_headers",
    "setup_tracing",
]

_KAFKA_KEYS = ("traceparent", "tracestate", "baggage")


def setup_tracing(
    service_name: str,
    otlp_endpoint: str = "",
    *,
    exporter: SpanExporter | None = None,
    set_global: bool = False,
) -> TracerProvider:
    """A provider for ``service_name``; see the module docstring for the export choice."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if set_global:
        trace.set_tracer_provider(provider)
    return provider


def inject_headers(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Write the current (or given) trace context into ``carrier``."""
    propagate.inject(carrier, context=context)


def extract_context(carrier: Mapping[str, str]) -> Context:
    """The trace context in ``carrier`` (keys compared case-insensitively)."""
    lowered = {k.lower(): v for k, v in carrier.items()}
    return propagate.extract(lowered)


def inject_kafka_headers(
    headers: list[tuple[str, bytes]], context: Context | None = None
) -> list[tuple[str, bytes]]:
    """Append the trace context to Kafka ``headers`` (in place; also returned)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    headers.extend((k, v.encode("ascii")) for k, v in carrier.items())
    return headers


def extract_kafka_headers(headers: Sequence[tuple[str, bytes | None]]) -> Context:
    """The trace context in Kafka ``headers``; junk or non-ASCII values are ignored."""
    carrier: dict[str, str] = {}
    for key, value in headers:
        if key.lower() in _KAFKA_KEYS and value is not None:
            try:
                carrier[key.lower()] = value.decode("ascii")
            except UnicodeDecodeError:
                continue
    return propagate.extract(carrier)


def current_trace_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` of the current span as lowercase hex, or None."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
