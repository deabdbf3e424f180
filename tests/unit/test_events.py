from __future__ import annotations

import datetime as dt

import pytest

from common.contracts.huleedu.events import v1 as ev
from common.errors import ValidationError
from common.events import (
    PAYLOAD_TOPICS,
    RESULT_TOPICS,
    EventEnvelope,
    PoisonMessageError,
    Topic,
    decode_envelope,
    envelope_headers,
    make_envelope,
    parse_envelope,
    payload_of,
)


def _spellcheck() -> ev.SpellcheckResult:
    return ev.SpellcheckResult(
        batch_id="b1", essay_id="e1", outcome=ev.EssayPhaseOutcome.SUCCEEDED, corrections_count=4
    )


def test_envelope_round_trip_keeps_every_field() -> None:
    at = dt.datetime(2026, 12, 6, 10, 0, tzinfo=dt.UTC)
    env = make_envelope(
        _spellcheck(),
        source_service="spellchecker",
        user_id="u1",
        correlation_id="c1",
        event_id="ev-1",
        occurred_at=at,
    )
    back = decode_envelope(bytes(env))
    assert back.event_type == Topic.SPELLCHECK_RESULTS
    assert (back.event_id, back.user_id, back.correlation_id) == ("ev-1", "u1", "c1")
    assert back.occurred_at == at
    field, payload = payload_of(back)
    assert field == "spellcheck_result"
    assert payload == _spellcheck()


def test_every_payload_has_a_topic_and_results_topics_are_the_six() -> None:
    oneof_fields = {f for f in EventEnvelope.__dataclass_fields__ if f in PAYLOAD_TOPICS}
    assert oneof_fields == set(PAYLOAD_TOPICS)
    assert len(RESULT_TOPICS) == 6 and Topic.TEACHER_NOTIFICATION not in RESULT_TOPICS


def test_headers_name_event_type_and_content_type() -> None:
    env = make_envelope(_spellcheck(), source_service="s")
    headers = dict(envelope_headers(env))
    assert headers["event_type"] == Topic.SPELLCHECK_RESULTS.encode()
    assert headers["content-type"].startswith(b"application/x-protobuf")
    assert headers["event_id"] == env.event_id.encode()


def test_naive_timestamp_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as info:
        make_envelope(_spellcheck(), source_service="s", occurred_at=dt.datetime(2026, 1, 1))
    assert info.value.field == "occurred_at"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"\xff\xff\xff\xff", "undecodable"),
        (b"\x0a\x05abc", "undecodable"),  # truncated length-delimited field
        (b"\x0b\x0c", "undecodable"),  # group wire types are not proto3
        (b"\x0a\x01x\x82\x01\x05\x0a\x09ab", "undecodable"),  # truncated inside the payload
        (b"", "invalid_envelope"),
        (
            bytes(EventEnvelope(event_id="x", event_type=Topic.SPELLCHECK_RESULTS)),
            "missing_payload",
        ),
        (
            bytes(
                EventEnvelope(
                    event_type=Topic.SPELLCHECK_RESULTS, spellcheck_result=ev.SpellcheckResult()
                )
            ),
            "invalid_envelope",
        ),
        (
            bytes(
                EventEnvelope(
                    event_id="x",
                    event_type="huleedu.bogus.v1",
                    spellcheck_result=ev.SpellcheckResult(),
                )
            ),
            "unknown_event_type",
        ),
        (
            bytes(
                EventEnvelope(
                    event_id="x",
                    event_type=Topic.ASSESSMENT_RESULT,
                    spellcheck_result=ev.SpellcheckResult(),
                )
            ),
            "event_type_mismatch",
        ),
    ],
)
def test_poison_values_are_refused_with_a_reason(value: bytes, reason: str) -> None:
    with pytest.raises(PoisonMessageError) as info:
        decode_envelope(value)
    assert info.value.reason == reason, info.value


def test_truncating_a_valid_envelope_anywhere_is_detected() -> None:
    # The payload is the last field on the wire, so every proper prefix either lacks it or
    # cuts it short: all must be refused.
    value = bytes(make_envelope(_spellcheck(), source_service="spellchecker", user_id="u1"))
    accepted = []
    for cut in range(len(value)):
        try:
            decode_envelope(value[:cut])
        except PoisonMessageError:
            continue
        accepted.append(cut)
    assert not accepted, f"truncated envelopes accepted at byte counts {accepted}"


def test_unexpected_event_type_is_refused_when_topics_given() -> None:
    env = make_envelope(ev.SessionRevoked(user_id="u", session_id="s"), source_service="gw")
    with pytest.raises(PoisonMessageError) as info:
        decode_envelope(bytes(env), expected_topics=RESULT_TOPICS)
    assert info.value.reason == "unexpected_event_type"


@pytest.mark.parametrize(
    "value",
    [
        b"\xff\xff\xff\xff",
        b"\x0a\x05abc",
        b"",
        bytes(EventEnvelope(event_id="x", event_type=Topic.SPELLCHECK_RESULTS)),
        bytes(
            EventEnvelope(
                event_id="x",
                event_type=Topic.ASSESSMENT_RESULT,
                spellcheck_result=ev.SpellcheckResult(),
            )
        ),
    ],
)
def test_both_decoders_refuse_the_same_values_for_the_same_reason(value: bytes) -> None:
    reasons = []
    for decode in (decode_envelope, parse_envelope):
        with pytest.raises(PoisonMessageError) as info:
            decode(value)
        reasons.append(info.value.reason)
    assert reasons[0] == reasons[1], reasons


def test_the_upb_envelope_reads_what_betterproto_wrote_and_back() -> None:
    env = make_envelope(_spellcheck(), source_service="s", user_id="u1", event_id="e-1")
    pb = parse_envelope(bytes(env))
    assert pb.WhichOneof("payload") == "spellcheck_result"
    assert (pb.event_id, pb.user_id, pb.spellcheck_result.corrections_count) == ("e-1", "u1", 4)
    assert pb.spellcheck_result.outcome == ev.EssayPhaseOutcome.SUCCEEDED
    assert decode_envelope(pb.SerializeToString()) == env
