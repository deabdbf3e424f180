"""R5 on Trio's virtual clock, through the whole HTTP pipeline (edge, auth, limits, routes):
a backend down, slow or flapping gives 503/504 or a partial answer with its marker within the
route's budget, at exact virtual times; breakers open, half-open and close; the acting user
comes from the token only.

The backends here are in-process Trio servicers with the real contract types, behind a
fault switch (answer / fail / hang / fail once) — what the gateway sees of a backend is
exactly the ``Caller`` interface the real gRPC channel implements; the same routes are tested
over real gRPC sockets against the sandbox backends in ``tests/integration/gateway``.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import NotFoundError, UnavailableError
from deploy.sandbox.identity import DEMO_USERS
from gateway.backends import Backend, BackendSettings
from gateway.batches import BatchBackends
from tests.unit.gateway.asgi import Reply, call

TEACHER = DEMO_USERS[0]
WHEN = dt.datetime(2026, 12, 6, 9, 0, tzinfo=dt.UTC)
#: Small breaker numbers so a test opens it in a few calls.
FAST = {
    "breaker_minimum_calls": 4,
    "breaker_failure_ratio": 0.5,
    "breaker_open_for_s": 5.0,
    "retry_attempts": 2,
    "retry_initial_s": 0.05,
    "retry_max_s": 0.05,
}


class Switch:
    """Per-method behaviour of one in-process backend."""

    def __init__(self) -> None:
        self.modes: dict[str, str] = {}
        self.requests: list[tuple[str, Any]] = []

    async def apply(self, name: str, request: Any) -> None:
        self.requests.append((name, request))
        mode = self.modes.get(name, self.modes.get("*", "ok"))
        if mode == "hang":
            await trio.sleep_forever()
        if mode == "down":
            raise UnavailableError(f"{name}: connection refused", service="backend")
        if mode == "once":
            self.modes[name] = "ok"
            raise UnavailableError(f"{name}: connection reset", service="backend")
        await trio.sleep(0.005)  # a healthy backend's service time


class InProcess:
    """The ``Caller`` interface over an in-process servicer (``method`` is its method)."""

    def __init__(self, service: str) -> None:
        self.service = service

    async def call(
        self, method: Callable[..., Awaitable[Any]], request: Any, *, idempotent: bool = False
    ) -> Any:
        return await method(request)


class Batches:
    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    def _batch(self, batch_id: str, owner: str) -> batches_v1.Batch:
        return batches_v1.Batch(
            batch_id=batch_id,
            owner_user_id=owner,
            org_id="org-demo",
            course_code="ENG5",
            essay_instructions="Write about a journey.",
            expected_essay_count=3,
            created_at=WHEN,
        )

    async def get_batch(self, request: batches_v1.GetBatchRequest) -> batches_v1.GetBatchResponse:
        await self.switch.apply("get_batch", request)
        assert request.actor is not None
        if request.batch_id != "b1":
            raise NotFoundError("batch not found", service="batches")
        return batches_v1.GetBatchResponse(batch=self._batch("b1", request.actor.user_id))

    async def list_batches(
        self, request: batches_v1.ListBatchesRequest
    ) -> batches_v1.ListBatchesResponse:
        await self.switch.apply("list_batches", request)
        assert request.actor is not None
        return batches_v1.ListBatchesResponse(batches=[self._batch("b1", request.actor.user_id)])

    async def register_batch(
        self, request: batches_v1.RegisterBatchRequest
    ) -> batches_v1.RegisterBatchResponse:
        await self.switch.apply("register_batch", request)
        assert request.actor is not None
        return batches_v1.RegisterBatchResponse(batch=self._batch("b2", request.actor.user_id))


class Results:
    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    async def get_batch(self, request: results_v1.GetBatchRequest) -> results_v1.GetBatchResponse:
        await self.switch.apply("get_batch", request)
        if request.batch_id != "b1":
            raise NotFoundError("batch not found", service="results")
        return results_v1.GetBatchResponse(
            batch=results_v1.BatchView(
                batch_id="b1",
                course_code="ENG5",
                status=results_v1.BatchStatus.PROCESSING,
                current_phase=common_v1.PipelinePhase.SPELLCHECK,
                expected_essay_count=3,
                essays_received=3,
                created_at=WHEN,
                version=7,
            )
        )

    async def get_dashboard(
        self, request: results_v1.GetDashboardRequest
    ) -> results_v1.GetDashboardResponse:
        await self.switch.apply("get_dashboard", request)
        return results_v1.GetDashboardResponse(
            counts=[results_v1.StatusCount(status=results_v1.BatchStatus.PROCESSING, count=1)],
            recent=[results_v1.BatchSummary(batch_id="b1", course_code="ENG5")],
            total_batches=1,
            essays_processed=0,
        )


class Files:
    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    async def list_files(self, request: files_v1.ListFilesRequest) -> files_v1.ListFilesResponse:
        await self.switch.apply("list_files", request)
        return files_v1.ListFilesResponse(
            files=[
                files_v1.FileInfo(
                    file_id="f1",
                    batch_id=request.batch_id,
                    filename="a.txt",
                    content_type="text/plain",
                    size_bytes=12,
                    sha256="0" * 64,
                )
            ]
        )


class Stack:
    def __init__(self) -> None:
        self.batches, self.results, self.files = Switch(), Switch(), Switch()
        settings = BackendSettings(target="in-process:0", **FAST)  # type: ignore[arg-type]
        self.backends = BatchBackends(
            batches=Backend("batches", InProcess("batches"), settings),
            batch_stub=Batches(self.batches),  # type: ignore[arg-type]
            files=Backend("files", InProcess("files"), settings),
            file_stub=Files(self.files),  # type: ignore[arg-type]
            file_channel=None,  # type: ignore[arg-type]  # uploads are tested over sockets
            results=Backend("results", InProcess("results"), settings),
            result_stub=Results(self.results),  # type: ignore[arg-type]
        )


@pytest.fixture
async def stack_gateway(make_gateway: Any) -> tuple[Stack, Any, str]:
    stack = Stack()
    gateway = await make_gateway(backends=stack.backends)
    login = await call(
        gateway.http.asgi,
        "POST",
        "/v1/auth/login",
        headers=[("content-type", "application/json")],
        body=json.dumps({"email": TEACHER.email, "password": TEACHER.password}).encode(),
    )
    assert login.status == 200, login.body
    return stack, gateway, login.json()["access_token"]


async def get(gateway: Any, token: str, path: str, **kw: Any) -> Reply:
    headers = [("authorization", f"Bearer {token}"), *kw.pop("headers", [])]
    return await call(gateway.http.asgi, "GET", path, headers=headers, **kw)


async def test_a_hanging_backend_gives_504_exactly_at_the_route_budget(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    stack.results.modes["get_batch"] = "hang"
    started = trio.current_time()
    reply = await get(gateway, token, "/v1/batches/b1")
    assert trio.current_time() - started == pytest.approx(2.0)  # get_batch budget
    assert reply.status == 504
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["code"] == "deadline_exceeded"


async def test_overview_is_partial_with_a_marker_when_one_backend_hangs(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    stack.files.modes["list_files"] = "hang"
    started = trio.current_time()
    reply = await get(gateway, token, "/v1/batches/b1/overview")
    assert trio.current_time() - started == pytest.approx(2.0)  # batch_overview budget
    assert reply.status == 200
    body = reply.json()
    assert body["incomplete"] == ["files"]
    assert body["files"] is None
    assert body["registration"]["course_code"] == "ENG5"
    assert body["progress"]["status"] == "processing"


async def test_overview_with_every_backend_fast_is_complete_at_once(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    _, gateway, token = stack_gateway
    started = trio.current_time()
    reply = await get(gateway, token, "/v1/batches/b1/overview")
    # Concurrent: three 5 ms calls take 5 ms, not 15.
    assert trio.current_time() - started == pytest.approx(0.005)
    assert reply.status == 200 and reply.json()["incomplete"] == []
    assert [f["filename"] for f in reply.json()["files"]] == ["a.txt"]


async def test_overview_with_every_backend_down_is_503_and_unknown_batch_404(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    for switch in (stack.batches, stack.results, stack.files):
        switch.modes["*"] = "down"
    reply = await get(gateway, token, "/v1/batches/b1/overview")
    assert reply.status == 503 and reply.json()["code"] == "unavailable"
    for switch in (stack.batches, stack.results, stack.files):
        switch.modes.clear()
    reply = await get(gateway, token, "/v1/batches/nope/overview")
    assert reply.status == 404 and reply.json()["detail"] == "batch not found"


async def test_dashboard_partial_when_the_batch_backend_is_down(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    stack.batches.modes["list_batches"] = "down"
    reply = await get(gateway, token, "/v1/dashboard")
    assert reply.status == 200
    body = reply.json()
    assert body["incomplete"] == ["registrations"] and body["registrations"] is None
    assert body["counts"] == {"processing": 1} and body["total_batches"] == 1
    stack.batches.modes.clear()
    stack.results.modes["get_dashboard"] = "hang"
    started = trio.current_time()
    reply = await get(gateway, token, "/v1/dashboard")
    assert trio.current_time() - started == pytest.approx(2.0)
    assert reply.status == 200 and reply.json()["incomplete"] == ["summary"]
    assert [b["batch_id"] for b in reply.json()["registrations"]] == ["b1"]


async def test_breaker_opens_answers_503_with_retry_after_at_once_then_recovers(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    stack.results.modes["get_batch"] = "down"
    for _ in range(2):  # each read is tried twice (retry_attempts=2): 4 failures of 4 calls
        reply = await get(gateway, token, "/v1/batches/b1")
        assert reply.status == 503 and reply.json()["code"] == "unavailable"
    calls = len(stack.results.requests)
    opened = trio.current_time()
    refused = await get(gateway, token, "/v1/batches/b1")
    assert trio.current_time() == opened  # at once
    assert len(stack.results.requests) == calls  # the backend was not called
    assert refused.status == 503
    assert refused.json()["code"] == "circuit_open"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 5
    # Half-open after open_for_s: one probe goes through; it succeeds and closes the breaker.
    stack.results.modes.clear()
    await trio.sleep_until(opened + 5.0)
    assert (await get(gateway, token, "/v1/batches/b1")).status == 200
    assert (await get(gateway, token, "/v1/batches/b1")).status == 200
    assert len(stack.results.requests) == calls + 2


async def test_a_flapping_read_is_retried_a_write_is_not(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    stack.results.modes["get_batch"] = "once"
    reply = await get(gateway, token, "/v1/batches/b1")
    assert reply.status == 200
    assert [n for n, _ in stack.results.requests] == ["get_batch", "get_batch"]

    stack.batches.modes["register_batch"] = "once"
    reply = await call(
        gateway.http.asgi,
        "POST",
        "/v1/batches",
        headers=[("authorization", f"Bearer {token}"), ("content-type", "application/json")],
        body=json.dumps(
            {"course_code": "ENG5", "essay_instructions": "Write.", "expected_essay_count": 3}
        ).encode(),
    )
    assert reply.status == 503
    assert [n for n, _ in stack.batches.requests] == ["register_batch"]


async def test_the_actor_comes_from_the_token_never_from_the_client(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    reply = await get(
        gateway,
        token,
        "/v1/batches/b1/overview",
        headers=[("x-user-id", "someone-else"), ("X-Org-ID", "other-org")],
    )
    assert reply.status == 200
    actors = {
        req.actor.user_id
        for switch in (stack.batches, stack.results, stack.files)
        for _, req in switch.requests
    }
    assert actors == {TEACHER.user_id}
    orgs = {req.actor.org_id for _, req in stack.results.requests}
    assert orgs == {TEACHER.org_id}
    cids = {req.actor.correlation_id for _, req in stack.results.requests}
    assert cids == {reply.headers["x-correlation-id"]}


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/batches?page_size=0", "page_size"),
        ("/v1/batches?page_size=101", "page_size"),
        ("/v1/batches?status=nope", "status"),
        ("/v1/batches?colour=red", "colour"),
        ("/v1/batches?page_size=5&page_size=6", "page_size"),
        ("/v1/batches/..%2f/overview", "batch_id"),
        ("/v1/batches/" + "x" * 65, "batch_id"),
    ],
)
async def test_bad_input_names_the_field_before_any_backend_call(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any, path: str, field: str
) -> None:
    stack, gateway, token = stack_gateway
    reply = await get(gateway, token, path)
    assert reply.status == 422, reply.body
    assert reply.json()["field"] == field
    assert not stack.results.requests and not stack.batches.requests


async def test_backend_text_never_reaches_the_client(
    stack_gateway: tuple[Stack, Any, str], autojump_clock: Any
) -> None:
    stack, gateway, token = stack_gateway
    stack.results.modes["get_batch"] = "down"
    reply = await get(gateway, token, "/v1/batches/b1")
    assert "connection refused" not in reply.body.decode()
    assert reply.json()["detail"] == UnavailableError.public_detail
