"""MemoryBus specifics (the shared behaviour is in tests/integration/test_bus_contract.py)."""

from __future__ import annotations

import pytest
import trio

from common.bus import MemoryBus, TopicPartition, murmur2_partition, open_memory_bus
from common.bus._types import _murmur2
from common.errors import ValidationError

# Reference values of Kafka's Java murmur2 (as signed 32-bit ints).
KAFKA_MURMUR2 = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), KAFKA_MURMUR2.items())
def test_murmur2_matches_kafkas(key: bytes, expected: int) -> None:
    value = _murmur2(key)
    assert (value - (1 << 32) if value >= 1 << 31 else value) == expected


def test_partition_is_stable_and_in_range() -> None:
    for n in (1, 3, 12):
        for i in range(200):
            key = f"user-{i}".encode()
            assert 0 <= murmur2_partition(key, n) < n
            assert murmur2_partition(key, n) == murmur2_partition(key, n)


async def test_retention_bounds_memory_and_late_readers_skip_ahead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_bus(max_records_per_partition=5) as bus:
        await bus.ensure_topics(["t"], partitions=1)
        for i in range(12):
            await bus.publish("t", f"{i}".encode(), key=b"k")
        async with bus.subscribe(["t"], "late") as sub:
            batch = await sub.get_batch(timeout_s=1)
    assert [r.offset for r in batch] == [7, 8, 9, 10, 11]


async def test_get_batch_waits_for_the_first_record_and_times_out_empty(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_bus() as bus, bus.subscribe(["t"], "g") as sub:
        start = trio.current_time()
        assert await sub.get_batch(timeout_s=2.5) == []
        assert trio.current_time() - start == pytest.approx(2.5)

        async def later() -> None:
            await trio.sleep(1)
            await bus.publish("t", b"v", key=b"k")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(later)
            batch = await sub.get_batch(timeout_s=10)
        assert [r.value for r in batch] == [b"v"]
        assert trio.current_time() - start == pytest.approx(3.5)


async def test_a_timeout_firing_as_records_are_taken_never_drops_them() -> None:
    # Regression: the timeout could cancel get_batch after it had taken the records (and
    # moved the positions past them), so they were lost to the consumer for good.
    async with open_memory_bus() as bus, bus.subscribe(["t"], "g") as sub:
        await sub.get_batch(timeout_s=0.01)  # joined and assigned
        values = [str(i).encode() for i in range(200)]
        for value in values:
            await bus.publish("t", value, key=b"k")
        got: list[bytes] = []
        for _ in range(10_000):
            if len(got) == len(values):
                break
            # A zero timeout: the deadline has passed by the first yield, every time.
            got += [r.value for r in await sub.get_batch(max_records=7, timeout_s=0)]
        assert got == values


async def test_a_partition_is_never_held_by_two_members(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_memory_bus() as bus:
        await bus.ensure_topics(["t"], partitions=3)
        async with bus.subscribe(["t"], "g") as a:
            await a.get_batch(timeout_s=0.1)
            assert a.assignment() == {TopicPartition("t", p) for p in range(3)}
            async with bus.subscribe(["t"], "g") as b:
                await b.get_batch(timeout_s=0.1)
                assert not b.assignment(), "b took partitions a has not released"
                await a.get_batch(timeout_s=0.1)  # a applies the rebalance, releasing some
                await b.get_batch(timeout_s=0.1)
                assert a.assignment() and b.assignment()
                assert not a.assignment() & b.assignment()


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        MemoryBus(default_partitions=0)
    assert info.value.field == "default_partitions"
