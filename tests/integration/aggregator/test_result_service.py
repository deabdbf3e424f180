"""ResultService over real gRPC sockets: ownership, pagination, validation; the exact cache
(a query after an applied event never sees the old view); the outbox after a crash."""

from __future__ import annotations

from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from aggregator.outbox import dead_letter, notifications_for, run_outbox_relay
from aggregator.queries import ResultQueries
from aggregator.store import SqliteResultStore, open_sqlite_store
from common.bus import open_memory_bus
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import NotFoundError, ValidationError
from common.events import EventEnvelope, Topic, decode_envelope
from common.rpc import RpcChannel, open_channel, open_rpc_loop, serve_grpc
from common.ttlcache import TtlCache
from tests.unit.aggregator import events as E

pytestmark = pytest.mark.slow
Status = results_v1.BatchStatus
_offsets: dict[str, int] = {}


async def apply(
    store: SqliteResultStore, queries: ResultQueries, envs: list[EventEnvelope]
) -> None:
    def invalidate(result: object) -> None:
        trio.from_thread.run_sync(queries.invalidate, result.changed)  # type: ignore[attr-defined]

    await store.apply_records(
        E.as_records(envs, _offsets), notifications_for, dead_letter, before_commit=invalidate
    )


def actor(user: str) -> common_v1.Actor:
    return common_v1.Actor(user_id=user, org_id="org-1", roles=["teacher"])


@pytest.fixture
async def service(
    tmp_path: Path,
) -> AsyncIterator[tuple[SqliteResultStore, ResultQueries, RpcChannel]]:
    store = await open_sqlite_store(tmp_path / "agg.db")
    queries = ResultQueries(store, TtlCache(ttl_s=300))
    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_grpc, [queries]))
        async with open_channel(f"127.0.0.1:{port}", service="results") as channel:
            yield store, queries, channel
        nursery.cancel_scope.cancel()


async def test_get_batch_over_grpc_with_essays(
    service: tuple[SqliteResultStore, ResultQueries, RpcChannel],
) -> None:
    store, queries, channel = service
    await apply(store, queries, E.full_run("b1"))
    stub = channel.stub(results_v1.ResultServiceStub)
    reply = await channel.call(
        stub.get_batch,
        results_v1.GetBatchRequest(actor=actor("teacher-1"), batch_id="b1", include_essays=True),
    )
    assert reply.batch is not None
    assert reply.batch.status is Status.COMPLETED_SUCCESSFULLY
    assert [e.cj_rank for e in reply.batch.essays] == [2, 1, 3]


async def test_another_users_batch_is_not_found_like_a_missing_one(
    service: tuple[SqliteResultStore, ResultQueries, RpcChannel],
) -> None:
    store, queries, channel = service
    await apply(store, queries, E.full_run("b1", owner="teacher-1"))
    stub = channel.stub(results_v1.ResultServiceStub)
    errors = []
    for batch_id in ("b1", "no-such-batch"):
        with pytest.raises(NotFoundError) as info:
            await channel.call(
                stub.get_batch,
                results_v1.GetBatchRequest(actor=actor("intruder"), batch_id=batch_id),
            )
        errors.append(info.value.detail.replace(batch_id, "<id>"))
    assert errors[0] == errors[1], "ownership must not be distinguishable from absence"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (results_v1.GetBatchRequest(actor=actor("u"), batch_id=""), "batch_id"),
        (results_v1.GetBatchRequest(actor=actor("u"), batch_id="x" * 129), "batch_id"),
        (results_v1.GetBatchRequest(batch_id="b1"), "actor.user_id"),
    ],
)
async def test_invalid_get_batch_arguments_name_the_field(
    service: tuple[SqliteResultStore, ResultQueries, RpcChannel],
    request_: results_v1.GetBatchRequest,
    field: str,
) -> None:
    _, _, channel = service
    stub = channel.stub(results_v1.ResultServiceStub)
    with pytest.raises(ValidationError) as info:
        await channel.call(stub.get_batch, request_)
    assert info.value.field == field


async def test_pagination_is_stable_complete_and_tokens_are_bound_to_the_query(
    service: tuple[SqliteResultStore, ResultQueries, RpcChannel],
) -> None:
    store, queries, channel = service
    for i in range(7):
        await apply(store, queries, [E.registered(f"p{i}", at=i * 10)])
    await apply(store, queries, [E.registered("other", owner="teacher-2", at=5)])
    stub = channel.stub(results_v1.ResultServiceStub)
    seen, token = [], ""
    for _ in range(5):
        page = await channel.call(
            stub.list_batches,
            results_v1.ListBatchesRequest(
                actor=actor("teacher-1"),
                page=common_v1.PageRequest(page_size=3, page_token=token),
            ),
        )
        seen += [b.batch_id for b in page.batches]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"p{i}" for i in reversed(range(7))], "newest first, each exactly once"
    first = await channel.call(
        stub.list_batches,
        results_v1.ListBatchesRequest(
            actor=actor("teacher-1"), page=common_v1.PageRequest(page_size=3)
        ),
    )
    for bad_request, field in [
        (
            results_v1.ListBatchesRequest(
                actor=actor("teacher-2"),
                page=common_v1.PageRequest(page_size=3, page_token=first.next_page_token),
            ),
            "page.page_token",
        ),
        (
            results_v1.ListBatchesRequest(
                actor=actor("teacher-1"),
                page=common_v1.PageRequest(page_size=3, page_token="!!garbage"),
            ),
            "page.page_token",
        ),
        (
            results_v1.ListBatchesRequest(
                actor=actor("teacher-1"), page=common_v1.PageRequest(page_size=101)
            ),
            "page.page_size",
        ),
    ]:
        with pytest.raises(ValidationError) as info:
            await channel.call(stub.list_batches, bad_request)
        assert info.value.field == field


async def test_status_filter_and_dashboard(
    service: tuple[SqliteResultStore, ResultQueries, RpcChannel],
) -> None:
    store, queries, channel = service
    await apply(store, queries, E.full_run("done-1"))
    await apply(store, queries, [E.registered("new-1", at=100)])
    stub = channel.stub(results_v1.ResultServiceStub)
    done = await channel.call(
        stub.list_batches,
        results_v1.ListBatchesRequest(
            actor=actor("teacher-1"), status_filter=[Status.COMPLETED_SUCCESSFULLY]
        ),
    )
    assert [b.batch_id for b in done.batches] == ["done-1"]
    dash = await channel.call(
        stub.get_dashboard, results_v1.GetDashboardRequest(actor=actor("teacher-1"))
    )
    assert dash.total_batches == 2
    assert {c.status: c.count for c in dash.counts} == {
        Status.REGISTERED: 1,
        Status.COMPLETED_SUCCESSFULLY: 1,
    }
    assert dash.essays_processed == 3
    assert [b.batch_id for b in dash.recent] == ["new-1", "done-1"]


async def test_a_query_after_an_applied_event_never_sees_the_old_view(tmp_path: Path) -> None:
    store = await open_sqlite_store(tmp_path / "agg.db")
    queries = ResultQueries(store, TtlCache(ttl_s=300))
    events = E.full_run("race")
    request = results_v1.GetBatchRequest(actor=actor("teacher-1"), batch_id="race")
    await apply(store, queries, events[:1])
    applied_version = 1
    stale: list[tuple[int, int]] = []

    async def hammer() -> None:
        while applied_version < len(events):
            started_after = applied_version
            reply = await queries.get_batch(request)
            assert reply.batch is not None
            if reply.batch.version < started_after:
                stale.append((reply.batch.version, started_after))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(hammer)
        for event in events[1:]:
            await apply(store, queries, [event])
            applied_version += 1
            await trio.sleep(0.005)  # quiet gaps let the cache fill and serve hits
    assert not stale, f"queries issued after an apply saw an older view: {stale[:5]}"
    assert queries._cache.statistics().hits > 0, "the cache was never used: the test proves nothing"


async def test_outbox_rows_survive_a_crash_before_publish_and_go_out_once(tmp_path: Path) -> None:
    path = tmp_path / "agg.db"
    store = await open_sqlite_store(path)
    queries = ResultQueries(store, TtlCache(ttl_s=60))
    await apply(store, queries, E.full_run("ob1"))  # committed; no relay ran ("crash")
    backlog = await store.outbox_backlog()
    assert backlog > 0
    await store.close()
    store = await open_sqlite_store(path)  # the restarted process
    async with open_memory_bus() as bus:
        with trio.move_on_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_outbox_relay, store, bus)
                while await store.outbox_backlog():
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert await store.outbox_backlog() == 0
        # A second relay (e.g. the old process coming back) publishes nothing again.
        with trio.move_on_after(0.5):
            await run_outbox_relay(store, bus)
        async with bus.subscribe([Topic.TEACHER_NOTIFICATION], "check") as sub:
            got = await sub.get_batch(timeout_s=1)
    ids = [decode_envelope(r.value).event_id for r in got]
    assert len(ids) == backlog
    assert len(set(ids)) == len(ids)


async def test_a_shutdown_right_after_the_ack_still_marks_the_rows_sent(tmp_path: Path) -> None:
    """SIGTERM cancels the relay; arriving between the broker's ack and the mark, it must not
    leave acknowledged rows unsent (they would go out again after the restart)."""
    store = await open_sqlite_store(tmp_path / "agg.db")
    await apply(store, ResultQueries(store, TtlCache(ttl_s=60)), E.full_run("ob2"))
    assert await store.outbox_backlog() > 0
    async with open_memory_bus() as bus, trio.open_nursery() as nursery:
        inner_publish = bus.publish_many

        async def publish_then_shut_down(records: Any) -> Any:
            acked = await inner_publish(records)
            nursery.cancel_scope.cancel()  # the shutdown arrives with the acknowledgement
            return acked

        bus.publish_many = publish_then_shut_down  # type: ignore[method-assign]
        nursery.start_soon(run_outbox_relay, store, bus)
    assert await store.outbox_backlog() == 0


async def test_stale_events_are_recorded_as_anomalies_and_change_nothing(tmp_path: Path) -> None:
    store = await open_sqlite_store(tmp_path / "agg.db")
    queries = ResultQueries(store, TtlCache(ttl_s=60))
    b = "anomalous"
    await apply(
        store,
        queries,
        [
            E.registered(b, n=1, at=50, course="NEW"),
            E.slot(b, 0, 51),
            E.spellcheck(b, 0, 60, corrections=5),
        ],
    )
    before = await queries.get_batch(
        results_v1.GetBatchRequest(actor=actor("teacher-1"), batch_id=b, include_essays=True)
    )
    # A late, older registration and an older, failed spellcheck result for the same essay.
    await apply(
        store, queries, [E.registered(b, n=9, at=1, course="OLD"), E.spellcheck(b, 0, 55, ok=False)]
    )
    after = await queries.get_batch(
        results_v1.GetBatchRequest(actor=actor("teacher-1"), batch_id=b, include_essays=True)
    )
    assert before.batch is not None and after.batch is not None
    assert after.batch.course_code == "NEW" and after.batch.expected_essay_count == 1
    assert after.batch.essays[0].spellcheck_corrections == 5
    assert after.batch.essays[0].phases == before.batch.essays[0].phases
    notes = await store.anomalies(b)
    assert notes == [
        "older registration metadata ignored",
        f"older spellcheck result for essay {b}-e0 ignored",
    ]


async def test_a_failed_transaction_leaves_no_trace_in_views_or_cached_states(
    tmp_path: Path,
) -> None:
    class Boom(Exception):
        pass

    def explode(_: object) -> None:
        raise Boom  # the last step before COMMIT fails

    events = E.full_run("rb")
    request = results_v1.GetBatchRequest(
        actor=actor("teacher-1"), batch_id="rb", include_essays=True
    )
    store = await open_sqlite_store(tmp_path / "agg.db")
    queries = ResultQueries(store, TtlCache(ttl_s=60))
    await apply(store, queries, events[:3])
    offsets = dict(_offsets)
    with pytest.raises(Boom):
        await store.apply_records(
            E.as_records(events[3:], dict(offsets)),
            notifications_for,
            dead_letter,
            before_commit=explode,
        )
    after_failure = await queries.get_batch(request)
    assert after_failure.batch is not None and after_failure.batch.version == 3
    # The same records again (same offsets): applied exactly as if the failure never was.
    await store.apply_records(
        E.as_records(events[3:], dict(offsets)),
        notifications_for,
        dead_letter,
        before_commit=lambda r: trio.from_thread.run_sync(queries.invalidate, r.changed),
    )
    clean = await open_sqlite_store(tmp_path / "clean.db")
    clean_q = ResultQueries(clean, TtlCache(ttl_s=60))
    await store_apply_all(clean, events)
    got = await queries.get_batch(request)
    want = await clean_q.get_batch(request)
    assert bytes(got) == bytes(want)


async def store_apply_all(store: SqliteResultStore, events: list[EventEnvelope]) -> None:
    await store.apply_records(E.as_records(events), notifications_for, dead_letter)
