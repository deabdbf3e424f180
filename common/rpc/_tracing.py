"""Span helpers shared by the gRPC client and server."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

__all__ = ["extract_metadata", "get_tracer", "inject_metadata"]

TRACER_NAME = "huleedu.rpc"


def get_tracer(provider: trace.TracerProvider | None) -> trace.Tracer:
    return (provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)


def inject_metadata(metadata: MutableMapping[str, str]) -> None:
    """Add W3C ``traceparent`` (and ``tracestate``) of the current span to gRPC metadata."""
    propagate.inject(metadata)


def extract_metadata(metadata: Mapping[str, str]) -> Context:
    return propagate.extract(metadata)
