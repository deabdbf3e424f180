"""The sans-IO wire protocol of ``/v1/ws``: client-frame parsing, server frames, the filter
and the close-code table (with PROTOCOL.md kept in sync)."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.contracts.huleedu.events import v1 as events_v1
from common.errors import WsCloseCode
from wsmanager import protocol as p
from wsmanager.protocol import (
    CATEGORIES,
    CLOSE_CODES,
    EVERYTHING,
    Auth,
    Filter,
    Ping,
    Pong,
    ProtocolError,
    Refresh,
    Subscribe,
    Unsubscribe,
)

PROTOCOL_MD = Path(p.__file__).with_name("PROTOCOL.md")
MAX = p.DEFAULT_MAX_FRAME_BYTES


def parse(obj: object, max_bytes: int = MAX) -> p.ClientFrame:
    return p.parse_client_frame(json.dumps(obj), max_bytes=max_bytes)


def refused(text: str, max_bytes: int = MAX) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        p.parse_client_frame(text, max_bytes=max_bytes)
    return info.value


# -- client frames: valid ----------------------------------------------------------------------


def test_auth_and_refresh_frames_carry_the_token():
    assert parse({"type": "auth", "token": "a.b.c"}) == Auth("a.b.c")
    assert parse({"type": "refresh", "token": "x" * p.MAX_TOKEN_CHARS}) == Refresh(
        "x" * p.MAX_TOKEN_CHARS
    )


def test_subscribe_and_unsubscribe_frames_collect_sets():
    frame = parse(
        {
            "type": "subscribe",
            "batch_ids": ["b1", "B_2-x", "b1"],
            "categories": ["batch_progress", "system_alerts"],
        }
    )
    assert frame == Subscribe(
        frozenset({"b1", "B_2-x"}), frozenset({"batch_progress", "system_alerts"})
    )
    assert parse({"type": "subscribe"}) == Subscribe()
    assert parse({"type": "subscribe", "batch_ids": None, "categories": []}) == Subscribe()
    assert parse({"type": "unsubscribe", "categories": ["file_operations"]}) == Unsubscribe(
        categories=frozenset({"file_operations"})
    )
    assert parse({"type": "subscribe", "batch_ids": ["a" * 64]}) == Subscribe(frozenset({"a" * 64}))
    hundred = [f"b{i}" for i in range(p.MAX_BATCH_IDS)]
    assert parse({"type": "subscribe", "batch_ids": hundred}) == Subscribe(frozenset(hundred))


def test_ping_and_pong_nonce_is_optional():
    assert parse({"type": "pong"}) == Pong(None)
    assert parse({"type": "pong", "nonce": "abc"}) == Pong("abc")
    assert parse({"type": "ping"}) == Ping(None)
    assert parse({"type": "ping", "nonce": None}) == Ping(None)
    assert parse({"type": "ping", "nonce": "n-1"}) == Ping("n-1")


def test_whitespace_and_key_order_do_not_matter():
    assert p.parse_client_frame(' \n{ "token" : "t" , "type" : "auth" }\t') == Auth("t")


def test_categories_are_the_contract_enum_names():
    assert {
        "batch_progress",
        "processing_results",
        "file_operations",
        "class_management",
        "student_workflow",
        "system_alerts",
    } == CATEGORIES
    assert p.category_name(events_v1.NotificationCategory.SYSTEM_ALERTS) == "system_alerts"
    assert p.category_name(0) == "unspecified"
    assert p.category_name(99) == "unspecified"


# -- client frames: invalid --------------------------------------------------------------------

INVALID: list[tuple[str, WsCloseCode, str]] = [
    # (frame text, close code, the reason must start with this)
    ("", WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ("not json", WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ('{"type":"ping"', WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ('{"type":"ping"} {}', WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ('{"type":"ping","nonce":NaN}', WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ('{"type":"ping","nonce":' + "1" * 5000 + "}", WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ("[" * 50_000, WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ('[{"type":"ping"}]', WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ('"ping"', WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ("null", WsCloseCode.INVALID_PAYLOAD, "frame:"),
    ("{}", WsCloseCode.INVALID_PAYLOAD, "type:"),
    ('{"token":"t"}', WsCloseCode.INVALID_PAYLOAD, "type:"),
    ('{"type":1}', WsCloseCode.INVALID_PAYLOAD, "type:"),
    ('{"type":null}', WsCloseCode.INVALID_PAYLOAD, "type:"),
    ('{"type":"hello"}', WsCloseCode.INVALID_PAYLOAD, "type:"),
    ('{"type":"AUTH","token":"t"}', WsCloseCode.INVALID_PAYLOAD, "type:"),
    ('{"type":"ping","type":"auth","token":"t"}', WsCloseCode.INVALID_PAYLOAD, "type:"),
    ('{"type":"auth"}', WsCloseCode.INVALID_PAYLOAD, "token:"),
    ('{"type":"auth","token":""}', WsCloseCode.INVALID_PAYLOAD, "token:"),
    ('{"type":"auth","token":null}', WsCloseCode.INVALID_PAYLOAD, "token:"),
    ('{"type":"auth","token":42}', WsCloseCode.INVALID_PAYLOAD, "token:"),
    ('{"type":"auth","token":["t"]}', WsCloseCode.INVALID_PAYLOAD, "token:"),
    ('{"type":"refresh"}', WsCloseCode.INVALID_PAYLOAD, "token:"),
    (
        json.dumps({"type": "auth", "token": "x" * (p.MAX_TOKEN_CHARS + 1)}),
        WsCloseCode.INVALID_PAYLOAD,
        "token:",
    ),
    ('{"type":"auth","token":"t","since":"e:1"}', WsCloseCode.INVALID_PAYLOAD, "since:"),
    ('{"type":"ping","extra":1}', WsCloseCode.INVALID_PAYLOAD, "extra:"),
    ('{"type":"ping","nonce":5}', WsCloseCode.INVALID_PAYLOAD, "nonce:"),
    ('{"type":"pong","nonce":["n"]}', WsCloseCode.INVALID_PAYLOAD, "nonce:"),
    ('{"type":"pong","token":"t"}', WsCloseCode.INVALID_PAYLOAD, "token:"),
    (
        json.dumps({"type": "ping", "nonce": "n" * (p.MAX_NONCE_CHARS + 1)}),
        WsCloseCode.INVALID_PAYLOAD,
        "nonce:",
    ),
    ('{"type":"subscribe","batch_ids":"b1"}', WsCloseCode.INVALID_PAYLOAD, "batch_ids:"),
    ('{"type":"subscribe","batch_ids":{"b1":true}}', WsCloseCode.INVALID_PAYLOAD, "batch_ids:"),
    ('{"type":"subscribe","batch_ids":["ok",7]}', WsCloseCode.INVALID_PAYLOAD, "batch_ids[1]:"),
    ('{"type":"subscribe","batch_ids":[""]}', WsCloseCode.INVALID_PAYLOAD, "batch_ids[0]:"),
    ('{"type":"subscribe","batch_ids":["_b"]}', WsCloseCode.INVALID_PAYLOAD, "batch_ids[0]:"),
    ('{"type":"subscribe","batch_ids":["b 1"]}', WsCloseCode.INVALID_PAYLOAD, "batch_ids[0]:"),
    ('{"type":"subscribe","batch_ids":["b1\\n"]}', WsCloseCode.INVALID_PAYLOAD, "batch_ids[0]:"),
    ('{"type":"subscribe","batch_ids":["b/1"]}', WsCloseCode.INVALID_PAYLOAD, "batch_ids[0]:"),
    ('{"type":"subscribe","batch_ids":["ä"]}', WsCloseCode.INVALID_PAYLOAD, "batch_ids[0]:"),
    (
        json.dumps({"type": "subscribe", "batch_ids": ["a" * 65]}),
        WsCloseCode.INVALID_PAYLOAD,
        "batch_ids[0]:",
    ),
    (
        json.dumps({"type": "subscribe", "batch_ids": [f"b{i}" for i in range(101)]}),
        WsCloseCode.INVALID_PAYLOAD,
        "batch_ids:",
    ),
    ('{"type":"subscribe","categories":["grades"]}', WsCloseCode.INVALID_PAYLOAD, "categories[0]:"),
    (
        '{"type":"subscribe","categories":["batch_progress","BATCH_PROGRESS"]}',
        WsCloseCode.INVALID_PAYLOAD,
        "categories[1]:",
    ),
    (
        '{"type":"subscribe","categories":["notification_category_batch_progress"]}',
        WsCloseCode.INVALID_PAYLOAD,
        "categories[0]:",
    ),
    (
        '{"type":"subscribe","categories":["unspecified"]}',
        WsCloseCode.INVALID_PAYLOAD,
        "categories[0]:",
    ),
    (
        '{"type":"subscribe","categories":"batch_progress"}',
        WsCloseCode.INVALID_PAYLOAD,
        "categories:",
    ),
    ('{"type":"unsubscribe"}', WsCloseCode.INVALID_PAYLOAD, "batch_ids:"),
    (
        '{"type":"unsubscribe","batch_ids":[],"categories":[]}',
        WsCloseCode.INVALID_PAYLOAD,
        "batch_ids:",
    ),
]


@pytest.mark.parametrize(("text", "code", "field"), INVALID)
def test_invalid_frames_close_with_a_reason_naming_the_field(text, code, field):
    error = refused(text)
    assert error.code == code, f"{text[:60]!r}: expected {code!r}, got {error!r}"
    assert error.reason.startswith(field), f"{text[:60]!r}: reason {error.reason!r}"
    assert len(error.reason.encode()) <= p.MAX_CLOSE_REASON_BYTES


def test_oversize_frames_close_with_1009_counting_utf8_bytes():
    frame = json.dumps({"type": "ping", "nonce": "x"})
    assert p.parse_client_frame(frame, max_bytes=len(frame)) == Ping("x")
    error = refused(frame, max_bytes=len(frame) - 1)
    assert error.code == WsCloseCode.MESSAGE_TOO_BIG
    # 100 characters but 300 UTF-8 bytes: over a 200-byte limit even though len() is not.
    wide = '{"type":"ping","nonce":"' + "€" * 100 + '"}'
    assert len(wide) < 200 < len(wide.encode())
    assert refused(wide, max_bytes=200).code == WsCloseCode.MESSAGE_TOO_BIG
    # Size is checked before parsing: junk over the limit is "too big", not "invalid".
    assert refused("x" * (MAX + 1)).code == WsCloseCode.MESSAGE_TOO_BIG


def test_binary_frames_close_with_1003():
    with pytest.raises(ProtocolError) as info:
        p.parse_message(b'{"type":"ping"}')
    assert info.value.code == WsCloseCode.UNSUPPORTED_DATA
    assert info.value.reason == p.BINARY_FRAME_REASON
    assert p.binary_frame_error().code == WsCloseCode.UNSUPPORTED_DATA
    assert p.parse_message('{"type":"ping"}') == Ping()


def test_unknown_field_names_are_cut_to_fit_a_close_frame():
    error = refused(json.dumps({"type": "ping", "é" * 500: 1}))
    assert error.code == WsCloseCode.INVALID_PAYLOAD
    assert len(error.reason.encode()) <= p.MAX_CLOSE_REASON_BYTES
    assert error.reason.startswith("é")


def test_first_frame_must_be_auth():
    assert p.require_auth(Auth("t")) == Auth("t")
    for frame in (Ping(), Pong(), Refresh("t"), Subscribe()):
        with pytest.raises(ProtocolError) as info:
            p.require_auth(frame)
        assert info.value.code == WsCloseCode.AUTH_FAILED


@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_protocol_error(text):
    outcome = outcome_of(text, max_bytes=256)
    if isinstance(outcome, ProtocolError):
        assert outcome.code in (WsCloseCode.INVALID_PAYLOAD, WsCloseCode.MESSAGE_TOO_BIG)
    else:
        assert isinstance(outcome, (Auth, Refresh, Subscribe, Unsubscribe, Ping, Pong))


def outcome_of(text: str, max_bytes: int = MAX) -> p.ClientFrame | ProtocolError:
    """The frame, or the ProtocolError; any other exception escapes and fails the test."""
    try:
        return p.parse_client_frame(text, max_bytes=max_bytes)
    except ProtocolError as error:
        return error


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


@given(
    st.dictionaries(
        st.sampled_from(["type", "token", "batch_ids", "categories", "nonce", "x"]),
        _json_values
        | st.sampled_from(["auth", "refresh", "subscribe", "unsubscribe", "ping"])
        | st.lists(st.sampled_from(["b1", "batch_progress", "", "x y"]), max_size=3),
    )
)
def test_arbitrary_json_objects_raise_only_protocol_error(obj):
    outcome = outcome_of(json.dumps(obj))
    if isinstance(outcome, ProtocolError):
        assert outcome.code == WsCloseCode.INVALID_PAYLOAD
        assert outcome.reason.split(":")[0], outcome.reason
    else:
        assert isinstance(outcome, (Auth, Refresh, Subscribe, Unsubscribe, Ping, Pong))


# -- since ---------------------------------------------------------------------------------------


def test_since_splits_at_the_last_colon():
    point = p.parse_since("huleedu.notification.teacher.requested.v1/3:1841")
    assert point == p.ResumePoint("huleedu.notification.teacher.requested.v1/3", 1841)
    assert str(point) == "huleedu.notification.teacher.requested.v1/3:1841"
    assert p.parse_since("a:b:0") == p.ResumePoint("a:b", 0)


@pytest.mark.parametrize(
    "value",
    ["", "1841", ":5", "e:", "e:-1", "e:+1", "e:1.5", "e: 1", "e:1e3", "e:" + "9" * 20, "é:1"],
)
def test_malformed_since_is_refused(value):
    with pytest.raises(ProtocolError) as info:
        p.parse_since(value)
    assert info.value.code == WsCloseCode.INVALID_PAYLOAD
    assert info.value.reason.startswith("since:")


# -- server frames -----------------------------------------------------------------------------

EXPIRES = dt.datetime(2025, 5, 1, 12, 15, tzinfo=dt.UTC)


def test_welcome_round_trips_with_and_without_resume():
    frame = p.welcome(connection_id="c1", user_id="u1", expires_at=EXPIRES)
    assert json.loads(frame) == {
        "type": "welcome",
        "connection_id": "c1",
        "user_id": "u1",
        "expires_at": "2025-05-01T12:15:00Z",
        "resume": None,
    }
    assert " " not in frame

    class Resume:
        recovered = True
        replayed = 3

    as_object = p.welcome(
        connection_id="c1", user_id="u1", expires_at=EXPIRES.timestamp(), resume=Resume()
    )
    as_dict = p.welcome(
        connection_id="c1",
        user_id="u1",
        expires_at=EXPIRES,
        resume={"recovered": True, "replayed": 3},
    )
    assert as_object == as_dict
    assert json.loads(as_dict)["resume"] == {"recovered": True, "replayed": 3}


def test_small_server_frames_round_trip():
    assert json.loads(p.pong("n")) == {"type": "pong", "nonce": "n"}
    assert json.loads(p.pong(None)) == {"type": "pong", "nonce": None}
    assert json.loads(p.server_ping("9f86")) == {"type": "ping", "nonce": "9f86"}
    assert json.loads(p.refreshed(EXPIRES)) == {
        "type": "refreshed",
        "expires_at": "2025-05-01T12:15:00Z",
    }
    assert json.loads(p.error(p.ErrorCode.USER_MISMATCH, "another user")) == {
        "type": "error",
        "code": "user_mismatch",
        "message": "another user",
    }


def test_subscribed_frame_reports_the_effective_filter():
    f = EVERYTHING.subscribe(Subscribe(frozenset({"b2", "b1"})))
    f = f.unsubscribe(Unsubscribe(categories=frozenset({"system_alerts"})))
    assert json.loads(p.subscribed(f)) == {
        "type": "subscribed",
        "batch_ids": ["b1", "b2"],
        "excluded_batch_ids": [],
        "categories": None,
        "excluded_categories": ["system_alerts"],
    }


def test_rfc3339():
    assert p.rfc3339(dt.datetime(2025, 5, 1, 12, 0, 0, 418000, tzinfo=dt.UTC)) == (
        "2025-05-01T12:00:00.418000Z"
    )
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert p.rfc3339(dt.datetime(2025, 5, 1, 14, 0, tzinfo=plus2)) == "2025-05-01T12:00:00Z"
    assert p.rfc3339(dt.datetime(2025, 5, 1, 12, 0)) == "2025-05-01T12:00:00Z"
    assert p.rfc3339(0) == "1970-01-01T00:00:00Z"


OCCURRED = dt.datetime(2025, 5, 1, 12, 3, 7, 418000, tzinfo=dt.UTC)


def event(payload_json, **overrides):
    fields = {
        "offset": 1841,
        "epoch": "huleedu.notification.teacher.requested.v1/3",
        "event_id": "8f14e45f",
        "event_type": "batch_status_changed",
        "occurred_at": OCCURRED,
        "batch_id": "b1",
        "category": "batch_progress",
        "payload_json": payload_json,
    }
    fields.update(overrides)
    return p.encode_event(**fields)


EXPECTED_HEAD = {
    "type": "event",
    "offset": 1841,
    "epoch": "huleedu.notification.teacher.requested.v1/3",
    "event_id": "8f14e45f",
    "event_type": "batch_status_changed",
    "occurred_at": "2025-05-01T12:03:07.418000Z",
    "batch_id": "b1",
    "category": "batch_progress",
}


def test_encode_event_splices_a_json_object_payload_verbatim():
    payload = '  {"status": "processing", "n": [1, 2.5, null], "ü": "\\u00fc"}\n'
    frame = event(payload)
    assert json.loads(frame) == {**EXPECTED_HEAD, "data": json.loads(payload)}
    assert frame.endswith(',"data":{"status": "processing", "n": [1, 2.5, null], "ü": "\\u00fc"}}')
    assert list(json.loads(frame)) == [*EXPECTED_HEAD, "data"]
    assert not p.has_invalid_data(frame)


def test_encode_event_accepts_a_parsed_mapping():
    frame = event({"status": "done", "n": 3})
    assert json.loads(frame) == {**EXPECTED_HEAD, "data": {"status": "done", "n": 3}}
    assert not p.has_invalid_data(frame)


def test_encode_event_empty_payload_is_an_empty_object():
    frame = event("")
    assert json.loads(frame) == {**EXPECTED_HEAD, "data": {}}
    assert not p.has_invalid_data(frame)


@pytest.mark.parametrize(
    "payload",
    [
        "[1,2]",
        '"text"',
        "42",
        "null",
        "not json",
        '{"a":1',
        '{"a":1},"event_id":"forged"',
        '{"a":1} {"b":2}',
        '{"a":NaN}',
        '{"a":Infinity}',
        "{" + '"a":' * 1 + "[" * 100_000 + "]" * 100_000 + "}",
        '{"a":"\x01"}',
    ],
)
def test_encode_event_replaces_a_payload_that_is_not_one_json_object(payload):
    frame = event(payload)
    assert json.loads(frame) == {**EXPECTED_HEAD, "data": {}, "data_invalid": True}
    assert p.has_invalid_data(frame)


def test_encode_event_escapes_fields_and_sends_empty_batch_as_null():
    frame = event("{}", event_id='id"with\\quotes\n', batch_id="", category="system_alerts")
    decoded = json.loads(frame)
    assert decoded["event_id"] == 'id"with\\quotes\n'
    assert decoded["batch_id"] is None
    assert decoded["category"] == "system_alerts"
    assert json.loads(event("{}", batch_id=None))["batch_id"] is None


def test_encode_event_refuses_a_non_int_offset():
    with pytest.raises(TypeError):
        event("{}", offset="1")
    with pytest.raises(TypeError):
        event("{}", offset=True)


@given(
    st.dictionaries(st.text(max_size=10), _json_values, max_size=5),
    st.text(max_size=30),
    st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,10}", fullmatch=True)),
)
def test_encode_event_round_trips_any_object(data, event_id, batch_id):
    text = json.dumps(data)
    if "NaN" in text or "Infinity" in text:
        return  # not JSON; covered by the invalid-payload test
    frame = event(text, event_id=event_id, batch_id=batch_id)
    decoded = json.loads(frame)
    assert decoded["data"] == json.loads(text)
    assert decoded["event_id"] == event_id
    assert decoded["batch_id"] == batch_id
    assert "data_invalid" not in decoded


# -- the filter --------------------------------------------------------------------------------


def sub(batches=(), categories=()):
    return Subscribe(frozenset(batches), frozenset(categories))


def unsub(batches=(), categories=()):
    return Unsubscribe(frozenset(batches), frozenset(categories))


def delivered(f: Filter) -> set[tuple[str | None, str]]:
    """Which of a fixed grid of (batch, category) events pass ``f``."""
    return {
        (b, c)
        for b in ("A", "B", "C", None)
        for c in ("batch_progress", "system_alerts", "file_operations")
        if f.matches(b, c)
    }


ALL = delivered(EVERYTHING)


def test_default_filter_passes_everything():
    assert len(ALL) == 12
    assert EVERYTHING.matches("", "unspecified")


def test_the_documented_example_sequence():
    f = EVERYTHING.subscribe(sub(["A"]))
    assert delivered(f) == {(b, c) for b, c in ALL if b in ("A", None)}
    f = f.subscribe(sub(["B"]))
    assert delivered(f) == {(b, c) for b, c in ALL if b in ("A", "B", None)}
    f = f.subscribe(sub(categories=["batch_progress"]))
    assert delivered(f) == {
        ("A", "batch_progress"),
        ("B", "batch_progress"),
        (None, "batch_progress"),
    }
    f = f.unsubscribe(unsub(["A"]))
    assert delivered(f) == {("B", "batch_progress"), (None, "batch_progress")}
    assert f.subscribe(sub()) is EVERYTHING
    muted = EVERYTHING.unsubscribe(unsub(categories=["system_alerts"]))
    assert delivered(muted) == {(b, c) for b, c in ALL if c != "system_alerts"}


def test_unsubscribe_from_everything_excludes_and_subscribe_then_replaces_exclusions():
    f = EVERYTHING.unsubscribe(unsub(["A"]))
    assert f.batch_ids is None and f.excluded_batch_ids == {"A"}
    assert delivered(f) == {(b, c) for b, c in ALL if b != "A"}
    f = f.subscribe(sub(["B"]))
    assert f.batch_ids == {"B"} and f.excluded_batch_ids == frozenset()
    assert delivered(f) == {(b, c) for b, c in ALL if b in ("B", None)}


def test_removing_the_last_allowed_batch_leaves_only_batchless_events():
    f = EVERYTHING.subscribe(sub(["A"])).unsubscribe(unsub(["A"]))
    assert f.batch_ids == frozenset()
    assert delivered(f) == {(b, c) for b, c in ALL if b is None}


def test_apply_dispatches_on_frame_type_and_filters_are_immutable():
    f = EVERYTHING.apply(sub(["A"]))
    assert EVERYTHING.batch_ids is None, "EVERYTHING is shared and must never change"
    assert f.apply(unsub(["A"])).batch_ids == frozenset()


def test_filter_size_is_bounded():
    f = EVERYTHING
    for i in range(p.MAX_FILTER_BATCH_IDS):
        f = f.subscribe(sub([f"b{i}"]))
    with pytest.raises(ProtocolError) as info:
        f.subscribe(sub(["one-more"]))
    assert info.value.code == WsCloseCode.POLICY_VIOLATION
    assert info.value.reason.startswith("batch_ids:")
    excluded = EVERYTHING.unsubscribe(unsub([f"b{i}" for i in range(p.MAX_FILTER_BATCH_IDS)]))
    with pytest.raises(ProtocolError):
        excluded.unsubscribe(unsub(["one-more"]))


@given(
    st.lists(
        st.tuples(
            st.booleans(),
            st.frozensets(st.sampled_from("ABCD"), max_size=3),
            st.frozensets(st.sampled_from(sorted(CATEGORIES)), max_size=3),
        ),
        max_size=8,
    )
)
def test_filter_matches_a_reference_model(ops):
    """Against a set-based model of the documented rules, over the whole event space."""
    universe_b = set("ABCDE")
    universe_c = set(CATEGORIES) | {"unspecified"}
    allowed_b, allowed_c = set(universe_b), set(universe_c)
    narrowed_b = narrowed_c = False
    f = EVERYTHING
    for is_sub, batches, categories in ops:
        if is_sub:
            if not batches and not categories:
                allowed_b, allowed_c, narrowed_b, narrowed_c = (
                    set(universe_b),
                    set(universe_c),
                    False,
                    False,
                )
                f = f.subscribe(Subscribe(batches, categories))
                continue
            if batches:
                allowed_b = (allowed_b if narrowed_b else set()) | batches
                narrowed_b = True
            if categories:
                allowed_c = (allowed_c if narrowed_c else set()) | categories
                narrowed_c = True
            f = f.subscribe(Subscribe(batches, categories))
        elif batches or categories:
            allowed_b -= batches
            allowed_c -= categories
            f = f.unsubscribe(Unsubscribe(batches, categories))
    for b in universe_b:
        for c in universe_c:
            assert f.matches(b, c) == (b in allowed_b and c in allowed_c), (b, c, f)
    for c in universe_c:
        assert f.matches(None, c) == (c in allowed_c)


# -- close codes and the document -----------------------------------------------------------------


def test_every_close_code_is_in_the_table():
    assert set(CLOSE_CODES) == set(WsCloseCode)
    for code, info in CLOSE_CODES.items():
        assert info.reason and info.when, code
        assert len(info.reason.encode()) <= p.MAX_CLOSE_REASON_BYTES, code
        assert p.close_reason(code) == info.reason


def test_protocol_md_holds_the_generated_close_code_table():
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    match = re.search(r"<!-- close-codes:begin[^>]*-->\n(.*?)<!-- close-codes:end -->", text, re.S)
    assert match, "PROTOCOL.md lost its close-codes markers"
    expected = p.close_code_table_markdown()
    assert match.group(1) == expected, (
        "PROTOCOL.md's close-code table is stale; replace it with:\n" + expected
    )
    for code in WsCloseCode:
        assert f"| {int(code)} | `{code.name}` |" in match.group(1)


def test_protocol_md_documents_every_frame_error_code_and_category():
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    for frame_type in ("auth", "refresh", "subscribe", "unsubscribe", "ping", "pong"):
        assert f'"type": "{frame_type}"' in text, frame_type
    for frame_type in ("welcome", "event", "pong", "ping", "refreshed", "subscribed", "error"):
        assert f'{{"type":"{frame_type}"' in text, frame_type
    for code in p.ErrorCode:
        assert f"| `{code}` |" in text, code
    for category in CATEGORIES:
        assert f"`{category}`" in text, category
    for example in re.findall(r"^(\{\"type\".*\})$", text, re.M):
        json.loads(example)  # every one-line example is valid JSON


def test_protocol_md_examples_of_client_frames_parse():
    text = PROTOCOL_MD.read_text(encoding="utf-8")
    for example in re.findall(r'^(\{"type": .*\})$', text, re.M):
        assert p.parse_client_frame(example), example
