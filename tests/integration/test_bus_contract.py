"""One behavioural suite for both EventBus implementations: ``[memory]`` in process and
``[kafka]`` against the real Apache Kafka broker (``make test`` starts it)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence

import pytest
import trio

from common.bus import (
    EventBus,
    MemoryBus,
    Record,
    Subscription,
    TopicPartition,
    murmur2_partition,
    open_kafka_bus,
    open_memory_bus,
)
from common.errors import PublishError
from common.settings import KafkaSettings

pytestmark = pytest.mark.slow

#: Real-time bound for anything waiting on the broker (a group join takes a few seconds).
WAIT_S = 30


@pytest.fixture(params=["memory", pytest.param("kafka", marks=pytest.mark.kafka)])
def bus_settings(request: pytest.FixtureRequest) -> KafkaSettings | None:
    if request.param == "memory":
        return None
    return KafkaSettings(
        bootstrap_servers=request.getfixturevalue("kafka_bootstrap"),
        client_id="bus-contract-tests",
        session_timeout_ms=6_000,
        delivery_timeout_ms=15_000,
        consume_timeout_s=0.1,
    )


@pytest.fixture
async def bus(bus_settings: KafkaSettings | None) -> AsyncIterator[EventBus]:
    if bus_settings is None:
        async with open_memory_bus() as memory:
            yield memory
    else:
        async with open_kafka_bus(bus_settings) as kafka:
            yield kafka


async def take(sub: Subscription, count: int, *, timeout_s: float = WAIT_S) -> list[Record]:
    """Exactly ``count`` records (fails if fewer arrive in time or more are waiting)."""
    got: list[Record] = []
    with trio.fail_after(timeout_s):
        while len(got) < count:
            got += await sub.get_batch(max_records=count - len(got), timeout_s=0.5)
    return got


async def assigned(subs: Sequence[Subscription], *, timeout_s: float = WAIT_S) -> None:
    """Poll until every member holds partitions and together they hold all of them."""
    with trio.fail_after(timeout_s):
        while True:
            for sub in subs:
                extra = await sub.get_batch(timeout_s=0.1)
                assert not extra, f"records before any were published: {extra}"
            if all(sub.assignment() for sub in subs):
                return


def values(records: Sequence[Record]) -> list[bytes]:
    return [r.value for r in records]


async def test_per_key_order_and_same_key_same_partition(
    bus: EventBus, unique: Callable[[str], str]
) -> None:
    topic = unique("orders")
    await bus.ensure_topics([topic], partitions=3)
    sent = []
    for i in range(30):
        key = f"batch-{i % 4}".encode()
        meta = await bus.publish(topic, f"{i}".encode(), key=key)
        assert meta.partition == murmur2_partition(key, 3), "key did not pick Kafka's partition"
        sent.append((key, f"{i}".encode()))
    async with bus.subscribe([topic], unique("g")) as sub:
        got = await take(sub, 30)
    for key in {k for k, _ in sent}:
        expected = [v for k, v in sent if k == key]
        received = [r.value for r in got if r.key == key]
        assert received == expected, f"order broken for {key!r}"
        assert len({r.partition for r in got if r.key == key}) == 1


async def test_headers_and_keys_round_trip(bus: EventBus, unique: Callable[[str], str]) -> None:
    topic = unique("headers")
    await bus.ensure_topics([topic], partitions=1)
    headers = [
        ("event_type", b"x.v1"),
        ("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"),
    ]
    await bus.publish(topic, b"\x00\xffbinary", key=b"k1", headers=headers)
    async with bus.subscribe([topic], unique("g")) as sub:
        (record,) = await take(sub, 1)
    assert record.key == b"k1"
    assert record.value == b"\x00\xffbinary"
    assert record.headers == tuple(headers)
    assert record.header("event_type") == b"x.v1"


async def test_uncommitted_records_are_redelivered_after_the_consumer_dies(
    bus: EventBus, unique: Callable[[str], str]
) -> None:
    topic, group = unique("redeliver"), unique("g")
    await bus.ensure_topics([topic], partitions=3)
    await bus.publish_many([(topic, f"k{i}".encode(), f"v{i}".encode(), ()) for i in range(12)])
    got_first = trio.Event()

    async def doomed_consumer() -> None:
        async with bus.subscribe([topic], group) as sub:
            await take(sub, 12)
            got_first.set()
            await trio.sleep_forever()  # killed before it commits

    async with trio.open_nursery() as nursery:
        nursery.start_soon(doomed_consumer)
        with trio.fail_after(WAIT_S):
            await got_first.wait()
        nursery.cancel_scope.cancel()
    async with bus.subscribe([topic], group) as sub:
        again = await take(sub, 12)
    assert sorted(values(again)) == sorted(f"v{i}".encode() for i in range(12))


async def test_committed_records_are_not_redelivered(
    bus: EventBus, unique: Callable[[str], str]
) -> None:
    topic, group = unique("committed"), unique("g")
    await bus.ensure_topics([topic], partitions=3)
    await bus.publish_many([(topic, f"k{i}".encode(), b"old", ()) for i in range(9)])
    async with bus.subscribe([topic], group) as sub:
        await sub.commit(await take(sub, 9))
    await bus.publish(topic, b"new", key=b"k0")
    async with bus.subscribe([topic], group) as sub:
        got = await take(sub, 1)
        assert values(got) == [b"new"], "a committed record came back"
        assert not await sub.get_batch(timeout_s=1.0)


async def test_two_members_split_partitions_and_see_each_record_once(
    bus: EventBus, unique: Callable[[str], str]
) -> None:
    topic, group = unique("split"), unique("g")
    await bus.ensure_topics([topic], partitions=3)
    seen: dict[str, list[Record]] = {"a": [], "b": []}
    async with bus.subscribe([topic], group) as a, bus.subscribe([topic], group) as b:
        await assigned([a, b])
        assert not (a.assignment() & b.assignment()), "a partition is held twice"
        assert len(a.assignment() | b.assignment()) == 3
        await bus.publish_many(
            [(topic, f"key-{i}".encode(), f"{i}".encode(), ()) for i in range(60)]
        )
        with trio.fail_after(WAIT_S):
            while len(seen["a"]) + len(seen["b"]) < 60:
                for name, sub in (("a", a), ("b", b)):
                    batch = await sub.get_batch(timeout_s=0.2)
                    seen[name] += batch
                    await sub.commit(batch)
    everything = seen["a"] + seen["b"]
    assert sorted(int(v) for v in values(everything)) == list(range(60)), "lost or duplicated"
    assert seen["a"] and seen["b"], "one member got nothing"
    assert {r.partition for r in seen["a"]}.isdisjoint({r.partition for r in seen["b"]})


async def test_another_group_sees_everything(bus: EventBus, unique: Callable[[str], str]) -> None:
    topic = unique("fanout")
    await bus.ensure_topics([topic], partitions=3)
    await bus.publish_many([(topic, f"k{i}".encode(), f"{i}".encode(), ()) for i in range(15)])
    async with bus.subscribe([topic], unique("g1")) as one:
        await one.commit(await take(one, 15))
    async with bus.subscribe([topic], unique("g2")) as two:
        assert len(await take(two, 15)) == 15


async def test_on_assign_seeks_to_offsets_stored_elsewhere(
    bus: EventBus, unique: Callable[[str], str]
) -> None:
    topic = unique("seek")
    await bus.ensure_topics([topic], partitions=1)
    await bus.publish_many([(topic, b"k", f"{i}".encode(), ()) for i in range(10)])
    calls: list[list[TopicPartition]] = []

    async def from_my_store(parts: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        calls.append(list(parts))
        return {TopicPartition(topic, 0): 7}

    async with bus.subscribe([topic], unique("g"), on_assign=from_my_store) as sub:
        got = await take(sub, 3)
    assert [r.offset for r in got] == [7, 8, 9]
    assert calls == [[TopicPartition(topic, 0)]]


async def test_commit_never_moves_backwards(bus: EventBus, unique: Callable[[str], str]) -> None:
    topic, group = unique("monotonic"), unique("g")
    await bus.ensure_topics([topic], partitions=1)
    await bus.publish_many([(topic, b"k", f"{i}".encode(), ()) for i in range(8)])
    async with bus.subscribe([topic], group) as sub:
        records = await take(sub, 8)
        await sub.commit(records[:5])  # next start: 5
        await sub.commit(records[:2])  # older: must be ignored
    async with bus.subscribe([topic], group) as sub:
        got = await take(sub, 3)
    assert [r.offset for r in got] == [5, 6, 7]


async def test_on_revoke_is_called_when_partitions_move_to_a_new_member(
    bus: EventBus, unique: Callable[[str], str]
) -> None:
    topic, group = unique("revoke"), unique("g")
    await bus.ensure_topics([topic], partitions=2)
    revoked: list[TopicPartition] = []

    async def note(parts: Sequence[TopicPartition]) -> None:
        revoked.extend(parts)

    async with bus.subscribe([topic], group, on_revoke=note) as a:
        await assigned([a])
        async with bus.subscribe([topic], group) as b:
            with trio.fail_after(WAIT_S):
                while not (b.assignment() and len(a.assignment()) == 1):
                    await a.get_batch(timeout_s=0.1)
                    await b.get_batch(timeout_s=0.1)
    assert revoked, "the first member was never told it lost a partition"


async def test_publish_fails_loudly_when_the_bus_cannot_accept(
    bus_settings: KafkaSettings | None,
) -> None:
    if bus_settings is None:
        memory = MemoryBus()
        memory.close()
        with pytest.raises(PublishError):
            await memory.publish("t", b"v")
        return
    dead = bus_settings.model_copy(
        update={"bootstrap_servers": "127.0.0.1:1", "delivery_timeout_ms": 1_000}
    )
    async with open_kafka_bus(dead) as kafka:
        with trio.fail_after(10), pytest.raises(PublishError) as info:
            await kafka.publish("never-there", b"v", key=b"k")
        assert "not acknowledged" in str(info.value)
        assert kafka.statistics().publish_failures == 1


async def test_lag_reports_how_far_behind_the_log_a_member_is(
    bus: EventBus, unique: Callable[[str], str]
) -> None:
    topic = unique("lag")
    await bus.ensure_topics([topic], partitions=1)
    await bus.publish_many([(topic, b"k", f"{i}".encode(), ()) for i in range(10)])
    tp = TopicPartition(topic, 0)
    async with bus.subscribe([topic], unique("g")) as sub:
        await take(sub, 4)
        await trio.sleep(1.1)  # the Kafka bus samples lag at most once a second
        await take(sub, 1)
        assert sub.lag().get(tp) in (5, 6), sub.lag()  # a snapshot from before or after the hop
        await take(sub, 5)
        await trio.sleep(1.1)
        await sub.get_batch(timeout_s=0.3)
        assert sub.lag().get(tp) == 0, sub.lag()
