"""Run benchmarks: ``python -m perf`` runs every ``perf/bench_*.py``; ``python -m perf rpc``
runs those whose name contains ``rpc``. Each runs in its own process (no shared state, a clean
asyncio/trio loop policy) and writes its report to ``perf/results/``."""

from __future__ import annotations

import subprocess  # nosec B404
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    here = Path(__file__).resolve().parent
    names = sorted(p.stem for p in here.glob("bench_*.py"))
    selected = [n for n in names if not argv or any(a in n for a in argv)]
    if not selected:
        print(f"no benchmark matches {argv}; available: {', '.join(names)}", file=sys.stderr)
        return 2
    failed = []
    for name in selected:
        print(f"== perf.{name}", flush=True)
        rc = subprocess.run([sys.executable, "-m", f"perf.{name}"], check=False).returncode
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
