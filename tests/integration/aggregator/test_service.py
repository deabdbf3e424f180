"""``python -m aggregator`` as a real process: ready line, /livez, /readyz, /metrics, gRPC,
and SIGTERM -> exit 0 (R8 for the aggregator)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from aggregator.serve import serve_aggregator
from aggregator.settings import AggregatorSettings
from common.bus import open_memory_bus
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.events import envelope_headers
from common.rpc import open_channel, open_rpc_loop
from tests.unit.aggregator import events as E

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[3]


async def test_r8_process_serves_and_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "HULEEDU_AGGREGATOR_GRPC_PORT": "0",
        "HULEEDU_AGGREGATOR_OPS_PORT": "0",
        "HULEEDU_AGGREGATOR_DB_PATH": str(tmp_path / "agg.db"),
        "HULEEDU_AGGREGATOR_SHUTDOWN_GRACE_S": "3",
    }
    env.pop("HULEEDU_AGGREGATOR_KAFKA__BOOTSTRAP_SERVERS", None)
    with subprocess.Popen(  # noqa: ASYNC220 - a child we stop with a signal below
        [sys.executable, "-m", "aggregator"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            await _exercise(proc)
        finally:
            if proc.poll() is None:
                proc.kill()


async def _exercise(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None and proc.stderr is not None
    line = await trio.to_thread.run_sync(proc.stdout.readline)
    ready = json.loads(line)
    assert ready["ready"] is True
    url = ready["ops_url"].replace("0.0.0.0", "127.0.0.1")
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{url}/livez")).status_code == 200
        readyz = await client.get(f"{url}/readyz")
        assert readyz.status_code == 200, readyz.text
        metrics = (await client.get(f"{url}/metrics")).text
        assert "huleedu_aggregator_outbox_backlog" in metrics
    async with (
        open_rpc_loop(),
        open_channel(f"127.0.0.1:{ready['grpc_port']}", service="results") as channel,
    ):
        stub = channel.stub(results_v1.ResultServiceStub)
        dash = await channel.call(
            stub.get_dashboard,
            results_v1.GetDashboardRequest(actor=common_v1.Actor(user_id="nobody")),
        )
        assert dash.total_batches == 0
    proc.send_signal(signal.SIGTERM)
    code = await trio.to_thread.run_sync(partial(proc.wait, timeout=10))
    assert code == 0, proc.stderr.read()


async def test_in_process_service_applies_events_and_answers_queries(tmp_path: Path) -> None:
    settings = AggregatorSettings(grpc_port=0, ops_port=0, db_path=tmp_path / "agg.db")
    shutdown = trio.Event()
    async with open_memory_bus() as bus, trio.open_nursery() as nursery:
        addresses = await nursery.start(
            partial(serve_aggregator, settings, shutdown=shutdown, bus=bus)
        )
        for e in E.full_run("svc-1"):
            await bus.publish(e.event_type, bytes(e), key=b"svc-1", headers=envelope_headers(e))
        async with (
            open_rpc_loop(),
            open_channel(f"127.0.0.1:{addresses.grpc_port}", service="results") as channel,
        ):
            stub = channel.stub(results_v1.ResultServiceStub)
            request = results_v1.GetBatchRequest(
                actor=common_v1.Actor(user_id="teacher-1"), batch_id="svc-1"
            )
            with trio.fail_after(10):
                while True:
                    try:
                        reply = await channel.call(stub.get_batch, request)
                    except Exception:
                        reply = None
                    if (
                        reply
                        and reply.batch
                        and reply.batch.status is (results_v1.BatchStatus.COMPLETED_SUCCESSFULLY)
                    ):
                        break
                    await trio.sleep(0.05)
        url = addresses.ops_url.replace("0.0.0.0", "127.0.0.1")
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{url}/metrics")).text
        assert 'huleedu_aggregator_records_total{result="applied"' in metrics
        assert "huleedu_aggregator_consumer_lag_records{topic=" in metrics
        shutdown.set()
