"""End to end over real gRPC sockets: the sandbox backends and the REAL aggregator on one memory
bus. Register, upload three files, request spellcheck + CJ assessment; the aggregator's
ResultService.GetBatch sees the essays arrive and then a completed batch with per-essay
results. Real time with millisecond delays: the aggregator's store runs in a thread, which a
virtual clock would jump over."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from aggregator.serve import serve_aggregator
from aggregator.settings import AggregatorSettings
from common.bus import EventBus
from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import NotFoundError
from common.rpc import open_channel
from deploy.sandbox.pipeline import PipelineSettings
from tests.integration.sandbox.conftest import OTHER, TEACHER, SandboxFactory, essay

pytestmark = pytest.mark.slow
Phase = common_v1.PipelinePhase


@asynccontextmanager
async def running_aggregator(bus: EventBus, folder: Path) -> AsyncIterator[int]:
    """The real aggregator on ``bus`` (query cache nearly off); yields its gRPC port."""
    shutdown = trio.Event()
    settings = AggregatorSettings(
        grpc_port=0, ops_port=0, db_path=folder / "aggregator.db", cache_ttl_s=0.01
    )
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(
            partial(serve_aggregator, settings, shutdown=shutdown, bus=bus)
        )
        yield addresses.grpc_port
        shutdown.set()


Status = results_v1.BatchStatus


async def test_register_upload_pipeline_reaches_completed_in_the_aggregator(
    start_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    sandbox = await start_sandbox(
        pipeline=PipelineSettings(essay_delay_s=0.002, phase_delay_s=0.005, seed=11)
    )
    async with (
        running_aggregator(sandbox.bus, tmp_path) as grpc_port,
        open_channel(f"127.0.0.1:{grpc_port}", service="results") as results,
    ):
        stub = results.stub(results_v1.ResultServiceStub)

        async def view(
            until: Callable[[results_v1.BatchView], bool], batch_id: str
        ) -> results_v1.BatchView:
            request = results_v1.GetBatchRequest(
                actor=TEACHER, batch_id=batch_id, include_essays=True
            )
            last: results_v1.BatchView | None = None
            with trio.fail_after(5):
                while True:
                    try:
                        last = (await results.call(stub.get_batch, request)).batch
                    except NotFoundError:
                        last = None  # not consumed yet
                    if last is not None and until(last):
                        return last
                    await trio.sleep(0.01)

        batch = await sandbox.register(essays=3, course_code="ENG5")
        registered = await view(lambda v: v.status is Status.REGISTERED, batch.batch_id)
        assert registered.owner_user_id == TEACHER.user_id
        assert registered.expected_essay_count == 3

        uploaded = await sandbox.upload(batch.batch_id, [essay(1), essay(2), essay(3)])
        ready = await view(lambda v: v.essays_received == 3, batch.batch_id)
        assert ready.status is Status.READY, ready.status

        run = await sandbox.channel.call(
            sandbox.batches.request_pipeline,
            batches_v1.RequestPipelineRequest(
                actor=TEACHER,
                batch_id=batch.batch_id,
                phases=[Phase.SPELLCHECK, Phase.CJ_ASSESSMENT],
            ),
        )
        assert run.pipeline_run_id
        done = await view(lambda v: v.status is Status.COMPLETED_SUCCESSFULLY, batch.batch_id)
        assert done.requested_phases == [Phase.SPELLCHECK, Phase.CJ_ASSESSMENT]
        assert [(p.phase, p.essays_succeeded, p.essays_failed) for p in done.phases] == [
            (Phase.SPELLCHECK, 3, 0),
            (Phase.CJ_ASSESSMENT, 3, 0),
        ]
        by_essay = {e.essay_id: e for e in done.essays}
        assert set(by_essay) == {f.essay_id for f in uploaded.files}
        assert {e.filename for e in done.essays} == {
            "essay-1.txt",
            "essay-2.txt",
            "essay-3.txt",
        }
        assert sorted(e.cj_rank or 0 for e in done.essays) == [1, 2, 3]
        for result in done.essays:
            assert result.spellcheck_corrections is not None
            assert result.cj_grade, result
            assert all(p.status is results_v1.PhaseStatus.SUCCEEDED for p in result.phases)

        with pytest.raises(NotFoundError):
            await results.call(
                stub.get_batch,
                results_v1.GetBatchRequest(actor=OTHER, batch_id=batch.batch_id),
            )


async def test_failures_show_up_as_completed_with_failures(
    start_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    sandbox = await start_sandbox(
        pipeline=PipelineSettings(
            essay_delay_s=0.001, phase_delay_s=0.001, failure_rate=0.5, seed=5
        )
    )
    async with running_aggregator(sandbox.bus, tmp_path) as grpc_port:
        batch = await sandbox.register(essays=6)
        await sandbox.upload(batch.batch_id, [essay(i) for i in range(3)])
        await sandbox.upload(batch.batch_id, [essay(i) for i in range(3, 6)])
        await sandbox.channel.call(
            sandbox.batches.request_pipeline,
            batches_v1.RequestPipelineRequest(
                actor=TEACHER, batch_id=batch.batch_id, phases=[Phase.SPELLCHECK]
            ),
        )
        async with open_channel(f"127.0.0.1:{grpc_port}", service="results") as results:
            stub = results.stub(results_v1.ResultServiceStub)
            request = results_v1.GetBatchRequest(
                actor=TEACHER, batch_id=batch.batch_id, include_essays=True
            )
            with trio.fail_after(5):
                while True:
                    view = (await results.call(stub.get_batch, request)).batch
                    if view is not None and view.status in (
                        Status.COMPLETED_WITH_FAILURES,
                        Status.COMPLETED_SUCCESSFULLY,
                        Status.FAILED,
                    ):
                        break
                    await trio.sleep(0.01)
        assert view.status is Status.COMPLETED_WITH_FAILURES, view.status
        (phase,) = view.phases
        assert phase.essays_failed and phase.essays_succeeded
        assert phase.essays_failed + phase.essays_succeeded == 6
        failed = [e for e in view.essays if e.phases[0].status is results_v1.PhaseStatus.FAILED]
        assert len(failed) == phase.essays_failed and all(e.phases[0].error for e in failed)
