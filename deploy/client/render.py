"""Rendering live events as text: :func:`event_summary` makes one short line of an
``event`` frame's data (:func:`event_data`), :func:`clock_time` the time it happened."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

__all__ = ["clock_time", "event_data", "event_summary"]


def _phases_text(phases: Any) -> str:
    parts = []
    for item in phases if isinstance(phases, list) else []:
        if not isinstance(item, dict):
            continue
        done = int(item.get("succeeded") or 0) + int(item.get("failed") or 0)
        failed = f" ({item['failed']} failed)" if item.get("failed") else ""
        parts.append(f"{item.get('phase')} {done}/{item.get('total')}{failed}")
    return ", ".join(parts)


def event_data(body: Mapping[str, Any]) -> dict[str, Any]:
    """An ``event`` frame's ``data`` object (``{}`` if it is missing or not an object)."""
    data = body.get("data")
    return data if isinstance(data, dict) else {}


def event_summary(event_type: str, data: Mapping[str, Any], *, limit: int = 100) -> str:
    """One line for an event's ``data``: status, phase and per-phase progress for batch
    notifications, the file for uploads, else its scalar fields (cut to ``limit``)."""
    if event_type == "file_uploaded" and "filename" in data:
        text = f"{data['filename']} ({data.get('size_bytes', '?')} bytes)"
    elif "status" in data:
        phase = f" phase={data['current_phase']}" if data.get("current_phase") else ""
        progress = _phases_text(data.get("phases"))
        text = f"status={data['status']}{phase}" + (f" [{progress}]" if progress else "")
    else:
        text = " ".join(
            f"{k}={v}"
            for k, v in data.items()
            if k != "batch_id" and not isinstance(v, dict | list)
        )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clock_time(occurred_at: Any) -> str:
    """``12:03:07.418`` from an RFC 3339 timestamp (the input itself if it is not one)."""
    try:
        when = dt.datetime.fromisoformat(str(occurred_at))
    except ValueError:
        return str(occurred_at)
    return when.strftime("%H:%M:%S.") + f"{when.microsecond // 1000:03d}"
