"""Benchmark reports: ``perf/results/<name>.json`` plus ``perf/results/<name>.md``.

Every report records the commit, machine, date and exact command, so the numbers committed
with the code say where they came from. Benchmarks are never run as timed tests.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess  # nosec B404
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_DIR", "machine_info", "median", "percentile", "write_report"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).resolve().parent,
    ).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _command() -> str:
    """How the benchmark was started, without machine-specific paths."""
    script = Path(sys.argv[0]).resolve()
    here = Path(__file__).resolve().parent
    argv0 = f"-m perf.{script.stem}" if script.parent == here else script.name
    return " ".join(["python", argv0, *sys.argv[1:]])


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100) of ``values``."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(pct / 100 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def write_report(
    name: str,
    *,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    data: dict[str, Any],
    notes: Sequence[str] = (),
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (``data`` plus provenance) and ``<name>.md`` (a table)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    provenance: dict[str, Any] = {
        "commit": _commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": _command(),
        "machine": machine_info(),
    }
    json_path = RESULTS_DIR / f"{name}.json"
    json_path.write_text(json.dumps({**provenance, **data}, indent=2, sort_keys=True) + "\n")
    lines = [f"# {title}", ""]
    lines.append(
        f"commit `{provenance['commit']}`, {provenance['date']}, "
        f"Python {provenance['machine']['python']}, {provenance['machine']['cpu_count']} cores; "
        f"`{provenance['command']}`"
    )
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    md_path = RESULTS_DIR / f"{name}.md"
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path
