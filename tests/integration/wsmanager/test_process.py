"""R8 for ``python -m wsmanager`` as a real process: it serves once ready; SIGTERM closes an
open socket with 1001 at once and the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from common.tls import client_context
from tests.integration.wsmanager.conftest import ORIGIN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


async def test_sigterm_closes_sockets_with_1001_and_exits_zero(
    start_gateway: Any, tmp_path: Path
) -> None:
    gateway = await start_gateway()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HULEEDU_", "OTEL_"))}
    env.update(
        HULEEDU_WSMANAGER_PORT="0",
        HULEEDU_WSMANAGER_OPS_PORT="0",
        HULEEDU_WSMANAGER_STATE_DIR=str(tmp_path / "ws"),
        HULEEDU_WSMANAGER_JWKS_URL=f"{gateway.url}/.well-known/jwks.json",
        HULEEDU_WSMANAGER_JWKS_CA_FILE=str(gateway.addresses.ca_file),
        HULEEDU_WSMANAGER_ALLOWED_ORIGINS=json.dumps([ORIGIN]),
        HULEEDU_WSMANAGER_SHUTDOWN_GRACE_S="5",
    )
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "wsmanager"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(30):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(4096)
                assert chunk, "wsmanager exited before it was ready"
                line += chunk
        ready = json.loads(line.splitlines()[0])
        async with httpx.AsyncClient(base_url=ready["ops_url"]) as ops:
            with trio.fail_after(15):
                while (await ops.get("/readyz")).status_code != 200:
                    await trio.sleep(0.05)
        async with gateway.client() as client:
            token = (await gateway.login(client))["access_token"]
        context = client_context(ready["ca_file"], alpn=["http/1.1"])
        async with trio_websocket.open_websocket_url(
            f"{ready['url']}/v1/ws", context, extra_headers=[(b"origin", ORIGIN.encode())]
        ) as socket:
            try:
                await socket.send_message(json.dumps({"type": "auth", "token": token}))
                assert json.loads(await socket.get_message())["type"] == "welcome"
                process.send_signal(signal.SIGTERM)
                with pytest.raises(trio_websocket.ConnectionClosed) as info, trio.fail_after(5):
                    while True:
                        await socket.get_message()
                assert info.value.reason.code == 1001
            finally:
                await trio.aclose_forcefully(socket._stream)
        with trio.fail_after(10):
            code = await process.wait()
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
