from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from common import correlation
from common.logs import REDACTED, configure_logging, get_logger

JWT = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlX2J5dGVz"


@pytest.fixture
def output() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(service="testsvc", level="debug", json=True, stream=stream)
    yield stream
    for handler in [h for h in logging.getLogger().handlers if getattr(h, "_huleedu", False)]:
        logging.getLogger().removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_json_lines_carry_the_standard_fields(output: io.StringIO) -> None:
    get_logger("huleedu.test").info("batch registered", batch_id="b1")
    (line,) = lines(output)
    assert line["event"] == "batch registered"
    assert line["batch_id"] == "b1"
    assert line["level"] == "info"
    assert line["logger"] == "huleedu.test"
    assert line["service"] == "testsvc"
    assert str(line["timestamp"]).endswith("Z")


def test_correlation_and_trace_ids_come_from_context(output: io.StringIO) -> None:
    tracer = TracerProvider().get_tracer("t")
    with correlation.bind_correlation_id("cid-9"), tracer.start_as_current_span("s") as span:
        get_logger("x").info("inside")
    get_logger("x").info("outside")
    inside, outside = lines(output)
    ctx = span.get_span_context()
    assert inside["correlation_id"] == "cid-9"
    assert inside["trace_id"] == format(ctx.trace_id, "032x")
    assert inside["span_id"] == format(ctx.span_id, "016x")
    assert "correlation_id" not in outside and "trace_id" not in outside


def test_secrets_are_redacted_by_key_nested_and_inside_strings(output: io.StringIO) -> None:
    get_logger("x").info(
        f"login with Bearer {JWT} done",
        password="hunter2",
        request={"headers": {"Authorization": "Bearer abc.def"}, "refresh_token": "r-123"},
        note=f"token was {JWT}",
        ticket_count=3,
    )
    text = output.getvalue()
    for secret in ("hunter2", JWT, "abc.def", "r-123"):
        assert secret not in text, secret
    (line,) = lines(output)
    assert line["password"] == REDACTED
    assert line["request"] == {"headers": {"Authorization": REDACTED}, "refresh_token": REDACTED}
    assert line["ticket_count"] == 3  # counts are not secrets


def test_stdlib_loggers_come_out_as_json_too(output: io.StringIO) -> None:
    with correlation.bind_correlation_id("cid-std"):
        logging.getLogger("grpclib.server").warning("password=%s", "hunter2")
        logging.getLogger("rdkafka").error("broker down, token %s", JWT)
    first, second = lines(output)
    assert first["logger"] == "grpclib.server"
    assert first["correlation_id"] == "cid-std"
    assert "hunter2" not in str(first["event"])  # key=value pairs in free text are masked
    assert first["event"] == f"password={REDACTED}"
    assert JWT not in str(second["event"])  # and so is anything shaped like a JWT


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("api_key: abc123 next", f"api_key: {REDACTED} next"),
        ('{"refresh_token": "r-1"}', f'{{"refresh_token": "{REDACTED}"}}'),
        (
            "tokens=5 is fine? no: tokens=" + REDACTED,
            "tokens=" + REDACTED + " is fine? no: tokens=" + REDACTED,
        ),
        ("batch b1 has 3 essays", "batch b1 has 3 essays"),
    ],
)
def test_free_text_masking(text: str, masked: str) -> None:
    from common.logs import redact

    assert redact(text) == masked


def test_configuring_twice_keeps_one_handler(output: io.StringIO) -> None:
    configure_logging(service="testsvc", json=True, stream=output)
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_huleedu", False)]
    assert len(ours) == 1
