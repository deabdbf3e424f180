"""Faults across the whole tier while a batch runs (R2/R8): nothing is lost.

* SIGTERM to each of the tier's processes in turn (the aggregator, both gateways, both
  wsmanagers), each restarted on its ports: every one exits 0, the batch completes with every
  essay's results, and the teacher's client, reconnecting with ``since`` to whichever
  wsmanager is up, ends with exactly the events a fresh client resuming from the start gets,
  in order.
* The broker stops for 30 s in the middle of a run and comes back (its data kept): the batch
  still completes with correct results, and the events arrive.

The sandbox process stands in for HuleEdu's backends (its pipeline state is in memory, as a
stand-in's may be), so it is not among the processes stopped.
"""

from __future__ import annotations

import os
import subprocess  # nosec B404
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio_websocket

from deploy.cluster import BROKER_SCRIPT, Cluster, free_ports
from tests.conftest import _broker_answers
from tests.e2e.conftest import (
    ESSAYS,
    TEACHER,
    TIER,
    Stream,
    Teacher,
    finished,
    replayed_since,
    running_cluster,
    start_cluster,
    wait_for,
)

#: Long enough per essay that the batch is still running while the processes restart.
SLOW_ESSAY_S = 5.0


async def _assert_complete(teacher: Teacher, batch_id: str, gateway: int = 0) -> None:
    view = (await teacher.call("GET", f"/v1/batches/{batch_id}", gateway=gateway)).json()
    assert view["status"] == "completed_successfully", view
    assert len(view["essays"]) == len(ESSAYS)
    for essay in view["essays"]:
        assert essay["spellcheck_corrections"] is not None, essay
        assert essay["cj_rank"] is not None, essay
        assert {p["status"] for p in essay["phases"]} == {"succeeded"}, essay


async def _follow_across_restarts(stream: Stream, instance: int) -> None:
    """Keep a socket open on ``instance``; when it closes (or that instance is down),
    reconnect to the other wsmanager with ``since``, as a browser client would; until
    cancelled."""
    while True:
        try:
            async with stream.open(instance) as socket:
                await stream.follow(socket)
        except (OSError, trio_websocket.HandshakeError):
            await trio.sleep(0.2)  # that instance is down right now
        instance = 1 - instance


@pytest.fixture
def slow_cluster(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Cluster]:
    started = start_cluster(tmp_path, kafka_bootstrap, essay_delay_s=SLOW_ESSAY_S)
    with running_cluster(started):
        yield started


async def _start_watched_batch(
    cluster: Cluster, nursery: trio.Nursery
) -> tuple[Teacher, Stream, str]:
    """Log in, follow the teacher's events (reconnecting as needed), start a batch."""
    teacher = Teacher(cluster, TEACHER)
    await teacher.login()
    stream = Stream(cluster, teacher)
    nursery.start_soon(_follow_across_restarts, stream, 0)
    await wait_for(lambda: bool(stream.welcomes), within_s=10, what="first welcome")
    return teacher, stream, await teacher.run_batch()


async def _assert_nothing_lost(
    cluster: Cluster, teacher: Teacher, stream: Stream, batch_id: str, *, instance: int
) -> None:
    """Complete with every result, and the client saw exactly what a fresh resume sees."""
    await _assert_complete(teacher, batch_id)
    events = stream.of(batch_id)
    reference = await replayed_since(cluster, teacher, events[0], instance=instance)
    assert [e["event_id"] for e in events] == [e["event_id"] for e in reference]


async def test_sigterm_to_each_tier_process_in_turn_loses_nothing(slow_cluster: Cluster) -> None:
    cluster = slow_cluster
    async with trio.open_nursery() as nursery:
        teacher, stream, batch_id = await _start_watched_batch(cluster, nursery)
        for name in TIER:
            code = await trio.to_thread.run_sync(cluster.stop, name)
            assert code == 0, f"{name} exited with {code} on SIGTERM"
            await trio.to_thread.run_sync(cluster.start, name)
        assert not finished(stream, batch_id), "the batch ended before every process restarted"
        await wait_for(lambda: finished(stream, batch_id), within_s=90, what="batch_results_ready")
        nursery.cancel_scope.cancel()

    await _assert_nothing_lost(cluster, teacher, stream, batch_id, instance=0)
    resumed = [w["resume"] for w in stream.welcomes[1:]]
    assert len(resumed) >= 2, "the client had to reconnect when its wsmanager stopped"
    assert all(r["recovered"] for r in resumed), resumed


def _broker(action: str, port: int) -> None:
    subprocess.run(  # nosec B603 B607
        ["bash", str(BROKER_SCRIPT), action],
        check=True,
        env={**os.environ, "KAFKA_PORT": str(port)},
        capture_output=True,
    )


@pytest.fixture
def own_broker(kafka_bootstrap: str) -> Iterator[str]:
    """A broker of this test's own (it is stopped mid-test; the suite's broker is not)."""
    port = free_ports(1)[0]
    _broker("start", port)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        _broker("stop", port)


async def test_a_30_s_broker_outage_mid_run_loses_nothing(own_broker: str, tmp_path: Path) -> None:
    port = int(own_broker.rsplit(":", 1)[1])
    cluster = start_cluster(tmp_path, own_broker, essay_delay_s=1.0)
    with running_cluster(cluster):
        async with trio.open_nursery() as nursery:
            teacher, stream, batch_id = await _start_watched_batch(cluster, nursery)
            await wait_for(lambda: bool(stream.of(batch_id)), within_s=20, what="first event")
            await trio.to_thread.run_sync(_broker, "halt", port)
            assert not _broker_answers(own_broker)
            await trio.sleep(30)
            await trio.to_thread.run_sync(_broker, "resume", port)
            await wait_for(
                lambda: finished(stream, batch_id), within_s=120, what="batch_results_ready"
            )
            nursery.cancel_scope.cancel()
        await _assert_nothing_lost(cluster, teacher, stream, batch_id, instance=1)
