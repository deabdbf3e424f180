"""Topics and the event envelope: building, encoding and strictly decoding Kafka values.

Every record value on a ``huleedu.*`` topic is a binary :class:`EventEnvelope` whose
``event_type`` is the topic its payload belongs on (see :data:`PAYLOAD_TOPICS`). Headers
carry ``event_type``, ``content-type`` and (added by the producer) ``traceparent``.

:func:`decode_envelope` is strict: bytes that do not parse, an envelope with no payload, an
unknown ``event_type`` or one that disagrees with the payload, and a missing ``event_id``
each raise :class:`PoisonMessageError` naming the problem, so consumers can route the record
to the dead-letter topic with a reason instead of crashing or guessing.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TypeAlias

import betterproto2

from common.contracts.huleedu.events import v1 as events_v1
from common.errors import ValidationError

__all__ = [
    "CONTENT_TYPE",
    "DLQ_TOPIC",
    "PAYLOAD_TOPICS",
    "RESULT_TOPICS",
    "EventEnvelope",
    "Payload",
    "PbEnvelope",
    "PoisonMessageError",
    "Topic",
    "decode_envelope",
    "envelope_headers",
    "make_envelope",
    "parse_envelope",
    "payload_of",
]

EventEnvelope: TypeAlias = events_v1.EventEnvelope
Payload: TypeAlias = (
    events_v1.BatchEssaysRegistered
    | events_v1.EssaySlotAssigned
    | events_v1.SpellcheckResult
    | events_v1.AssessmentResultPublished
    | events_v1.BatchPhaseOutcome
    | events_v1.BatchPipelineCompleted
    | events_v1.TeacherNotificationRequested
    | events_v1.SessionRevoked
)


class Topic:
    """Topic names, kept from the existing platform so backend teams recognise them."""

    BATCH_REGISTERED: Final = "huleedu.batch.essays.registered.v1"
    ESSAY_SLOT_ASSIGNED: Final = "huleedu.els.essay.slot.assigned.v1"
    SPELLCHECK_RESULTS: Final = "huleedu.essay.spellcheck.results.v1"
    ASSESSMENT_RESULT: Final = "huleedu.assessment.result.published.v1"
    BATCH_PHASE_OUTCOME: Final = "huleedu.els.batch.phase.outcome.v1"
    PIPELINE_COMPLETED: Final = "huleedu.batch.pipeline.completed.v1"
    TEACHER_NOTIFICATION: Final = "huleedu.notification.teacher.requested.v1"
    SESSION_REVOKED: Final = "huleedu.identity.session.revoked.v1"
    DLQ: Final = "huleedu.dlq.v1"


DLQ_TOPIC: Final = Topic.DLQ
CONTENT_TYPE: Final = "application/x-protobuf; messageType=huleedu.events.v1.EventEnvelope"

#: The oneof field name of each payload -> the topic it is published on (= its event_type).
PAYLOAD_TOPICS: Final[dict[str, str]] = {
    "batch_essays_registered": Topic.BATCH_REGISTERED,
    "essay_slot_assigned": Topic.ESSAY_SLOT_ASSIGNED,
    "spellcheck_result": Topic.SPELLCHECK_RESULTS,
    "assessment_result_published": Topic.ASSESSMENT_RESULT,
    "batch_phase_outcome": Topic.BATCH_PHASE_OUTCOME,
    "batch_pipeline_completed": Topic.PIPELINE_COMPLETED,
    "teacher_notification_requested": Topic.TEACHER_NOTIFICATION,
    "session_revoked": Topic.SESSION_REVOKED,
}
_FIELD_BY_TYPE: Final[dict[type[betterproto2.Message], str]] = {
    events_v1.BatchEssaysRegistered: "batch_essays_registered",
    events_v1.EssaySlotAssigned: "essay_slot_assigned",
    events_v1.SpellcheckResult: "spellcheck_result",
    events_v1.AssessmentResultPublished: "assessment_result_published",
    events_v1.BatchPhaseOutcome: "batch_phase_outcome",
    events_v1.BatchPipelineCompleted: "batch_pipeline_completed",
    events_v1.TeacherNotificationRequested: "teacher_notification_requested",
    events_v1.SessionRevoked: "session_revoked",
}
_EVENT_TYPES: Final = frozenset(PAYLOAD_TOPICS.values())

#: The six topics the result aggregator consumes.
RESULT_TOPICS: Final[tuple[str, ...]] = (
    Topic.BATCH_REGISTERED,
    Topic.ESSAY_SLOT_ASSIGNED,
    Topic.SPELLCHECK_RESULTS,
    Topic.ASSESSMENT_RESULT,
    Topic.BATCH_PHASE_OUTCOME,
    Topic.PIPELINE_COMPLETED,
)


class PoisonMessageError(ValidationError):
    """A record value that can never be processed; ``reason`` is a stable machine name."""

    code = "poison_message"

    def __init__(self, message: str, *, reason: str, field: str | None = None) -> None:
        super().__init__(message, field=field)
        self.reason = reason


def make_envelope(
    payload: Payload,
    *,
    source_service: str,
    user_id: str = "",
    correlation_id: str = "",
    event_id: str | None = None,
    occurred_at: dt.datetime | None = None,
) -> EventEnvelope:
    """Wrap ``payload`` in an envelope whose ``event_type`` is the payload's topic."""
    field = _FIELD_BY_TYPE[type(payload)]
    if occurred_at is not None and occurred_at.tzinfo is None:
        raise ValidationError("occurred_at must be timezone-aware", field="occurred_at")
    envelope = EventEnvelope(
        event_id=event_id or str(uuid.uuid4()),
        event_type=PAYLOAD_TOPICS[field],
        occurred_at=occurred_at or dt.datetime.now(dt.UTC),
        source_service=source_service,
        correlation_id=correlation_id,
        user_id=user_id,
    )
    setattr(envelope, field, payload)
    return envelope


def envelope_headers(envelope: Any) -> list[tuple[str, bytes]]:
    """The Kafka headers every envelope (betterproto2 or upb) travels with (tracing adds
    ``traceparent``)."""
    return [
        ("event_type", envelope.event_type.encode()),
        ("content-type", CONTENT_TYPE.encode()),
        ("event_id", envelope.event_id.encode()),
    ]


def payload_of(envelope: EventEnvelope) -> tuple[str, Payload]:
    """``(oneof field name, payload)`` of an envelope; :class:`PoisonMessageError` if unset."""
    field, value = betterproto2.which_one_of(envelope, "payload")
    if not field or value is None:
        raise PoisonMessageError("envelope has no payload", reason="missing_payload")
    if not isinstance(value, Payload):  # the oneof only holds these types
        raise PoisonMessageError("envelope payload has an unknown type", reason="invalid_envelope")
    return field, value


_PAYLOAD_FIELD_NUMBERS: Final = frozenset(range(10, 18))


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    for _ in range(10):
        if pos >= len(buf):
            raise ValueError("varint runs past the end")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _check_wire(buf: bytes, *, nested: frozenset[int] = frozenset()) -> None:
    """Refuse bytes that are not well-formed protobuf wire format.

    betterproto2's parser is lenient: a truncated value parses into a message with whatever
    fields survived. Walking the tags and length prefixes first catches truncation and junk;
    fields in ``nested`` are messages and are walked too.
    """
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire_type == 0:
            _, pos = _read_varint(buf, pos)
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        elif wire_type == 2:
            length, pos = _read_varint(buf, pos)
            if number in nested:
                _check_wire(buf[pos : pos + length])
            pos += length
        else:
            raise ValueError(f"wire type {wire_type} is not used by proto3")
        if pos > len(buf):
            raise ValueError(f"field {number} runs past the end")


def _validate(
    event_id: str, event_type: str, field: str | None, expected_topics: Sequence[str]
) -> None:
    """The envelope rules both decoders enforce (see the module docstring)."""
    if not event_id:
        raise PoisonMessageError(
            "envelope has no event_id", reason="invalid_envelope", field="event_id"
        )
    if event_type not in _EVENT_TYPES:
        raise PoisonMessageError(
            f"unknown event_type {event_type[:200]!r}",
            reason="unknown_event_type",
            field="event_type",
        )
    if not field:
        raise PoisonMessageError("envelope has no payload", reason="missing_payload")
    if PAYLOAD_TOPICS[field] != event_type:
        raise PoisonMessageError(
            f"event_type {event_type!r} does not match payload {field!r}",
            reason="event_type_mismatch",
            field="event_type",
        )
    if expected_topics and event_type not in expected_topics:
        raise PoisonMessageError(
            f"event_type {event_type!r} is not consumed here",
            reason="unexpected_event_type",
            field="event_type",
        )


def _load_pb_envelope() -> Any:
    """The EventEnvelope class of protobuf's C (upb) runtime, from the committed descriptors."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    data = (Path(__file__).parent / "contracts" / "descriptors.binpb").read_bytes()
    pool = descriptor_pool.DescriptorPool()
    for proto in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("huleedu.events.v1.EventEnvelope")
    )


#: EventEnvelope on protobuf's upb runtime: about 70x faster to parse and 200x faster to
#: serialise than the betterproto2 class; same field names, enums as ints, and
#: ``WhichOneof("payload")`` instead of ``betterproto2.which_one_of``. For hot paths.
PbEnvelope: Any = _load_pb_envelope()


def parse_envelope(value: bytes, *, expected_topics: Sequence[str] = ()) -> Any:
    """:func:`decode_envelope` for hot paths: returns a :data:`PbEnvelope` (upb) message.

    upb rejects truncated and malformed wire data itself; the envelope rules are the same.
    """
    from google.protobuf.message import DecodeError

    try:
        envelope = PbEnvelope.FromString(value)
    except DecodeError as exc:
        raise PoisonMessageError(
            f"value is not a protobuf EventEnvelope: {type(exc).__name__}", reason="undecodable"
        ) from None
    _validate(
        envelope.event_id, envelope.event_type, envelope.WhichOneof("payload"), expected_topics
    )
    return envelope


def decode_envelope(value: bytes, *, expected_topics: Sequence[str] = ()) -> EventEnvelope:
    """Parse a record value strictly (see the module docstring for what is refused).

    ``expected_topics``, when given, lists the event types the caller accepts; any other is
    refused with reason ``unexpected_event_type``.
    """
    try:
        _check_wire(value, nested=_PAYLOAD_FIELD_NUMBERS)
        envelope = EventEnvelope.parse(value)
    except Exception as exc:  # betterproto2 raises assorted errors on junk bytes
        raise PoisonMessageError(
            f"value is not a protobuf EventEnvelope: {type(exc).__name__}",
            reason="undecodable",
        ) from None
    field, _ = betterproto2.which_one_of(envelope, "payload")
    _validate(envelope.event_id, envelope.event_type, field or None, expected_topics)
    return envelope
