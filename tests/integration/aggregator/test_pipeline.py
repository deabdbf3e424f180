"""The aggregator's consume -> store -> outbox -> query path on a real bus.

``[memory]`` uses the embedded bus; ``[kafka]`` the real broker (``make test`` starts it).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio

from aggregator.consumer import run_consumer
from aggregator.outbox import run_outbox_relay
from aggregator.projection import batch_id_of
from aggregator.queries import ResultQueries
from aggregator.store import ApplyResult, SqliteResultStore, open_sqlite_store
from common.bus import EventBus, Record, open_kafka_bus, open_memory_bus
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as ev
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import NotFoundError
from common.events import DLQ_TOPIC, EventEnvelope, Topic, decode_envelope, envelope_headers
from common.settings import KafkaSettings
from common.ttlcache import TtlCache
from tests.unit.aggregator import events as E

pytestmark = pytest.mark.slow
WAIT_S = 30
ACTOR = common_v1.Actor(user_id="teacher-1")


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[EventBus]:
    if request.param == "memory":
        async with open_memory_bus() as memory:
            yield memory
    else:
        settings = KafkaSettings(
            bootstrap_servers=request.getfixturevalue("kafka_bootstrap"),
            session_timeout_ms=6_000,
            consume_timeout_s=0.1,
        )
        async with open_kafka_bus(settings) as kafka:
            yield kafka


async def publish(bus: EventBus, envelopes: list[EventEnvelope]) -> None:
    await bus.publish_many(
        [(e.event_type, batch_id_of(e).encode(), bytes(e), envelope_headers(e)) for e in envelopes]
    )


def E_batch(e: EventEnvelope) -> str:
    from aggregator.projection import batch_id_of

    return batch_id_of(e)


class Crash(Exception):
    """Raised to kill the consumer between the store commit and the Kafka commit."""


async def run_until(
    bus: EventBus,
    store: SqliteResultStore,
    queries: ResultQueries,
    group: str,
    done: Callable[[], Awaitable[bool]],
    *,
    crash_after: int | None = None,
    batch_max: int = 500,
) -> None:
    """Run consumer + relay until ``done()``; optionally crash after N applied batches."""
    applied = 0

    def on_applied(_: ApplyResult) -> None:
        nonlocal applied
        applied += 1
        if crash_after is not None and applied >= crash_after:
            raise Crash

    def invalidate(changed: dict[str, str]) -> None:
        trio.from_thread.run_sync(queries.invalidate, changed)

    with trio.fail_after(WAIT_S):
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        run_consumer,
                        bus,
                        store,
                        invalidate=invalidate,
                        on_applied=on_applied,
                        group=group,
                        batch_max=batch_max,
                    )
                )
                nursery.start_soon(run_outbox_relay, store, bus)
                while not await done():
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        except* Crash:
            pass


def flag(state: dict[str, bool], key: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return state.get(key, False)

    return check


async def view(queries: ResultQueries, batch_id: str) -> results_v1.BatchView | None:
    try:
        response = await queries.get_batch(
            results_v1.GetBatchRequest(actor=ACTOR, batch_id=batch_id, include_essays=True)
        )
    except NotFoundError:
        return None
    return response.batch


async def drain(
    bus: EventBus, topic: str, group: str, until: Callable[[list[Record]], bool]
) -> list[Record]:
    """Read ``topic`` from the start (a shared topic holds other tests' records too) until
    ``until(records)`` holds, then one more second to catch anything unexpected."""
    got: list[Record] = []
    async with bus.subscribe([topic], group) as sub:
        with trio.fail_after(WAIT_S):
            while not until(got):
                got += await sub.get_batch(timeout_s=0.5)
        got += await sub.get_batch(timeout_s=1.0)
    return got


async def test_events_become_a_completed_view_and_notifications(
    bus: EventBus, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    store = await open_sqlite_store(tmp_path / "agg.db")
    queries = ResultQueries(store, TtlCache(ttl_s=60))
    batch = unique("b")
    events = E.full_run(batch)
    await publish(bus, events)

    async def finished() -> bool:
        v = await view(queries, batch)
        return v is not None and v.status is results_v1.BatchStatus.COMPLETED_SUCCESSFULLY

    state = {"done": False}

    async def watch() -> None:
        while not await finished():
            await trio.sleep(0.05)
        while await store.outbox_backlog():
            await trio.sleep(0.05)
        state["done"] = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await run_until(bus, store, queries, unique("agg"), flag(state, "done"))
    v = await view(queries, batch)
    assert v is not None and v.version == len(events)
    assert [e.cj_rank for e in v.essays] == [2, 1, 3]

    def ours(records: list[Record]) -> list[EventEnvelope]:
        decoded = [decode_envelope(r.value) for r in records if r.key == b"teacher-1"]
        return [e for e in decoded if e.teacher_notification_requested.batch_id == batch]

    def ready_seen(records: list[Record]) -> bool:
        return any(
            e.teacher_notification_requested.notification_type == "batch_results_ready"
            for e in ours(records)
        )

    notes = await drain(bus, Topic.TEACHER_NOTIFICATION, unique("ws"), ready_seen)
    mine = ours(notes)
    kinds = [e.teacher_notification_requested.notification_type for e in mine]
    assert kinds.count("batch_results_ready") == 1
    assert "batch_status_changed" in kinds
    assert len({e.event_id for e in mine}) == len(mine), "duplicate notification ids"
    # Keyed by the teacher (the topic is shared on a real broker: look at this batch's only).
    for_batch = [
        r
        for r in notes
        if decode_envelope(r.value).teacher_notification_requested.batch_id == batch
    ]
    assert for_batch and all(r.key == b"teacher-1" for r in for_batch)


async def test_r4_poison_goes_to_the_dlq_with_reasons_and_the_partition_keeps_flowing(
    bus: EventBus, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    store = await open_sqlite_store(tmp_path / "agg.db")
    queries = ResultQueries(store, TtlCache(ttl_s=60))
    batch = unique("b")
    good = E.full_run(batch)
    bad_type = E.envelope(ev.SessionRevoked(user_id="u", session_id="s"), 5)
    no_batch = E.envelope(ev.SpellcheckResult(essay_id="e"), 6)
    key = batch.encode()
    await bus.publish(Topic.SPELLCHECK_RESULTS, b"\xff\x00junk", key=key)
    await bus.publish(Topic.SPELLCHECK_RESULTS, bytes(bad_type), key=key)
    await bus.publish(Topic.SPELLCHECK_RESULTS, bytes(no_batch), key=key)
    await publish(bus, good)
    done = {"v": False}

    async def watch() -> None:
        while True:
            v = await view(queries, batch)
            if v is not None and v.version == len(good) and not await store.outbox_backlog():
                done["v"] = True
                return
            await trio.sleep(0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await run_until(bus, store, queries, unique("agg"), flag(done, "v"))
    dlq = [
        r
        for r in await drain(
            bus, DLQ_TOPIC, unique("ops"), lambda rs: sum(r.key == key for r in rs) >= 3
        )
        if r.key == key
    ]
    reasons = sorted((r.header("dlq.error.class") or b"").decode() for r in dlq)
    assert reasons == ["invalid_payload", "undecodable", "unexpected_event_type"]
    for record in dlq:
        assert record.header("dlq.source.topic") == Topic.SPELLCHECK_RESULTS.encode()
        assert record.header("dlq.source.offset") is not None
        assert record.header("dlq.error.message")


async def test_r1_consumer_killed_between_store_and_kafka_commit_loses_and_doubles_nothing(
    bus: EventBus, tmp_path: Path, unique: Callable[[str], str]
) -> None:
    rng = random.Random(7)
    batches = [unique(f"b{i}") for i in range(4)]
    events = [e for b in batches for e in E.full_run(b)]
    rng.shuffle(events)
    # A clean run for the reference views.
    clean_store = await open_sqlite_store(tmp_path / "clean.db")
    clean_q = ResultQueries(clean_store, TtlCache(ttl_s=60))
    await publish(bus, events)
    expected: dict[str, bytes] = {}

    async def all_applied(queries: ResultQueries) -> bool:
        for b in batches:
            v = await view(queries, b)
            if v is None or v.version != len(E.full_run("x")):
                return False
        return True

    flags = {"clean": False}

    async def watch_clean() -> None:
        while not await all_applied(clean_q):
            await trio.sleep(0.05)
        flags["clean"] = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_clean)
        await run_until(bus, clean_store, clean_q, unique("clean"), flag(flags, "clean"))
    for b in batches:
        v = await view(clean_q, b)
        assert v is not None
        expected[b] = bytes(v)

    # The same stream, crashing right after a store commit (before the Kafka commit) again
    # and again, each time restarting with the same store and consumer group.
    store = await open_sqlite_store(tmp_path / "crashy.db")
    queries = ResultQueries(store, TtlCache(ttl_s=60))
    group = unique("crashy")
    crashes = 0
    for _ in range(40):
        # Small batches and a random crash point: the consumer dies again and again in the
        # middle of the stream, each time after a store commit and before the Kafka commit.
        await run_until(
            bus,
            store,
            queries,
            group,
            partial(all_applied, queries),
            crash_after=rng.randint(1, 3),
            batch_max=3,
        )
        crashes += 1
        if await all_applied(queries):
            break
    assert crashes >= 3, "the stream was applied without enough crashes to mean anything"
    await run_until(bus, store, queries, group, partial(all_applied, queries))
    for b in batches:
        v = await view(queries, b)
        assert v is not None and bytes(v) == expected[b], f"view of {b} differs from clean run"


async def test_transient_store_failures_are_retried_and_never_committed_past(
    tmp_path: Path, unique: Callable[[str], str]
) -> None:
    from common.errors import StorageError

    async with open_memory_bus() as bus:
        store = await open_sqlite_store(tmp_path / "agg.db")
        queries = ResultQueries(store, TtlCache(ttl_s=60))
        real_apply = store.apply_records
        failures = {"left": 3}

        async def flaky_apply(*args: object, **kwargs: object) -> ApplyResult:
            if failures["left"]:
                failures["left"] -= 1
                raise StorageError("sqlite: database is locked", service="sqlite")
            return await real_apply(*args, **kwargs)  # type: ignore[arg-type]

        store.apply_records = flaky_apply  # type: ignore[method-assign]
        batch = unique("b")
        await publish(bus, E.full_run(batch))
        group = unique("agg")

        async def complete() -> bool:
            v = await view(queries, batch)
            return v is not None and v.status is results_v1.BatchStatus.COMPLETED_SUCCESSFULLY

        await run_until(bus, store, queries, group, complete)
        assert failures["left"] == 0, "the failures were not retried"
        committed = bus._groups[group].committed  # the bus saw a commit only after success
        assert sum(committed.values()) == len(E.full_run("x"))
