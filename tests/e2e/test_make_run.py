"""What a new user does: ``make run``, then ``huleedu demo`` against it, then Ctrl-C.

Exactly those commands (``make run`` with free ports and a fresh state folder, so the test
runs beside anything else): the stack must be ready within 60 s, the demo must exit 0 with a
results row per sample essay, and Ctrl-C (SIGINT to the process group, as a terminal sends
it) must stop everything cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess  # nosec B404
import sys
import time
from pathlib import Path

from deploy.samples import ESSAYS_DIR

REPO = Path(__file__).resolve().parents[2]
READY_WITHIN_S = 60.0


def _wait_ready(log: Path, process: subprocess.Popen[bytes]) -> dict[str, object]:
    deadline = time.monotonic() + READY_WITHIN_S
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith('{"ready"'):
                ready: dict[str, object] = json.loads(line)
                return ready
        assert process.poll() is None, f"make run exited early:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"not ready within {READY_WITHIN_S} s:\n{log.read_text()}")


def test_make_run_is_ready_within_60_s_and_the_demo_passes(tmp_path: Path) -> None:
    state, log = tmp_path / "state", tmp_path / "make-run.log"
    run_args = f"--gateway-port 0 --ws-port 0 --state-dir {state}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HULEEDU_", "MAKE"))}
    began = time.monotonic()
    with log.open("wb") as out:
        make = subprocess.Popen(  # nosec B603 B607
            ["make", "--no-print-directory", "run", f"RUN_ARGS={run_args}"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        ready = _wait_ready(log, make)  # fails unless ready within READY_WITHIN_S
        seconds = time.monotonic() - began
        printed = log.read_text()
        assert "huleedu demo" in printed and "huleedu ws-tail" in printed
        assert "curl --cacert" in printed and str(ready["ca_file"]) in printed
        demo = subprocess.run(  # nosec B603
            [sys.executable, "-m", "deploy.cli", "demo", "--stack", str(state / "devstack.json")],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout + demo.stderr
        essays = sorted(path.name for path in ESSAYS_DIR.glob("*.txt"))
        for name in essays:
            assert name in demo.stdout
        assert "completed_successfully" in demo.stdout
        print(f"make run ready after {seconds:.1f} s\n{demo.stdout}")
    finally:
        os.killpg(make.pid, signal.SIGINT)
        try:
            make.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
            raise
    assert "\nstopped\n" in log.read_text(), log.read_text()[-2000:]
    assert not (state / "devstack.json").exists()
