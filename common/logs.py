"""Structured logging: one JSON object per line on stderr, for our code and every library.

:func:`configure_logging` wires structlog *and* the standard library (hypercorn, grpclib,
librdkafka via the ``rdkafka`` logger) into the same renderer. Each line carries
``timestamp`` (ISO 8601 UTC), ``level``, ``logger``, ``service``, ``event`` and, taken from
context at the moment of logging, ``correlation_id`` and the current OpenTelemetry
``trace_id`` / ``span_id``.

Secrets never reach the output: values under keys that name credentials (token, password,
secret, authorization, cookie, ticket, api_key, ...) are replaced at any depth, and anything
that looks like a JWT or a ``Bearer`` credential inside any string is masked.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from opentelemetry import trace

from common import correlation

__all__ = ["REDACTED", "configure_logging", "get_logger", "redact"]

REDACTED = "[REDACTED]"
_SECRET_KEYS = re.compile(
    r"(token|password|passwd|secret|authorization|cookie|ticket|api[_-]?key|credential)",
    re.IGNORECASE,
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_PAIR = re.compile(
    r"\b(\w*(?:token|password|passwd|secret|api[_-]?key)\w*[\"']?\s*[=:]\s*[\"']?)[^\s,;\"'&]+",
    re.IGNORECASE,
)


def _mask(text: str) -> str:
    text = _BEARER.sub(r"\1" + REDACTED, _JWT.sub(REDACTED, text))
    return _PAIR.sub(r"\1" + REDACTED, text)


def redact(value: Any, key: str | None = None) -> Any:
    """``value`` with secrets removed (see the module docstring)."""
    if key is not None and _SECRET_KEYS.search(key) and not isinstance(value, bool | int):
        return REDACTED
    if isinstance(value, str):
        return _mask(value)
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def _redact_processor(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        event[key] = redact(event[key], None if key == "event" else key)
    return event


def _context_processor(
    _: Any, __: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    cid = correlation.current_correlation_id()
    if cid and "correlation_id" not in event:
        event["correlation_id"] = cid
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def configure_logging(
    *,
    service: str,
    level: str = "info",
    json: bool = True,
    stream: TextIO | None = None,
) -> None:
    """Configure structlog and stdlib logging for the process (safe to call again)."""

    def add_service(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event.setdefault("service", service)
        return event

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_service,
        _context_processor,
        structlog.processors.format_exc_info,
        _redact_processor,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_huleedu", False)]:
        root.removeHandler(old)
    handler._huleedu = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
