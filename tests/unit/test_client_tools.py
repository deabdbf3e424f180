"""The client tools without a tier: options and discovery (explicit option > devstack file >
default), option validation, failure texts, the lines printed, and the streamed upload body
(checked with the gateway's own multipart parser)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from deploy import demo, wstail
from deploy.client import (
    DEFAULT_GATEWAY_URL,
    DEFAULT_WS_URL,
    DEMO_EMAIL,
    DEMO_PASSWORD,
    PASSWORD_ENV,
    ClientConfig,
    CloseInfo,
    Frame,
    OptionsError,
    describe_failure,
    event_summary,
    resolve_config,
)
from deploy.client.failures import _problem_text
from deploy.samples import ESSAYS_DIR
from gateway.multipart import (
    MultipartParser,
    PartData,
    PartStarted,
    boundary_from_content_type,
)


def parse(tool: object, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="huleedu")
    tool.add_arguments(parser)  # type: ignore[attr-defined]
    return parser.parse_args(list(argv))


def config(*argv: str, environ: dict[str, str] | None = None) -> ClientConfig:
    return resolve_config(parse(demo, *argv), environ or {})


def write_stack(path: Path, **values: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


@pytest.fixture(autouse=True)
def in_empty_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test runs where no ``.state/devstack/devstack.json`` exists unless it writes one."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_without_options_or_discovery_file_the_defaults_apply() -> None:
    assert config() == ClientConfig(
        gateway_url=DEFAULT_GATEWAY_URL,
        ws_url=DEFAULT_WS_URL,
        ca_file=None,
        email=DEMO_EMAIL,
        password=DEMO_PASSWORD,
        origin=None,
    )


def test_the_default_discovery_file_is_used_and_explicit_options_win(tmp_path: Path) -> None:
    (tmp_path / ".state/devstack").mkdir(parents=True)
    (tmp_path / ".state/devstack/ca.pem").write_text("not parsed here")
    write_stack(
        tmp_path / ".state/devstack/devstack.json",
        gateway_url="https://127.0.0.1:9443",
        ws_url="wss://127.0.0.1:9444/v1/ws",
        ca_file="ca.pem",  # relative: next to the discovery file
        pid=123,
    )
    found = config()
    assert found.gateway_url == "https://127.0.0.1:9443"
    assert found.ws_url == "wss://127.0.0.1:9444/v1/ws"
    assert found.ca_file == Path(".state/devstack/ca.pem")
    other_ca = tmp_path / "other.pem"
    other_ca.write_text("x")
    explicit = config("--gateway", "https://gw.test:1/", "--ca", str(other_ca))
    assert explicit.gateway_url == "https://gw.test:1"  # trailing slash dropped
    assert explicit.ws_url == "wss://127.0.0.1:9444/v1/ws"  # still from the file
    assert explicit.ca_file == other_ca


def test_a_discovery_file_naming_a_missing_ca_says_so(tmp_path: Path) -> None:
    stack = write_stack(tmp_path / "stack.json", ca_file="/nowhere/ca.pem")
    with pytest.raises(OptionsError) as info:
        config("--stack", str(stack))
    assert str(info.value) == f"--stack {stack}: ca_file /nowhere/ca.pem: no such file"


def test_an_explicit_stack_file_is_read_and_an_empty_ca_means_system_trust(
    tmp_path: Path,
) -> None:
    stack = write_stack(tmp_path / "elsewhere/stack.json", gateway_url="https://a.test", ca_file="")
    found = config("--stack", str(stack))
    assert found.gateway_url == "https://a.test" and found.ca_file is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"gateway_url": 8443}', "gateway_url must be a string"),
    ],
    ids=["missing", "not-json", "not-object", "wrong-type"],
)
def test_a_bad_stack_file_is_an_options_error_naming_it(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "stack.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(OptionsError) as info:
        config("--stack", str(path))
    assert str(info.value).startswith(f"--stack {path}: ") and message in str(info.value)


def test_the_password_comes_from_the_option_then_the_environment_and_never_shows() -> None:
    assert config(environ={PASSWORD_ENV: "from env"}).password == "from env"
    chosen = config("--password", "from option", environ={PASSWORD_ENV: "from env"})
    assert chosen.password == "from option"
    assert "from option" not in repr(chosen)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--gateway", "ftp://x.test"], "--gateway"),
        (["--gateway", "https://"], "--gateway"),
        (["--gateway", "https://x.test/?a=1"], "--gateway"),
        (["--ws", "https://x.test/v1/ws"], "--ws"),
        (["--ca", "missing.pem"], "--ca"),
    ],
)
def test_unusable_options_name_the_option(argv: list[str], option: str) -> None:
    with pytest.raises(OptionsError) as info:
        config(*argv)
    assert str(info.value).startswith(option), str(info.value)


@pytest.mark.parametrize(
    ("tool", "argv", "complaint"),
    [
        (demo, ["--timeout", "0"], "positive number of seconds"),
        (demo, ["--timeout", "soon"], "not a number of seconds"),
        (wstail, ["--since", "no-colon"], "since: expected <epoch>:<offset>"),
        (wstail, ["--since", "e:-1"], "since: offset must be"),
        (wstail, ["--category", "grades"], "invalid choice"),
        (wstail, ["--count", "0"], "positive whole number"),
    ],
)
def test_malformed_values_are_usage_errors(
    tool: object, argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse(tool, *argv)
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_ws_tail_options_are_parsed_as_given() -> None:
    args = parse(
        wstail, "--since", "topic/3:41", "--batch", "b1", "--batch", "b2", "--category",
        "batch_progress", "--json", "--count", "3",
    )  # fmt: skip
    assert args.since == "topic/3:41"
    assert args.batch == ["b1", "b2"] and args.category == ["batch_progress"]
    assert args.json is True and args.count == 3


@pytest.mark.parametrize("tool", [demo, wstail], ids=["demo", "ws-tail"])
def test_main_reports_bad_options_in_one_line_and_exits_2(
    tool: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse(tool, "--stack", str(tmp_path / "nope.json"))
    assert tool.main(args) == 2  # type: ignore[attr-defined]
    err = capsys.readouterr().err.strip().splitlines()
    name = "demo" if tool is demo else "ws-tail"
    assert len(err) == 1 and err[0].startswith(f"{name}: --stack "), err


def _connect_failure() -> None:
    refused = ConnectionRefusedError(
        111, "Error connecting to ('127.0.0.1', 1): Connection refused"
    )
    try:
        raise ExceptionGroup("all attempts failed", [refused])
    except ExceptionGroup as group:
        raise OSError("all attempts to connect to 127.0.0.1:1 failed") from group


def test_a_refused_connection_is_described_by_its_root_cause() -> None:
    with pytest.raises(OSError, match="all attempts") as info:
        _connect_failure()
    assert describe_failure(info.value) == "connection refused"
    assert describe_failure(RuntimeError("odd")) == "odd"


def test_event_lines_are_short_and_say_what_happened() -> None:
    data = {
        "batch_id": "b1",
        "status": "processing",
        "current_phase": "cj_assessment",
        "phases": [
            {"phase": "spellcheck", "total": 5, "succeeded": 4, "failed": 1},
            {"phase": "cj_assessment", "total": 5, "succeeded": 0, "failed": 0},
        ],
    }
    assert event_summary("batch_status_changed", data) == (
        "status=processing phase=cj_assessment [spellcheck 5/5 (1 failed), cj_assessment 0/5]"
    )
    upload = {"batch_id": "b1", "filename": "a.txt", "size_bytes": 12, "file_id": "f"}
    assert event_summary("file_uploaded", upload) == "a.txt (12 bytes)"
    other = {"batch_id": "b1", "level": "warn", "nested": {"x": 1}, "text": "y" * 200}
    line = event_summary("system_alert", other, limit=40)
    assert line.startswith("level=warn text=yyy") and len(line) == 40 and line.endswith("...")

    frame = {
        "type": "event",
        "offset": 7,
        "epoch": "t/0",
        "event_type": "file_uploaded",
        "occurred_at": "2025-05-01T12:03:07.418000Z",
        "batch_id": "b1",
        "category": "file_operations",
        "data": upload,
    }
    text = json.dumps(frame)
    assert wstail.frame_line(Frame(text, frame)) == "12:03:07.418 file_uploaded b1 a.txt (12 bytes)"
    ack = {"type": "subscribed", "batch_ids": ["b1"], "categories": None}
    assert wstail.frame_line(Frame("", ack)) == "subscribed: batches=b1 categories=all"


def test_the_results_table_aligns_one_line_per_essay() -> None:
    rows = [
        demo.ResultRow("long_name.txt", "succeeded", 12, 1, 1.5, "A"),
        demo.ResultRow("b.txt", "failed", None, None, None, None),
    ]
    lines = demo.results_table(rows)
    assert lines[0].split() == ["rank", "file", "spellcheck", "corrections", "score", "grade"]
    assert lines[1].split() == ["1", "long_name.txt", "succeeded", "12", "1.50", "A"]
    assert lines[2].split() == ["-", "b.txt", "failed", "-", "-", "-"]
    assert len({line.index("spellcheck") for line in lines[:1]}) == 1
    assert lines[1].index("succeeded") == lines[2].index("failed") == lines[0].index("spellcheck")


@pytest.mark.parametrize(
    ("result", "code"),
    [
        (wstail.TailResult(stopped=True, closed=CloseInfo(1000, None)), 0),
        (wstail.TailResult(closed=CloseInfo(1001, "server shutting down")), 0),
        (wstail.TailResult(closed=CloseInfo(4003, "session revoked")), 1),
        (wstail.TailResult(error="login failed: 401 x"), 1),
    ],
)
def test_ws_tail_exit_codes(result: wstail.TailResult, code: int) -> None:
    assert result.exit_code == code


async def test_the_streamed_upload_is_multipart_the_gateway_parses(tmp_path: Path) -> None:
    odd = tmp_path / 'Åsa "quoted".txt'
    odd.write_text("Jag reste till Umeå.\n" * 5000, encoding="utf-8")  # several chunks
    essays = [*demo.find_essays(ESSAYS_DIR), *demo.find_essays(tmp_path)]
    body, length, content_type = demo._multipart(essays)
    data = b"".join([chunk async for chunk in body])
    assert len(data) == length

    parser = MultipartParser(boundary_from_content_type(content_type))
    names: list[str] = []
    contents: list[bytes] = []
    for event in [*parser.feed(data), *parser.end()]:
        if isinstance(event, PartStarted):
            assert event.name == "files" and event.content_type == "text/plain"
            names.append(event.filename or "")
            contents.append(b"")
        elif isinstance(event, PartData):
            contents[-1] += event.data
    assert names == [e.path.name for e in essays]
    assert contents == [e.path.read_bytes() for e in essays]


@pytest.mark.parametrize(
    ("status", "body", "text"),
    [
        (401, {"detail": "Missing or invalid credentials."}, "401 Missing or invalid credentials."),
        (
            429,
            {"detail": "rate limit login-account exceeded", "retry_after": 19},
            "429 rate limit login-account exceeded (retry after 19 s)",
        ),
        (
            422,
            {"detail": "too long", "field": "course_code"},
            "422 too long (field course_code)",
        ),
        (
            503,
            {"title": "Unavailable", "correlation_id": "c1"},
            "503 Unavailable (correlation id c1)",
        ),
        (502, None, "502 Bad Gateway"),
    ],
)
def test_problem_documents_become_one_readable_phrase(
    status: int, body: dict[str, object] | None, text: str
) -> None:
    reply = (
        httpx.Response(status, json=body)
        if body is not None
        else httpx.Response(status, text="<html>")
    )
    assert _problem_text(reply) == text
