"""The batch routes: ``/v1/batches``, ``/v1/batches/{id}``, ``/v1/batches/{id}/pipelines``,
``/v1/batches/{id}/overview`` and ``/v1/dashboard``, all authenticated.

Each route validates its input, builds the backend request with the acting user taken from
the verified token (never from the client), and runs under its budget from settings
(``route_budgets_s``): the budget is the deadline every backend call inherits, so no request
waits past it. Backend errors become client errors through :func:`gateway.backends.public_error`.

**Aggregation** (overview, dashboard): the parts are fetched concurrently in one nursery under
the route's deadline. A part whose backend fails or misses the deadline is left ``null`` and
named in ``incomplete``; the answer is 200 with what arrived. When every part failed the
answer is 503; when the batch backend says the batch does not exist (or is not the user's),
404.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from quart import Response, g, request
from quart_trio import QuartTrio

from common import correlation
from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import (
    DependencyError,
    HuleEduError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from common.logs import get_logger
from common.rpc import RpcChannel
from common.tokens import AccessClaims
from gateway.backends import Backend, public_error, route_budget
from gateway.http import asgi_scope, json_response, parse_query, read_body
from gateway.openapi import api
from gateway.views import (
    BatchOut,
    BatchPage,
    BatchProgress,
    BatchSummaryOut,
    Dashboard,
    FileList,
    FileOut,
    ListBatchesQuery,
    Overview,
    Part,
    PipelineAccepted,
    PipelineRequest,
    RegisterBatchRequest,
    batch_id_from_path,
    phase_from_name,
)

__all__ = ["BatchBackends", "RouteBudgets", "actor", "idempotency_key", "register_batch_routes"]

log = get_logger("gateway.batches")

Handler = Callable[..., Awaitable[Response]]
Protect = Callable[[Handler], Handler]
#: What a route calling a backend can answer besides its own errors.
BACKEND_ERRORS = (502, 503, 504)
#: Recent batches on the dashboard.
DASHBOARD_RECENT = 10


@dataclass(frozen=True, slots=True)
class BatchBackends:
    """The three backends with their stubs (bound to each backend's channel)."""

    batches: Backend
    batch_stub: batches_v1.BatchServiceStub
    files: Backend
    file_stub: files_v1.FileServiceStub
    #: The file backend's channel, for the client-streaming upload call.
    file_channel: RpcChannel
    results: Backend
    result_stub: results_v1.ResultServiceStub


RouteBudgets = Callable[[str], float]


def actor(claims: AccessClaims) -> common_v1.Actor:
    """The acting user for a backend request: only ever the verified token's claims."""
    cid = asgi_scope().get("huleedu.correlation_id") or correlation.current_correlation_id()
    return common_v1.Actor(
        user_id=claims.sub,
        org_id=claims.org,
        roles=list(claims.roles),
        correlation_id=str(cid or ""),
    )


def idempotency_key() -> str:
    value = request.headers.get("idempotency-key")
    if value is None:
        return ""
    if not 1 <= len(value) <= 128 or not value.isascii() or not value.isprintable():
        raise ValidationError(
            "Idempotency-Key: 1..128 printable ASCII characters", field="Idempotency-Key"
        )
    return value


T = TypeVar("T")


def _need(value: T | None) -> T:
    """A message field the contract says is always set."""
    if value is None:
        raise DependencyError("the backend answered without the batch", service="gateway")
    return value


async def _call(backend: Backend, what: str, method: Any, req: Any, *, read: bool) -> Any:
    try:
        return await backend.call(method, req, idempotent=read)
    except HuleEduError as exc:
        raise public_error(exc, what) from None


async def _gather(
    parts: dict[Part, Callable[[], Awaitable[Any]]], what: str, budget_s: float
) -> tuple[dict[Part, Any], list[Part], list[HuleEduError]]:
    """Run ``parts`` concurrently for at most ``budget_s``: (results, missing, errors). A part
    still running at the deadline is cancelled and missing; the others' results stand."""
    results: dict[Part, Any] = {}
    errors: dict[Part, HuleEduError] = {}

    async def one(name: Part, fetch: Callable[[], Awaitable[Any]]) -> None:
        try:
            results[name] = await fetch()
        except HuleEduError as exc:
            errors[name] = public_error(exc, what)

    with trio.move_on_after(budget_s):
        async with trio.open_nursery() as nursery:
            for name, fetch in parts.items():
                nursery.start_soon(one, name, fetch)
    missing = [name for name in parts if name not in results]
    for name in missing:
        error = errors.get(name)
        log.info("aggregation part missing", part=name, reason=error.code if error else "deadline")
    return results, missing, list(errors.values())


def register_batch_routes(
    app: QuartTrio, protected: Protect, backends: BatchBackends, budget: RouteBudgets
) -> None:
    b = backends

    def claims() -> AccessClaims:
        found: AccessClaims = g.claims
        return found

    @app.post("/v1/batches")
    @api(
        "register_batch",
        "batches",
        ok=201,
        request=RegisterBatchRequest,
        response=BatchOut,
        errors=(*BACKEND_ERRORS, 401, 415, 422),
    )
    @protected
    async def register_batch() -> Response:
        body = await read_body(RegisterBatchRequest)
        req = batches_v1.RegisterBatchRequest(
            actor=actor(claims()),
            course_code=body.course_code,
            essay_instructions=body.essay_instructions,
            expected_essay_count=body.expected_essay_count,
            class_id=body.class_id or "",
            idempotency_key=idempotency_key(),
        )
        with route_budget(budget("register_batch")):
            reply = await _call(b.batches, "batch", b.batch_stub.register_batch, req, read=False)
        out = BatchOut.of(_need(reply.batch))
        return json_response(
            out.model_dump(mode="json"),
            status=201,
            headers={"Location": f"/v1/batches/{out.batch_id}"},
        )

    @app.get("/v1/batches")
    @api(
        "list_batches",
        "batches",
        query=ListBatchesQuery,
        response=BatchPage,
        errors=(*BACKEND_ERRORS, 422),
    )
    @protected
    async def list_batches() -> Response:
        query = parse_query(ListBatchesQuery)
        req = results_v1.ListBatchesRequest(
            actor=actor(claims()),
            page=common_v1.PageRequest(
                page_size=query.page_size, page_token=query.page_token or ""
            ),
            status_filter=query.statuses(),
        )
        with route_budget(budget("list_batches")):
            reply = await _call(b.results, "batch", b.result_stub.list_batches, req, read=True)
        page = BatchPage(
            batches=[BatchSummaryOut.of(s) for s in reply.batches],
            next_page_token=reply.next_page_token or None,
        )
        return json_response(page.model_dump(mode="json"))

    @app.get("/v1/batches/<batch_id>")
    @api("get_batch", "batches", response=BatchProgress, errors=(*BACKEND_ERRORS, 404, 422))
    @protected
    async def get_batch(batch_id: str) -> Response:
        req = results_v1.GetBatchRequest(
            actor=actor(claims()), batch_id=batch_id_from_path(batch_id), include_essays=True
        )
        with route_budget(budget("get_batch")):
            reply = await _call(b.results, "batch", b.result_stub.get_batch, req, read=True)
        return json_response(BatchProgress.of(_need(reply.batch)).model_dump(mode="json"))

    @app.post("/v1/batches/<batch_id>/pipelines")
    @api(
        "request_pipeline",
        "batches",
        ok=202,
        request=PipelineRequest,
        response=PipelineAccepted,
        errors=(*BACKEND_ERRORS, 404, 409, 415, 422),
    )
    @protected
    async def request_pipeline(batch_id: str) -> Response:
        batch_id = batch_id_from_path(batch_id)
        body = await read_body(PipelineRequest)
        req = batches_v1.RequestPipelineRequest(
            actor=actor(claims()),
            batch_id=batch_id,
            phases=[phase_from_name(p) for p in body.phases],
            idempotency_key=idempotency_key(),
        )
        with route_budget(budget("request_pipeline")):
            reply = await _call(b.batches, "batch", b.batch_stub.request_pipeline, req, read=False)
        out = PipelineAccepted(
            batch_id=batch_id,
            pipeline_run_id=reply.pipeline_run_id,
            phases=[p for p in body.phases],
        )
        return json_response(out.model_dump(mode="json"), status=202)

    @app.get("/v1/batches/<batch_id>/files")
    @api("list_files", "files", response=FileList, errors=(*BACKEND_ERRORS, 404, 422))
    @protected
    async def list_files(batch_id: str) -> Response:
        batch_id = batch_id_from_path(batch_id)
        req = files_v1.ListFilesRequest(actor=actor(claims()), batch_id=batch_id)
        with route_budget(budget("list_files")):
            reply = await _call(b.files, "batch", b.file_stub.list_files, req, read=True)
        out = FileList(batch_id=batch_id, files=[FileOut.of(f) for f in reply.files])
        return json_response(out.model_dump(mode="json"))

    @app.get("/v1/batches/<batch_id>/overview")
    @api("get_batch_overview", "batches", response=Overview, errors=(404, 422, 503))
    @protected
    async def batch_overview(batch_id: str) -> Response:
        batch_id = batch_id_from_path(batch_id)
        who = actor(claims())

        async def registration() -> BatchOut:
            req = batches_v1.GetBatchRequest(actor=who, batch_id=batch_id)
            reply = await b.batches.call(b.batch_stub.get_batch, req, idempotent=True)
            return BatchOut.of(_need(reply.batch))

        async def progress() -> BatchProgress | None:
            req = results_v1.GetBatchRequest(actor=who, batch_id=batch_id, include_essays=True)
            try:
                reply = await b.results.call(b.result_stub.get_batch, req, idempotent=True)
            except NotFoundError:
                return None  # registered, but the aggregator has not seen it yet
            return BatchProgress.of(_need(reply.batch))

        async def files() -> list[FileOut]:
            req = files_v1.ListFilesRequest(actor=who, batch_id=batch_id)
            reply = await b.files.call(b.file_stub.list_files, req, idempotent=True)
            return [FileOut.of(f) for f in reply.files]

        parts: dict[Part, Callable[[], Awaitable[Any]]] = {
            "registration": registration,
            "progress": progress,
            "files": files,
        }
        got, missing, errors = await _gather(parts, "batch", budget("batch_overview"))
        not_found = [e for e in errors if isinstance(e, NotFoundError)]
        if not_found and "registration" not in got:
            raise not_found[0]
        if not got:
            raise UnavailableError("no backend answered in time", service="gateway")
        out = Overview(
            batch_id=batch_id,
            registration=got.get("registration"),
            progress=got.get("progress"),
            files=got.get("files"),
            incomplete=missing,
        )
        return json_response(out.model_dump(mode="json"))

    @app.get("/v1/dashboard")
    @api("get_dashboard", "dashboard", response=Dashboard, errors=(503,))
    @protected
    async def dashboard() -> Response:
        who = actor(claims())

        async def summary() -> results_v1.GetDashboardResponse:
            req = results_v1.GetDashboardRequest(actor=who, recent_limit=DASHBOARD_RECENT)
            reply: results_v1.GetDashboardResponse = await b.results.call(
                b.result_stub.get_dashboard, req, idempotent=True
            )
            return reply

        async def registrations() -> list[BatchOut]:
            req = batches_v1.ListBatchesRequest(
                actor=who, page=common_v1.PageRequest(page_size=DASHBOARD_RECENT)
            )
            reply = await b.batches.call(b.batch_stub.list_batches, req, idempotent=True)
            return [BatchOut.of(batch) for batch in reply.batches]

        parts: dict[Part, Callable[[], Awaitable[Any]]] = {
            "summary": summary,
            "registrations": registrations,
        }
        got, missing, _ = await _gather(parts, "dashboard", budget("dashboard"))
        if not got:
            raise UnavailableError("no backend answered in time", service="gateway")
        result: results_v1.GetDashboardResponse | None = got.get("summary")
        out = Dashboard(
            total_batches=result.total_batches if result else None,
            essays_processed=result.essays_processed if result else None,
            counts=(
                {
                    (c.status.name or "unspecified").lower(): c.count
                    for c in result.counts
                    if c.status != results_v1.BatchStatus.UNSPECIFIED
                }
                if result
                else None
            ),
            recent=[BatchSummaryOut.of(s) for s in result.recent] if result else None,
            registrations=got.get("registrations"),
            incomplete=missing,
        )
        return json_response(out.model_dump(mode="json"))
