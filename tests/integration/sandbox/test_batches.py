"""The sandbox BatchService over real gRPC: validation naming the field, ownership answering
NOT_FOUND, idempotent registration and pipeline requests, the registration event the
aggregator needs, FAILED_PRECONDITION, and ListBatches paging."""

from __future__ import annotations

from typing import Any

import pytest
import trio
from grpclib.const import Status

from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.errors import ConflictError, NotFoundError, ValidationError
from common.events import Topic
from deploy.sandbox.pipeline import PipelineSettings
from tests.integration.sandbox.conftest import (
    OTHER,
    TEACHER,
    Sandbox,
    SandboxFactory,
    essay,
    raw_status,
)

pytestmark = pytest.mark.slow
Phase = common_v1.PipelinePhase
BOTH = [Phase.SPELLCHECK, Phase.CJ_ASSESSMENT]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"course_code": ""}, "course_code"),
        ({"course_code": "X" * 33}, "course_code"),
        ({"essay_instructions": ""}, "essay_instructions"),
        ({"essay_instructions": "x" * 10_001}, "essay_instructions"),
        ({"expected_essay_count": 0}, "expected_essay_count"),
        ({"expected_essay_count": 501}, "expected_essay_count"),
        ({"actor": common_v1.Actor(org_id="org-1")}, "actor.user_id"),
        ({"actor": None}, "actor.user_id"),
    ],
)
async def test_register_batch_rejects_bad_input_naming_the_field(
    sandbox: Sandbox, fields: dict[str, Any], named: str
) -> None:
    values: dict[str, Any] = {
        "actor": TEACHER,
        "course_code": "ENG5",
        "essay_instructions": "Write about winter.",
        "expected_essay_count": 3,
        **fields,
    }
    with pytest.raises(ValidationError) as caught:
        await sandbox.channel.call(
            sandbox.batches.register_batch, batches_v1.RegisterBatchRequest(**values)
        )
    assert caught.value.field == named, caught.value
    assert await sandbox.events(Topic.BATCH_REGISTERED) == [], "a refused batch was published"


async def test_register_batch_limits_are_inclusive(sandbox: Sandbox) -> None:
    batch = await sandbox.register(
        essays=500, course_code="C" * 32, essay_instructions="i" * 10_000
    )
    assert batch.expected_essay_count == 500 and len(batch.course_code) == 32


async def test_registration_publishes_the_event_the_aggregator_folds(sandbox: Sandbox) -> None:
    actor = common_v1.Actor(user_id="teacher-1", org_id="org-1", correlation_id="req-42")
    batch = await sandbox.register(actor, essays=3, class_id="class-9")
    assert batch.owner_user_id == "teacher-1" and batch.org_id == "org-1"
    assert batch.created_at is not None and batch.requested_phases == []
    (event,) = await sandbox.events(Topic.BATCH_REGISTERED)
    assert event.event_type == Topic.BATCH_REGISTERED
    assert event.user_id == "teacher-1" and event.correlation_id == "req-42"
    payload = event.batch_essays_registered
    assert payload is not None
    assert payload.batch_id == batch.batch_id and payload.owner_user_id == "teacher-1"
    assert (payload.course_code, payload.expected_essay_count, payload.class_id) == (
        "ENG5",
        3,
        "class-9",
    )
    assert len(set(payload.essay_ids)) == 3, "one reserved slot per expected essay"
    got = await sandbox.channel.call(
        sandbox.batches.get_batch,
        batches_v1.GetBatchRequest(actor=TEACHER, batch_id=batch.batch_id),
    )
    assert got.batch == batch


async def test_idempotency_key_returns_the_first_batch_per_actor(sandbox: Sandbox) -> None:
    first = await sandbox.register(idempotency_key="k-1")
    again = await sandbox.register(idempotency_key="k-1", course_code="OTHER")
    theirs = await sandbox.register(OTHER, idempotency_key="k-1")
    assert again.batch_id == first.batch_id and again.course_code == "ENG5"
    assert theirs.batch_id != first.batch_id, "keys are per actor"
    published = [e.batch_essays_registered for e in await sandbox.events(Topic.BATCH_REGISTERED)]
    assert sorted(p.batch_id for p in published if p) == sorted(
        [first.batch_id, theirs.batch_id]
    ), "a retry must not publish the registration again"


async def test_concurrent_retries_create_one_batch(sandbox: Sandbox) -> None:
    ids: list[str] = []

    async def register() -> None:
        ids.append((await sandbox.register(idempotency_key="same")).batch_id)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(register)
    assert len(set(ids)) == 1, ids


async def test_another_users_batch_is_not_found_like_a_missing_one(sandbox: Sandbox) -> None:
    batch = await sandbox.register()
    calls: list[tuple[Any, Any]] = [
        (
            sandbox.batches.get_batch,
            batches_v1.GetBatchRequest(actor=OTHER, batch_id=batch.batch_id),
        ),
        (
            sandbox.batches.request_pipeline,
            batches_v1.RequestPipelineRequest(
                actor=OTHER, batch_id=batch.batch_id, phases=[Phase.SPELLCHECK]
            ),
        ),
    ]
    for method, request in calls:
        with pytest.raises(NotFoundError) as foreign:
            await sandbox.channel.call(method, request)
        assert await raw_status(method, request) is Status.NOT_FOUND
        request.batch_id = "no-such-batch"
        with pytest.raises(NotFoundError) as missing:
            await sandbox.channel.call(method, request)
        assert foreign.value.message.replace(
            batch.batch_id, "<id>"
        ) == missing.value.message.replace("no-such-batch", "<id>"), (
            "the answer must not tell a foreign batch from a missing one"
        )


@pytest.mark.parametrize(
    ("phases", "named"),
    [
        ([], "phases"),
        ([Phase.UNSPECIFIED], "phases.0"),
        ([Phase.SPELLCHECK, Phase.SPELLCHECK], "phases.1"),
        ([Phase.SPELLCHECK, Phase.CJ_ASSESSMENT, Phase.SPELLCHECK], "phases.2"),
    ],
)
async def test_request_pipeline_checks_phases(
    sandbox: Sandbox, phases: list[Phase], named: str
) -> None:
    batch = await sandbox.register()
    request = batches_v1.RequestPipelineRequest(
        actor=TEACHER, batch_id=batch.batch_id, phases=phases
    )
    with pytest.raises(ValidationError) as caught:
        await sandbox.channel.call(sandbox.batches.request_pipeline, request)
    assert caught.value.field == named


async def test_request_pipeline_needs_essays_first(sandbox: Sandbox) -> None:
    batch = await sandbox.register()
    request = batches_v1.RequestPipelineRequest(
        actor=TEACHER, batch_id=batch.batch_id, phases=[Phase.SPELLCHECK]
    )
    with pytest.raises(ConflictError, match="no essays"):
        await sandbox.channel.call(sandbox.batches.request_pipeline, request)
    assert await raw_status(sandbox.batches.request_pipeline, request) is (
        Status.FAILED_PRECONDITION
    )


async def test_one_run_at_a_time_and_retries_get_the_same_run(
    start_sandbox: SandboxFactory,
) -> None:
    # Slow phases: the first run is still going while the next requests arrive.
    sandbox = await start_sandbox(pipeline=PipelineSettings(essay_delay_s=0, phase_delay_s=60))
    batch = await sandbox.register()
    await sandbox.upload(batch.batch_id, [essay(1)])

    def request(key: str = "") -> batches_v1.RequestPipelineRequest:
        return batches_v1.RequestPipelineRequest(
            actor=TEACHER, batch_id=batch.batch_id, phases=BOTH, idempotency_key=key
        )

    first = await sandbox.channel.call(sandbox.batches.request_pipeline, request("p-1"))
    assert first.pipeline_run_id and first.phases == BOTH
    retry = await sandbox.channel.call(sandbox.batches.request_pipeline, request("p-1"))
    assert retry.pipeline_run_id == first.pipeline_run_id
    with pytest.raises(ConflictError, match="already running"):
        await sandbox.channel.call(sandbox.batches.request_pipeline, request("p-2"))
    assert await raw_status(sandbox.batches.request_pipeline, request()) is (
        Status.FAILED_PRECONDITION
    )
    got = await sandbox.channel.call(
        sandbox.batches.get_batch,
        batches_v1.GetBatchRequest(actor=TEACHER, batch_id=batch.batch_id),
    )
    assert got.batch is not None and got.batch.requested_phases == BOTH


async def test_a_finished_run_frees_the_batch_for_the_next(sandbox: Sandbox) -> None:
    batch = await sandbox.register()
    await sandbox.upload(batch.batch_id, [essay(1)])
    request = batches_v1.RequestPipelineRequest(
        actor=TEACHER, batch_id=batch.batch_id, phases=[Phase.SPELLCHECK]
    )
    first = await sandbox.channel.call(sandbox.batches.request_pipeline, request)
    with trio.fail_after(5):
        while sandbox.running.simulator.runs_finished < 1:
            await trio.sleep(0.005)
    second = await sandbox.channel.call(sandbox.batches.request_pipeline, request)
    assert second.pipeline_run_id != first.pipeline_run_id


async def test_list_batches_pages_newest_first(sandbox: Sandbox) -> None:
    mine = [(await sandbox.register(course_code=f"C{i}")).batch_id for i in range(5)]
    await sandbox.register(OTHER)
    seen: list[str] = []
    token = ""
    for _ in range(5):
        page = await sandbox.channel.call(
            sandbox.batches.list_batches,
            batches_v1.ListBatchesRequest(
                actor=TEACHER, page=common_v1.PageRequest(page_size=2, page_token=token)
            ),
        )
        seen += [b.batch_id for b in page.batches]
        token = page.next_page_token
        if not token:
            break
    assert seen == mine[::-1]
    for bad in (common_v1.PageRequest(page_size=101), common_v1.PageRequest(page_token="junk")):
        with pytest.raises(ValidationError) as caught:
            await sandbox.channel.call(
                sandbox.batches.list_batches,
                batches_v1.ListBatchesRequest(actor=TEACHER, page=bad),
            )
        assert caught.value.field in ("page.page_size", "page.page_token")
