"""Span helpers shared by the gRPC client and server."""

from __future__ import annotations

from opentelemetry import trace

from common.tracing import extract_context as extract_metadata
from common.tracing import inject_headers as inject_metadata

__all__ = ["extract_metadata", "get_tracer", "inject_metadata"]

TRACER_NAME = "huleedu.rpc"


def get_tracer(provider: trace.TracerProvider | None) -> trace.Tracer:
    return (provider or trace.get_tracer_provider()).get_tracer(TRACER_NAME)
