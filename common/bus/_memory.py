"""MemoryBus: the embedded, single-process event bus with Kafka's semantics.

Topics have partitions (keys map to partitions with Kafka's murmur2, so a key lands where the
Kafka bus would put it); consumer groups split partitions among live members; each group
keeps committed offsets; a member that leaves (its ``subscribe`` context exits, including by
cancellation) releases its partitions and the next owner resumes at the last commit, so
uncommitted records are delivered again. A partition moves to a new owner only after the old
owner has released it (at its next ``get_batch`` or when it leaves), so no two members of a
group ever hold the same partition at once.

Memory is bounded by retention: each partition keeps at most ``max_records_per_partition``
records (default 100 000; memory <= that x partitions x record size). A consumer whose
position fell out of retention skips ahead to the oldest kept record, as on Kafka.
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from common.bus._types import (
    BusStatistics,
    Headers,
    OnAssign,
    OnRevoke,
    Record,
    RecordMetadata,
    TopicPartition,
    commit_positions,
    murmur2_partition,
)
from common.errors import BusError, PublishError, ValidationError

__all__ = ["MemoryBus", "open_memory_bus"]

DEFAULT_PARTITIONS = 3
DEFAULT_RETENTION = 100_000


@dataclass
class _Partition:
    records: deque[Record]
    next_offset: int = 0

    def first_offset(self) -> int:
        return self.records[0].offset if self.records else self.next_offset


@dataclass
class _Group:
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    members: list[_MemorySubscription] = field(default_factory=list)
    #: Which member each partition is meant for, and which member holds it now.
    target: dict[TopicPartition, _MemorySubscription] = field(default_factory=dict)
    holder: dict[TopicPartition, _MemorySubscription] = field(default_factory=dict)


class MemoryBus:
    """In-process :class:`~common.bus.EventBus`. Use from one Trio run; see the module doc."""

    def __init__(
        self,
        *,
        default_partitions: int = DEFAULT_PARTITIONS,
        max_records_per_partition: int = DEFAULT_RETENTION,
    ) -> None:
        if default_partitions < 1:
            raise ValidationError("default_partitions must be >= 1", field="default_partitions")
        if max_records_per_partition < 1:
            raise ValidationError(
                "max_records_per_partition must be >= 1", field="max_records_per_partition"
            )
        self._default_partitions = default_partitions
        self._retention = max_records_per_partition
        self._topics: dict[str, list[_Partition]] = {}
        self._groups: dict[str, _Group] = {}
        self._changed = trio.Event()
        self._closed = False
        self._ids = itertools.count()
        # Spreads keyless records over partitions; nothing secret depends on it.
        self._random = random.Random()  # noqa: S311  # nosec B311
        self._published = 0
        self._consumed = 0
        self._committed = 0

    # -- topics and publishing ------------------------------------------------------------

    def _partitions(self, topic: str, create_with: int | None = None) -> list[_Partition]:
        parts = self._topics.get(topic)
        if parts is None:
            count = create_with or self._default_partitions
            parts = [_Partition(deque(maxlen=self._retention)) for _ in range(count)]
            self._topics[topic] = parts
            for group in self._groups.values():
                self._rebalance(group)
        return parts

    async def ensure_topics(self, names: Sequence[str], partitions: int = 3) -> None:
        self._check_open()
        for name in names:
            self._partitions(name, partitions)
        await trio.lowlevel.checkpoint()

    def _check_open(self) -> None:
        if self._closed:
            raise BusError("the memory bus is closed", service="memory-bus")

    def _append(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> Record:
        parts = self._partitions(topic)
        index = (
            murmur2_partition(key, len(parts))
            if key is not None
            else self._random.randrange(len(parts))
        )
        part = parts[index]
        record = Record(
            topic=topic,
            partition=index,
            offset=part.next_offset,
            key=key,
            value=bytes(value),
            headers=tuple(headers),
            timestamp_ms=int(trio.current_time() * 1000),
        )
        part.next_offset += 1
        part.records.append(record)
        self._published += 1
        return record

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check_can_publish(self, topic: str) -> None:
        if self._closed:
            raise PublishError(f"{topic}: the memory bus is closed", service="memory-bus")

    async def publish(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> RecordMetadata:
        self._check_can_publish(topic)
        record = self._append(topic, key, value, headers)
        self._notify()
        await trio.lowlevel.checkpoint()
        return RecordMetadata(record.topic, record.partition, record.offset)

    async def publish_many(
        self, records: Sequence[tuple[str, bytes | None, bytes, Headers]]
    ) -> list[RecordMetadata]:
        for topic, _, _, _ in records:
            self._check_can_publish(topic)
        written = [self._append(t, k, v, h) for t, k, v, h in records]
        self._notify()
        await trio.lowlevel.checkpoint()
        return [RecordMetadata(r.topic, r.partition, r.offset) for r in written]

    # -- groups -----------------------------------------------------------------------------

    def _rebalance(self, group: _Group) -> None:
        """Round-robin every subscribed partition over the members that subscribe to it."""
        group.target = {}
        topics = sorted({t for m in group.members for t in m.topics})
        for topic in topics:
            members = [m for m in group.members if topic in m.topics]
            for index, _ in enumerate(self._partitions(topic)):
                group.target[TopicPartition(topic, index)] = members[index % len(members)]
        self._notify()

    @asynccontextmanager
    async def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        on_assign: OnAssign | None = None,
        on_revoke: OnRevoke | None = None,
    ) -> AsyncIterator[_MemorySubscription]:
        self._check_open()
        if not topics:
            raise ValidationError("subscribe needs at least one topic", field="topics")
        state = self._groups.setdefault(group, _Group())
        sub = _MemorySubscription(self, state, tuple(topics), next(self._ids), on_assign, on_revoke)
        for topic in topics:
            self._partitions(topic)
        state.members.append(sub)
        self._rebalance(state)
        try:
            yield sub
        finally:
            state.members.remove(sub)
            sub.release_all()
            self._rebalance(state)

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            published=self._published,
            publish_failures=0,
            consumed=self._consumed,
            committed=self._committed,
            healthy=not self._closed,
            last_error="closed" if self._closed else None,
        )

    def close(self) -> None:
        self._closed = True
        self._notify()


class _MemorySubscription:
    def __init__(
        self,
        bus: MemoryBus,
        group: _Group,
        topics: tuple[str, ...],
        member_id: int,
        on_assign: OnAssign | None,
        on_revoke: OnRevoke | None,
    ) -> None:
        self._bus = bus
        self._group = group
        self.topics = topics
        self.member_id = member_id
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._positions: dict[TopicPartition, int] = {}

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._positions)

    def lag(self) -> dict[TopicPartition, int]:
        out = {}
        for tp, position in self._positions.items():
            part = self._bus._topics[tp.topic][tp.partition]
            out[tp] = max(0, part.next_offset - max(position, part.first_offset()))
        return out

    def release_all(self) -> None:
        for tp in list(self._positions):
            if self._group.holder.get(tp) is self:
                del self._group.holder[tp]
        self._positions.clear()
        self._bus._notify()

    async def _apply_rebalance(self) -> None:
        group = self._group
        revoked = sorted(tp for tp in self._positions if group.target.get(tp) is not self)
        if revoked:
            if self._on_revoke is not None:
                await self._on_revoke(revoked)
            for tp in revoked:
                del self._positions[tp]
                if group.holder.get(tp) is self:
                    del group.holder[tp]
            self._bus._notify()
        gained = sorted(
            tp
            for tp, member in group.target.items()
            if member is self and tp not in self._positions and tp not in group.holder
        )
        if not gained:
            return
        for tp in gained:
            group.holder[tp] = self
        starts: Mapping[TopicPartition, int] | None = None
        if self._on_assign is not None:
            starts = await self._on_assign(gained)
        for tp in gained:
            if starts is not None and tp in starts:
                self._positions[tp] = starts[tp]
            else:
                self._positions[tp] = group.committed.get(tp, 0)

    def _take(self, max_records: int) -> list[Record]:
        out: list[Record] = []
        for tp in sorted(self._positions):
            part = self._bus._topics[tp.topic][tp.partition]
            position = max(self._positions[tp], part.first_offset())
            if position >= part.next_offset:
                continue
            start = position - part.first_offset()
            for i in range(start, min(len(part.records), start + max_records - len(out))):
                out.append(part.records[i])
            self._positions[tp] = out[-1].offset + 1
            if len(out) >= max_records:
                break
        return out

    async def get_batch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        if max_records < 1:
            raise ValidationError("max_records must be >= 1", field="max_records")
        with trio.move_on_after(timeout_s):
            while True:
                self._bus._check_open()
                changed = self._bus._changed
                await self._apply_rebalance()
                batch = self._take(max_records)
                if batch:
                    self._bus._consumed += len(batch)
                    # The positions have moved past ``batch``: a cancellation here (the
                    # timeout firing) must not drop it, so this yield cannot be cancelled.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return batch
                await changed.wait()
        return []

    async def commit(self, records: Iterable[Record]) -> None:
        self._bus._check_open()
        group = self._group
        for tp, offset in commit_positions(records).items():
            if group.holder.get(tp) is not self:
                continue  # revoked: the new owner resumes from the last commit
            if offset > group.committed.get(tp, -1):
                group.committed[tp] = offset
                self._bus._committed += 1
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_memory_bus(
    *,
    default_partitions: int = DEFAULT_PARTITIONS,
    max_records_per_partition: int = DEFAULT_RETENTION,
) -> AsyncIterator[MemoryBus]:
    """A :class:`MemoryBus` that is closed (publish raises ``BusError``) when the block ends."""
    bus = MemoryBus(
        default_partitions=default_partitions, max_records_per_partition=max_records_per_partition
    )
    try:
        yield bus
    finally:
        bus.close()
