"""The batch routes over real sockets: TLS at the edge (HTTP/1.1 and HTTP/2), gRPC to the
sandbox batch/file backends and the real aggregator, events on the bus between them.

Register, upload, run a pipeline, and watch ``GET /v1/batches/{id}`` reach a completed status
with per-essay results; uploads that break a limit or lie about their type, and uploads the
client abandons, leave nothing stored; another user sees nothing of it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from gateway.backends import BackendSettings
from tests.integration.gateway.conftest import TEACHER, TEACHER2, Gateway, Stack

DOCX_TYPE = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
ESSAYS = [
    ("journey.txt", "text/plain", "My journey to the coast began at dawn. " * 40),
    ("river.txt", "text/plain", "The river remembers every stone it has turned. " * 30),
    ("winter.txt", "text/plain", "Winter came early that year, and quietly. " * 35),
]


def multipart(
    files: list[tuple[str, str, bytes]], boundary: str = "huleedu-test-boundary-7f3a"
) -> tuple[bytes, str]:
    out = bytearray()
    for name, content_type, data in files:
        out += (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="files"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


async def authed(gateway: Gateway, client: httpx.AsyncClient, user: Any = TEACHER) -> str:
    token: str = (await gateway.login(client, user))["access_token"]
    client.headers["authorization"] = f"Bearer {token}"
    return token


async def register(client: httpx.AsyncClient, count: int = 3) -> dict[str, Any]:
    reply = await client.post(
        "/v1/batches",
        json={
            "course_code": "ENG5",
            "essay_instructions": "Write about a journey that changed you.",
            "expected_essay_count": count,
        },
    )
    assert reply.status_code == 201, reply.text
    batch: dict[str, Any] = reply.json()
    assert reply.headers["location"] == f"/v1/batches/{batch['batch_id']}"
    return batch


async def upload(
    client: httpx.AsyncClient, batch_id: str, files: list[tuple[str, str, bytes]]
) -> httpx.Response:
    body, content_type = multipart(files)
    return await client.post(
        f"/v1/batches/{batch_id}/files", content=body, headers={"content-type": content_type}
    )


def incoming(stack: Stack) -> list[Path]:
    """Partial uploads the file backend holds on disk."""
    return sorted(stack.sandbox.files.incoming_dir.iterdir())


async def nothing_incoming(stack: Stack) -> None:
    """The file backend holds no partial upload (it discards one as soon as it learns the
    call was aborted, which may be just after the client got its answer)."""
    with trio.fail_after(5):
        while incoming(stack):
            await trio.sleep(0.01)


async def wait_completed(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    with trio.fail_after(20):
        while True:
            reply = await client.get(f"/v1/batches/{batch_id}")
            if reply.status_code == 200 and reply.json()["status"] in (
                "completed_successfully",
                "completed_with_failures",
                "failed",
            ):
                view: dict[str, Any] = reply.json()
                return view
            await trio.sleep(0.05)


@pytest.mark.parametrize(
    ("stack", "http2"),
    [
        ("memory", False),
        ("memory", True),
        pytest.param("kafka", True, marks=pytest.mark.kafka),
    ],
    ids=["h1.1", "h2", "h2-kafka"],
    indirect=["stack"],
)
async def test_register_upload_run_and_read_results(
    stack: Stack, http2: bool, request: pytest.FixtureRequest
) -> None:
    wanted = "KafkaBus" if "kafka" in request.node.callspec.id else "MemoryBus"
    assert type(stack.bus).__name__ == wanted
    gateway = stack.gateway
    async with gateway.client(http2=http2) as client:
        await authed(gateway, client)
        batch = await register(client)
        batch_id = batch["batch_id"]
        assert batch["course_code"] == "ENG5" and batch["requested_phases"] == []

        files = [(n, t, text.encode()) for n, t, text in ESSAYS]
        reply = await upload(client, batch_id, files)
        assert reply.status_code == 201, reply.text
        stored = reply.json()["files"]
        assert [f["filename"] for f in stored] == [n for n, _, _ in ESSAYS]
        for f, (_, _, data) in zip(stored, files, strict=True):
            assert f["size_bytes"] == len(data)
            assert f["sha256"] == hashlib.sha256(data).hexdigest()
            assert f["essay_id"]
        listed = (await client.get(f"/v1/batches/{batch_id}/files")).json()["files"]
        assert [f["file_id"] for f in listed] == [f["file_id"] for f in stored]

        reply = await client.post(
            f"/v1/batches/{batch_id}/pipelines", json={"phases": ["spellcheck", "cj_assessment"]}
        )
        assert reply.status_code == 202, reply.text
        assert reply.json()["phases"] == ["spellcheck", "cj_assessment"]

        view = await wait_completed(client, batch_id)
        assert view["status"] == "completed_successfully"
        assert view["requested_phases"] == ["spellcheck", "cj_assessment"]
        assert view["essays_received"] == 3
        assert {p["phase"]: p["status"] for p in view["phases"]} == {
            "spellcheck": "succeeded",
            "cj_assessment": "succeeded",
        }
        essays = view["essays"]
        assert sorted(e["filename"] for e in essays) == sorted(n for n, _, _ in ESSAYS)
        assert sorted(e["cj_rank"] for e in essays) == [1, 2, 3]
        for essay in essays:
            assert essay["spellcheck_corrections"] is not None
            assert essay["cj_grade"] in list("ABCDEF")
            assert {p["status"] for p in essay["phases"]} == {"succeeded"}

        overview = (await client.get(f"/v1/batches/{batch_id}/overview")).json()
        assert overview["incomplete"] == []
        assert overview["registration"]["requested_phases"] == ["spellcheck", "cj_assessment"]
        assert overview["progress"]["status"] == "completed_successfully"
        assert len(overview["files"]) == 3

        dashboard = (await client.get("/v1/dashboard")).json()
        assert dashboard["incomplete"] == []
        assert batch_id in [b["batch_id"] for b in dashboard["recent"]]
        assert batch_id in [b["batch_id"] for b in dashboard["registrations"]]
        assert dashboard["counts"].get("completed_successfully", 0) >= 1

        page = (await client.get("/v1/batches?page_size=1")).json()
        assert len(page["batches"]) == 1

        # A second pipeline while none runs is fine; the same idempotency key is one run.
        first = await client.post(
            f"/v1/batches/{batch_id}/pipelines",
            json={"phases": ["nlp"]},
            headers={"idempotency-key": "run-2"},
        )
        again = await client.post(
            f"/v1/batches/{batch_id}/pipelines",
            json={"phases": ["nlp"]},
            headers={"idempotency-key": "run-2"},
        )
        assert first.status_code == again.status_code == 202
        assert first.json()["pipeline_run_id"] == again.json()["pipeline_run_id"]


async def test_another_user_sees_nothing(stack: Stack) -> None:
    gateway = stack.gateway
    async with gateway.client() as owner, gateway.client() as other:
        await authed(gateway, owner)
        await authed(gateway, other, TEACHER2)
        batch_id = (await register(owner))["batch_id"]
        for path in ("", "/overview", "/files"):
            reply = await other.get(f"/v1/batches/{batch_id}{path}")
            assert reply.status_code == 404, (path, reply.text)
            assert reply.json()["detail"] == "batch not found"
            assert TEACHER.user_id not in reply.text and "ENG5" not in reply.text
        reply = await upload(other, batch_id, [("x.txt", "text/plain", b"hello")])
        assert reply.status_code == 404
        reply = await other.post(f"/v1/batches/{batch_id}/pipelines", json={"phases": ["nlp"]})
        assert reply.status_code == 404
        listed = (await other.get("/v1/batches")).json()["batches"]
        assert batch_id not in [b["batch_id"] for b in listed]
        await nothing_incoming(stack)


async def test_pipeline_before_any_file_is_a_conflict(stack: Stack) -> None:
    async with stack.gateway.client() as client:
        await authed(stack.gateway, client)
        batch_id = (await register(client))["batch_id"]
        reply = await client.post(
            f"/v1/batches/{batch_id}/pipelines", json={"phases": ["spellcheck"]}
        )
        assert reply.status_code == 409
        assert reply.headers["content-type"] == "application/problem+json"
        assert "upload" not in reply.json()["detail"]  # the public text, not the backend's


@pytest.mark.parametrize(
    ("files", "status", "field"),
    [
        ([("a.png", "image/png", b"\x89PNG\r\n\x1a\n....")], 415, "content_type"),
        ([("a.pdf", "application/pdf", b"just text, not a PDF")], 415, "content_type"),
        ([("a.docx", DOCX_TYPE, b"%PDF-1.7 not a zip")], 415, "content_type"),
        ([("a.txt", "text/plain", b"binary \x00 zero")], 415, "content_type"),
        ([("a.txt", "text/plain", b"x" * 3000)], 413, "upload_max_file_bytes"),
        ([(f"{i}.txt", "text/plain", b"essay") for i in range(4)], 413, "upload_max_files"),
    ],
    ids=["png", "fake-pdf", "fake-docx", "nul-text", "too-big", "too-many"],
)
async def test_upload_violations_name_the_limit_and_store_nothing(
    stack: Stack, files: list[tuple[str, str, bytes]], status: int, field: str
) -> None:
    gateway = await stack.another_gateway(upload_max_file_bytes=2048, upload_max_files=3)
    async with gateway.client() as client:
        await authed(gateway, client)
        batch_id = (await register(client))["batch_id"]
        good = ("first.txt", "text/plain", b"A fine first essay.")
        reply = await upload(client, batch_id, [good, *files])
        assert reply.status_code == status, reply.text
        assert reply.headers["content-type"] == "application/problem+json"
        assert reply.json()["field"] == field
        listed = (await client.get(f"/v1/batches/{batch_id}/files")).json()["files"]
        assert listed == []  # the good first file went too: all or nothing
    await nothing_incoming(stack)


@pytest.mark.parametrize(
    ("body", "content_type", "status", "field"),
    [
        (
            b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nx\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            422,
            "files",
        ),
        (
            b'--b\r\nContent-Disposition: form-data; name="f"; filename="a.txt"\r\n\r\nx',
            "multipart/form-data; boundary=b",
            422,
            "body",
        ),
        (b"{}", "application/json", 415, "content-type"),
        (b"--b--\r\n", "multipart/form-data; boundary=b", 422, "files"),
    ],
    ids=["field-not-file", "truncated", "json", "empty"],
)
async def test_malformed_uploads_are_clear_4xx(
    stack: Stack, body: bytes, content_type: str, status: int, field: str
) -> None:
    async with stack.gateway.client() as client:
        await authed(stack.gateway, client)
        batch_id = (await register(client))["batch_id"]
        reply = await client.post(
            f"/v1/batches/{batch_id}/files", content=body, headers={"content-type": content_type}
        )
        assert reply.status_code == status, reply.text
        assert reply.json()["field"] == field
    await nothing_incoming(stack)


async def test_an_abandoned_upload_leaves_nothing(stack: Stack) -> None:
    gateway = stack.gateway
    async with gateway.client() as client:
        await authed(gateway, client)
        batch_id = (await register(client))["batch_id"]
        token = client.headers["authorization"]

    host, port = gateway.url.split("://")[1].rsplit(":", 1)
    body, content_type = multipart([("big.txt", "text/plain", b"word " * 200_000)])
    head = (
        f"POST /v1/batches/{batch_id}/files HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: {token}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    stream = await trio.open_ssl_over_tcp_stream(
        host, int(port), ssl_context=gateway.tls(["http/1.1"]), https_compatible=True
    )
    await stream.send_all(head + body[: len(body) // 2])
    # Wait until the backend holds the partial upload, then vanish.
    with trio.fail_after(5):
        while not incoming(stack):
            await trio.sleep(0.01)
    await trio.aclose_forcefully(stream)
    with trio.fail_after(5):
        while incoming(stack):
            await trio.sleep(0.01)
    async with gateway.client() as client:
        client.headers["authorization"] = token
        listed = (await client.get(f"/v1/batches/{batch_id}/files")).json()["files"]
    assert listed == []


async def test_register_validation_names_the_field(stack: Stack) -> None:
    async with stack.gateway.client() as client:
        await authed(stack.gateway, client)
        cases = [
            ({"course_code": "ENG5", "essay_instructions": "x"}, "expected_essay_count"),
            (
                {"course_code": "", "essay_instructions": "x", "expected_essay_count": 1},
                "course_code",
            ),
            (
                {
                    "course_code": "ENG5",
                    "essay_instructions": "x",
                    "expected_essay_count": 501,
                },
                "expected_essay_count",
            ),
            (
                {
                    "course_code": "ENG5",
                    "essay_instructions": "x",
                    "expected_essay_count": 1,
                    "owner_user_id": "someone-else",
                },
                "owner_user_id",
            ),
        ]
        for body, field in cases:
            reply = await client.post("/v1/batches", json=body)
            assert reply.status_code == 422, reply.text
            assert reply.json()["field"] == field
        reply = await client.post(
            "/v1/batches",
            content=json.dumps({"course_code": "ENG5"}).encode(),
            headers={"content-type": "text/plain"},
        )
        assert reply.status_code == 415
        ident = str(uuid.uuid4())
        first = await client.post(
            "/v1/batches",
            json={"course_code": "ENG5", "essay_instructions": "x", "expected_essay_count": 1},
            headers={"idempotency-key": ident},
        )
        again = await client.post(
            "/v1/batches",
            json={"course_code": "ENG5", "essay_instructions": "x", "expected_essay_count": 1},
            headers={"idempotency-key": ident},
        )
        assert first.json()["batch_id"] == again.json()["batch_id"]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_backend_that_is_down_gives_503_or_a_marked_partial_within_budget(
    stack: Stack,
) -> None:
    down = BackendSettings(target=f"127.0.0.1:{_closed_port()}", retry_attempts=2)
    gateway = await stack.another_gateway(result_backend=down)
    async with gateway.client() as client:
        await authed(gateway, client)
        batch_id = (await register(client))["batch_id"]
        started = trio.current_time()
        reply = await client.get(f"/v1/batches/{batch_id}")
        assert reply.status_code == 503, reply.text
        assert reply.json()["code"] in ("unavailable", "circuit_open")
        overview = await client.get(f"/v1/batches/{batch_id}/overview")
        assert overview.status_code == 200
        assert overview.json()["incomplete"] == ["progress"]
        assert overview.json()["registration"]["batch_id"] == batch_id
        dashboard = await client.get("/v1/dashboard")
        assert dashboard.status_code == 200 and dashboard.json()["incomplete"] == ["summary"]
        assert trio.current_time() - started < 2.0  # refused connections fail fast
