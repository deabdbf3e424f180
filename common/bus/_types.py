"""Types and protocols of the event bus (shared by the in-memory and the Kafka bus)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "BusStatistics",
    "EventBus",
    "Headers",
    "OnAssign",
    "OnRevoke",
    "Record",
    "RecordMetadata",
    "Subscription",
    "TopicPartition",
    "commit_positions",
    "murmur2_partition",
]

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True, order=True)
class TopicPartition:
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed record. ``offset`` is its position in ``(topic, partition)``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int = 0

    @property
    def topic_partition(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def header(self, name: str) -> bytes | None:
        """The first header called ``name``, or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class RecordMetadata:
    """Where an acknowledged record was written."""

    topic: str
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class BusStatistics:
    published: int
    publish_failures: int
    consumed: int
    committed: int
    #: False while the bus reports the broker unreachable (cleared on the next success).
    healthy: bool
    last_error: str | None


#: Called when partitions are assigned; may return the offset to start each one at (for
#: consumers that store their offsets elsewhere, e.g. transactionally with their effects).
OnAssign = Callable[[Sequence[TopicPartition]], Awaitable[Mapping[TopicPartition, int] | None]]
#: Called before partitions are taken away; the owner must stop working on them.
OnRevoke = Callable[[Sequence[TopicPartition]], Awaitable[None]]


class Subscription(Protocol):
    """A consumer-group member. Calls must come from one task, one at a time."""

    async def get_batch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout_s`` for the first.

        Records of one partition come in offset order. Rebalance callbacks run inside this
        call. An empty list means nothing arrived in time.
        """
        ...

    async def commit(self, records: Iterable[Record]) -> None:
        """Mark ``records`` processed: per partition, the next start is the highest offset +1.

        Commits never move backwards, and partitions no longer assigned are skipped (their
        new owner starts from the last commit). Raises ``BusError`` if the broker refuses.
        """
        ...

    def assignment(self) -> frozenset[TopicPartition]: ...

    def lag(self) -> dict[TopicPartition, int]:
        """Records behind the end of each held partition (a recent snapshot)."""
        ...


class EventBus(Protocol):
    async def publish(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> RecordMetadata:
        """Write one record and wait for the broker's acknowledgement.

        Raises ``PublishError`` if it is not acknowledged (the record may or may not exist).
        """
        ...

    async def publish_many(
        self, records: Sequence[tuple[str, bytes | None, bytes, Headers]]
    ) -> list[RecordMetadata]:
        """Write ``(topic, key, value, headers)`` records; wait for all acknowledgements."""
        ...

    def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        on_assign: OnAssign | None = None,
        on_revoke: OnRevoke | None = None,
    ) -> AbstractAsyncContextManager[Subscription]:
        """Join consumer ``group`` for ``topics``. Leaving (the context exits, also by
        cancellation) hands uncommitted records to the group's next consumer."""
        ...

    async def ensure_topics(self, names: Sequence[str], partitions: int = 3) -> None: ...

    def statistics(self) -> BusStatistics: ...


def commit_positions(records: Iterable[Record]) -> dict[TopicPartition, int]:
    """Per partition, the offset to commit (highest offset seen + 1)."""
    positions: dict[TopicPartition, int] = {}
    for record in records:
        tp = record.topic_partition
        nxt = record.offset + 1
        if nxt > positions.get(tp, -1):
            positions[tp] = nxt
    return positions


def _murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's default partitioner hash)."""
    m = 0x5BD1E995
    length = len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    rounded = length & ~3
    for i in range(0, rounded, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    rest = length & 3
    if rest == 3:
        h ^= data[rounded + 2] << 16
    if rest >= 2:
        h ^= data[rounded + 1] << 8
    if rest >= 1:
        h ^= data[rounded]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client (and librdkafka's ``murmur2_random``) picks."""
    return (_murmur2(key) & 0x7FFFFFFF) % partitions
