"""The event bus: Kafka's semantics behind one protocol, two implementations.

* :class:`MemoryBus` (:func:`open_memory_bus`): embedded, one process, the dev default.
* :class:`KafkaBus` (:func:`open_kafka_bus`): confluent-kafka on a real cluster.

Both: ``publish`` waits for the acknowledgement (``PublishError`` otherwise); keys choose
partitions (Kafka's murmur2); per-partition order; consumer groups split partitions; commits
are explicit, after processing, and never move backwards; uncommitted records are delivered
again to the group's next consumer after a member leaves or dies.
"""

from __future__ import annotations

from common.bus._kafka import KafkaBus, open_kafka_bus
from common.bus._memory import MemoryBus, open_memory_bus
from common.bus._open import open_service_bus
from common.bus._types import (
    BusStatistics,
    EventBus,
    Headers,
    OnAssign,
    OnRevoke,
    Record,
    RecordMetadata,
    Subscription,
    TopicPartition,
    commit_positions,
    murmur2_partition,
)

__all__ = [
    "BusStatistics",
    "EventBus",
    "Headers",
    "KafkaBus",
    "MemoryBus",
    "OnAssign",
    "OnRevoke",
    "Record",
    "RecordMetadata",
    "Subscription",
    "TopicPartition",
    "commit_positions",
    "murmur2_partition",
    "open_kafka_bus",
    "open_memory_bus",
    "open_service_bus",
]
