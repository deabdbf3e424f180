"""Correlation ids: one id per originating request, carried through HTTP headers
(``X-Correlation-ID``), gRPC metadata (``x-correlation-id``), event envelopes and logs.

The id lives in a context variable. Trio copies the context into child tasks and into
``to_thread`` workers, and trio-asyncio carries it across the asyncio bridge, so binding it
once at the edge is enough.
"""

from __future__ import annotations

import contextvars
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "HEADER",
    "METADATA_KEY",
    "bind_correlation_id",
    "current_correlation_id",
    "new_correlation_id",
    "parse_correlation_id",
]

HEADER = "X-Correlation-ID"
METADATA_KEY = "x-correlation-id"
_VALID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "huleedu_correlation_id", default=None
)


def current_correlation_id() -> str | None:
    return _current.get()


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def parse_correlation_id(value: str | None) -> str | None:
    """A well-formed incoming id (1-128 of ``A-Za-z0-9._:-``), else None.

    Callers generate a fresh id for None: hostile input is never echoed back or logged.
    """
    if value is None or not _VALID.fullmatch(value):
        return None
    return value


@contextmanager
def bind_correlation_id(value: str) -> Iterator[str]:
    """Make ``value`` the current correlation id inside the block."""
    token = _current.set(value)
    try:
        yield value
    finally:
        _current.reset(token)
