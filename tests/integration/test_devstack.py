"""``serve_devstack`` in-process: every service in one program, on the memory bus and on the
real Kafka broker (``--kafka``); ``huleedu demo`` completes against each, the discovery file
points at the running stack and is removed at shutdown, and shutdown stops every branch."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from deploy.client import ClientConfig
from deploy.demo import run_demo
from deploy.devstack import DISCOVERY_FILE, DevstackAddresses, DevstackOptions, serve_devstack
from deploy.sandbox.pipeline import PipelineSettings

FAST = PipelineSettings(essay_delay_s=0.01, phase_delay_s=0.02)


async def _demo_against_devstack(options: DevstackOptions) -> None:
    shutdown, stopped = trio.Event(), trio.Event()

    async def run(task_status: trio.TaskStatus[DevstackAddresses]) -> None:
        try:
            await serve_devstack(options, shutdown=shutdown, task_status=task_status)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        addresses: DevstackAddresses = await nursery.start(run)
        discovery = json.loads((options.state_dir / DISCOVERY_FILE).read_text())
        assert discovery["gateway_url"] == addresses.gateway_url
        assert discovery["ws_url"] == addresses.ws_url
        config = ClientConfig(
            gateway_url=addresses.gateway_url,
            ws_url=addresses.ws_url,
            ca_file=Path(addresses.ca_file),
        )
        lines: list[str] = []
        result = await run_demo(config, timeout_s=60, out=lines.append)
        assert result.ok, (result.error, lines)
        assert len(result.rows) == 5
        shutdown.set()
        with trio.fail_after(30):
            await stopped.wait()
    assert not (options.state_dir / DISCOVERY_FILE).exists()


async def test_the_demo_completes_against_the_devstack_on_the_memory_bus(tmp_path: Path) -> None:
    await _demo_against_devstack(
        DevstackOptions(gateway_port=0, ws_port=0, state_dir=tmp_path, pipeline=FAST)
    )


async def test_the_demo_completes_against_the_devstack_on_kafka(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    await _demo_against_devstack(
        DevstackOptions(
            gateway_port=0, ws_port=0, state_dir=tmp_path, pipeline=FAST, kafka=kafka_bootstrap
        )
    )
