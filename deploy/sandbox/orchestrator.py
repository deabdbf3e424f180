"""The sandbox batch orchestrator: ``huleedu.batches.v1.BatchService`` for development and tests.

Batches live in memory. What the contract promises, and how it is kept here:

* every request names the acting user; a batch belongs to the user who registered it, and
  another user's batch answers NOT_FOUND (never PERMISSION_DENIED: no existence leak);
* ``RegisterBatch`` validates every field (INVALID_ARGUMENT naming it) and, with an
  ``idempotency_key``, returns the batch created the first time for that user and key; it
  publishes ``BatchEssaysRegistered`` (the aggregator's first fact about the batch);
* ``RequestPipeline`` needs essays (the file backend reports them through
  :meth:`SandboxBatches.essays_registered`) and no pipeline running (else FAILED_PRECONDITION,
  as :class:`~common.errors.ConflictError`); a retry with the same key returns the same run;
  the run itself is the :mod:`deploy.sandbox.simulator`'s, started in the servicer's nursery;
* ``ListBatches`` pages the user's batches newest first with an opaque page token.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as events_v1
from common.errors import ConflictError, NotFoundError, ValidationError
from common.events import EventEnvelope, make_envelope
from common.logs import get_logger

__all__ = ["Essay", "Publish", "SandboxBatches"]

log = get_logger("sandbox.batches")

#: Publishes one envelope (keyed by its batch) on the event bus.
Publish = Callable[[EventEnvelope, str], Awaitable[None]]
#: Runs a pipeline: (batch, run id, phases, essays, correlation id).
RunPipeline = Callable[
    ["_Batch", str, list[common_v1.PipelinePhase], list["Essay"], str], Awaitable[None]
]
SOURCE = "sandbox-batch-orchestrator"
DEFAULT_PAGE = 20


@dataclass(frozen=True, slots=True)
class Essay:
    essay_id: str
    filename: str
    file_id: str


@dataclass
class _Batch:
    batch: batches_v1.Batch
    essays: list[Essay] = field(default_factory=list)
    running: str | None = None
    runs: dict[str, batches_v1.RequestPipelineResponse] = field(default_factory=dict)
    order: int = 0


def _user(actor: common_v1.Actor | None) -> common_v1.Actor:
    if actor is None or not actor.user_id:
        raise ValidationError("actor.user_id is required", field="actor.user_id")
    return actor


def _text(value: str, name: str, low: int, high: int) -> str:
    if not low <= len(value) <= high:
        raise ValidationError(f"{name} must be {low}..{high} characters", field=name)
    if any(ord(c) < 32 and c not in "\n\t\r" for c in value):
        raise ValidationError(f"{name} holds control characters", field=name)
    return value


class SandboxBatches(batches_v1.BatchServiceBase):
    """In-memory batches; ``run_pipeline`` is started in ``nursery`` for each accepted run."""

    def __init__(
        self,
        publish: Publish,
        run_pipeline: RunPipeline,
        nursery: trio.Nursery,
        *,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._publish = publish
        self._run_pipeline = run_pipeline
        self._nursery = nursery
        self._now = now
        self._batches: dict[str, _Batch] = {}
        self._by_key: dict[tuple[str, str], str] = {}
        self._count = 0

    def _owned(self, actor: common_v1.Actor, batch_id: str) -> _Batch:
        found = self._batches.get(batch_id)
        if found is None or found.batch.owner_user_id != actor.user_id:
            raise NotFoundError("batch not found", field="batch_id")
        return found

    async def register_batch(
        self, message: batches_v1.RegisterBatchRequest
    ) -> batches_v1.RegisterBatchResponse:
        actor = _user(message.actor)
        course = _text(message.course_code, "course_code", 1, 32)
        instructions = _text(message.essay_instructions, "essay_instructions", 1, 10_000)
        if not 1 <= message.expected_essay_count <= 500:
            raise ValidationError(
                "expected_essay_count must be 1..500", field="expected_essay_count"
            )
        if len(message.class_id) > 64:
            raise ValidationError("class_id must be at most 64 characters", field="class_id")
        if len(message.idempotency_key) > 128:
            raise ValidationError(
                "idempotency_key: at most 128 characters", field="idempotency_key"
            )
        key = (actor.user_id, message.idempotency_key)
        if message.idempotency_key and key in self._by_key:
            return batches_v1.RegisterBatchResponse(batch=self._batches[self._by_key[key]].batch)
        batch = batches_v1.Batch(
            batch_id=str(uuid.uuid4()),
            owner_user_id=actor.user_id,
            org_id=actor.org_id,
            course_code=course,
            essay_instructions=instructions,
            expected_essay_count=message.expected_essay_count,
            class_id=message.class_id,
            created_at=self._now(),
        )
        self._count += 1
        self._batches[batch.batch_id] = _Batch(batch, order=self._count)
        if message.idempotency_key:
            self._by_key[key] = batch.batch_id
        await self._publish(
            make_envelope(
                events_v1.BatchEssaysRegistered(
                    batch_id=batch.batch_id,
                    owner_user_id=actor.user_id,
                    org_id=actor.org_id,
                    course_code=course,
                    essay_instructions=instructions,
                    expected_essay_count=message.expected_essay_count,
                    class_id=message.class_id,
                ),
                source_service=SOURCE,
                user_id=actor.user_id,
                correlation_id=actor.correlation_id,
            ),
            batch.batch_id,
        )
        log.info("batch registered", batch_id=batch.batch_id, course_code=course)
        return batches_v1.RegisterBatchResponse(batch=batch)

    async def get_batch(self, message: batches_v1.GetBatchRequest) -> batches_v1.GetBatchResponse:
        return batches_v1.GetBatchResponse(
            batch=self._owned(_user(message.actor), message.batch_id).batch
        )

    async def list_batches(
        self, message: batches_v1.ListBatchesRequest
    ) -> batches_v1.ListBatchesResponse:
        actor = _user(message.actor)
        page = message.page or common_v1.PageRequest()
        size = page.page_size or DEFAULT_PAGE
        if not 1 <= size <= 100:
            raise ValidationError("page_size must be 0..100", field="page.page_size")
        start = 0
        if page.page_token:
            try:
                start = int(base64.urlsafe_b64decode(page.page_token.encode()).decode())
            except ValueError:
                raise ValidationError("page_token is not valid", field="page.page_token") from None
        mine = sorted(
            (b for b in self._batches.values() if b.batch.owner_user_id == actor.user_id),
            key=lambda b: -b.order,
        )
        chunk = mine[start : start + size]
        more = start + size < len(mine)
        token = base64.urlsafe_b64encode(str(start + size).encode()).decode() if more else ""
        return batches_v1.ListBatchesResponse(
            batches=[b.batch for b in chunk], next_page_token=token
        )

    async def request_pipeline(
        self, message: batches_v1.RequestPipelineRequest
    ) -> batches_v1.RequestPipelineResponse:
        actor = _user(message.actor)
        phases = list(message.phases)
        if not phases:
            raise ValidationError("at least one phase is required", field="phases")
        if common_v1.PipelinePhase.UNSPECIFIED in phases:
            raise ValidationError("phases must not hold UNSPECIFIED", field="phases")
        if len(set(phases)) != len(phases):
            raise ValidationError("phases must not repeat", field="phases")
        entry = self._owned(actor, message.batch_id)
        if message.idempotency_key and message.idempotency_key in entry.runs:
            return entry.runs[message.idempotency_key]
        if not entry.essays:
            raise ConflictError("the batch has no essays yet; upload files first")
        if entry.running is not None:
            raise ConflictError("a pipeline is already running on this batch")
        run_id = str(uuid.uuid4())
        entry.running = run_id
        entry.batch.requested_phases = phases
        reply = batches_v1.RequestPipelineResponse(pipeline_run_id=run_id, phases=phases)
        if message.idempotency_key:
            entry.runs[message.idempotency_key] = reply
        essays = list(entry.essays)

        async def run() -> None:
            try:
                await self._run_pipeline(entry, run_id, phases, essays, actor.correlation_id)
            finally:
                entry.running = None

        self._nursery.start_soon(run)
        log.info("pipeline accepted", batch_id=message.batch_id, run_id=run_id)
        return reply

    def owner_of(self, user_id: str, batch_id: str) -> bool:
        found = self._batches.get(batch_id)
        return found is not None and found.batch.owner_user_id == user_id

    def expected_essays(self, batch_id: str) -> int:
        return self._batches[batch_id].batch.expected_essay_count

    def essays_registered(self, batch_id: str, essays: list[Essay]) -> None:
        """The file backend registered ``essays`` for ``batch_id`` (an upload completed)."""
        self._batches[batch_id].essays.extend(essays)
