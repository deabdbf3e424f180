"""The notification consumer: ``huleedu.notification.teacher.requested.v1`` into the hub.

Each instance joins its own consumer group (``wsmanager-<instance id>``), so it reads the whole
topic from the earliest retained record: its replay buffers then hold every user's recent
events, whichever instance a client reconnects to. Records are parsed on protobuf's upb
runtime (the hot path), turned into one pre-serialised ``event`` frame each and dispatched;
an unreadable record is counted and skipped (its offset is not a gap: no user owns it).

``caught_up`` is set once every assigned partition has been read to its end: until then the
instance is not ready (a client would get history as if it were live).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import trio

from common.bus import EventBus, Record
from common.events import PoisonMessageError, Topic, parse_envelope
from common.logs import get_logger
from wsmanager.hub import Delivery, Hub
from wsmanager.protocol import encode_event

__all__ = [
    "CATEGORY_NAMES",
    "POLL_S",
    "QUIET_POLLS",
    "ConsumerStatistics",
    "epoch_of",
    "run_notification_consumer",
    "to_delivery",
]

log = get_logger("wsmanager.consumer")

POLL_S = 0.1
QUIET_POLLS = 10
#: NotificationCategory enum values -> the names frames carry.
CATEGORY_NAMES = {
    0: "unspecified",
    1: "batch_progress",
    2: "processing_results",
    3: "file_operations",
    4: "class_management",
    5: "student_workflow",
    6: "system_alerts",
}


@dataclass
class ConsumerStatistics:
    records: int = 0
    unreadable: int = 0
    without_user: int = 0
    caught_up: bool = False


def epoch_of(record: Record) -> str:
    """The name of the partition log a record's offset counts in."""
    return f"{record.topic}/{record.partition}"


def to_delivery(record: Record) -> Delivery | None:
    """The delivery for one notification record (None: not addressed to a user)."""
    envelope = parse_envelope(record.value, expected_topics=[Topic.TEACHER_NOTIFICATION])
    note = envelope.teacher_notification_requested
    user_id = note.teacher_id or envelope.user_id
    if not user_id:
        return None
    occurred = envelope.occurred_at
    occurred_at = occurred.seconds + occurred.nanos / 1e9
    category = CATEGORY_NAMES.get(note.category, "unspecified")
    batch_id = note.batch_id or None
    epoch = epoch_of(record)
    frame = encode_event(
        offset=record.offset,
        epoch=epoch,
        event_id=envelope.event_id,
        event_type=note.notification_type,
        occurred_at=occurred_at,
        batch_id=batch_id,
        category=category,
        payload_json=note.payload_json,
    )
    return Delivery(epoch, record.offset, user_id, envelope.event_id, batch_id, category, frame)


async def run_notification_consumer(
    bus: EventBus,
    hub: Hub,
    *,
    group: str,
    stats: ConsumerStatistics,
    caught_up: trio.Event,
    on_dispatched: Callable[[int], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Consume notifications into ``hub`` until cancelled."""
    await bus.ensure_topics([Topic.TEACHER_NOTIFICATION])
    async with bus.subscribe([Topic.TEACHER_NOTIFICATION], group) as sub:
        task_status.started()
        quiet = 0
        while True:
            records = await sub.get_batch(max_records=500, timeout_s=POLL_S)
            for record in records:
                stats.records += 1
                try:
                    delivery = to_delivery(record)
                except PoisonMessageError as exc:
                    stats.unreadable += 1
                    log.warning("unreadable notification skipped", reason=exc.reason)
                    continue
                if delivery is None:
                    stats.without_user += 1
                    continue
                queued = hub.dispatch(delivery)
                if on_dispatched is not None:
                    on_dispatched(queued)
            if not caught_up.is_set():
                quiet = quiet + 1 if not records and sub.assignment() else 0
                assigned = sub.assignment()
                lag = sub.lag()
                at_end = bool(assigned) and all(lag.get(tp, 1) <= 0 for tp in assigned)
                # An empty partition may report no lag at all: a second of empty polls with
                # every partition assigned counts as caught up too.
                if at_end or quiet >= QUIET_POLLS:
                    caught_up.set()
                    stats.caught_up = True
                    log.info("caught up with the notification topic", records=stats.records)
