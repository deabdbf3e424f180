"""The aggregator's Kafka consumer: records -> store transaction -> cache invalidation.

Each batch from the bus is applied in one store transaction with its offsets (see
:mod:`aggregator.store`); on assignment the consumer seeks every partition to the offset the
store holds, so the Kafka commit that follows is only a courtesy to lag monitoring. Transient
store failures are retried with backoff and nothing is committed past them; a failure that
persists ends the task (the service stops rather than skip events).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

import trio

from aggregator.outbox import dead_letter, notifications_for
from aggregator.store import ApplyResult, ResultStore
from common.backoff import BackoffPolicy, retry
from common.bus import EventBus, TopicPartition
from common.errors import StorageError
from common.events import RESULT_TOPICS

__all__ = ["ConsumerStatistics", "run_consumer"]

CONSUMER_GROUP = "aggregator"
#: Records per store transaction: bigger batches amortise the commit (fsync) cost.
BATCH_MAX = 500
STORE_RETRY = BackoffPolicy(initial_s=0.05, multiplier=2, max_s=2.0, max_attempts=8)


@dataclass
class ConsumerStatistics:
    batches: int = 0
    by_topic: dict[tuple[str, str], int] = field(default_factory=dict)
    assigned: frozenset[TopicPartition] = frozenset()
    lag: dict[TopicPartition, int] = field(default_factory=dict)
    ready: bool = False


async def run_consumer(
    bus: EventBus,
    store: ResultStore,
    *,
    invalidate: Callable[[Mapping[str, str]], None],
    on_applied: Callable[[ApplyResult], None] | None = None,
    stats: ConsumerStatistics | None = None,
    group: str = CONSUMER_GROUP,
    topics: Sequence[str] = RESULT_TOPICS,
    batch_max: int = BATCH_MAX,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume forever. ``invalidate(changed)`` runs on the store thread before COMMIT with
    ``{batch_id: owner_user_id}`` of every changed batch (it must be thread-safe: the
    aggregator hops into Trio with ``trio.from_thread.run_sync``)."""
    stats = stats or ConsumerStatistics()

    async def seek_to_stored(parts: Sequence[TopicPartition]) -> Mapping[TopicPartition, int]:
        stored = await store.stored_offsets(parts)
        return {tp: stored.get(tp, 0) for tp in parts}

    def before_commit(result: ApplyResult) -> None:
        if result.changed:
            invalidate(result.changed)

    await bus.ensure_topics(list(topics))
    async with bus.subscribe(list(topics), group, on_assign=seek_to_stored) as sub:
        stats.ready = True
        task_status.started()
        while True:
            batch = await sub.get_batch(max_records=batch_max, timeout_s=1.0)
            stats.assigned = sub.assignment()
            stats.lag = sub.lag()
            if not batch:
                continue
            result = await retry(
                partial(
                    store.apply_records,
                    batch,
                    notifications_for,
                    dead_letter,
                    before_commit=before_commit,
                ),
                retry_on=lambda exc: isinstance(exc, StorageError),
                policy=STORE_RETRY,
            )
            stats.batches += 1
            for key, count in result.by_topic.items():
                stats.by_topic[key] = stats.by_topic.get(key, 0) + count
            if on_applied is not None:
                on_applied(result)
            await sub.commit(batch)
