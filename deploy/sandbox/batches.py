"""The sandbox batch orchestrator: ``huleedu.batches.v1.BatchService`` for development and tests.

Batches live in memory (a restart forgets them). What the contract promises, and how it is
kept here:

* every request names the acting user (``actor.user_id``, INVALID_ARGUMENT when missing); a
  batch belongs to the user who registered it, and another user's batch answers NOT_FOUND
  with the same message as a batch that does not exist (never PERMISSION_DENIED: no
  existence leak);
* ``RegisterBatch`` validates every field (INVALID_ARGUMENT naming it: ``course_code``
  1..32, ``essay_instructions`` 1..10000, ``expected_essay_count`` 1..500 ...), reserves one
  essay slot per expected essay and publishes ``BatchEssaysRegistered`` (topic
  ``huleedu.batch.essays.registered.v1``, keyed by batch id) before answering. With an
  ``idempotency_key`` the batch created first for that user and key is returned and nothing
  is published again. The key is claimed before the event is published, so two concurrent
  retries create one batch; a failed publish releases it (the call fails, nothing exists);
* ``RequestPipeline`` checks the phases (at least one, none UNSPECIFIED or unknown, no
  repeats; the field named is ``phases`` or ``phases.<i>``), then answers
  FAILED_PRECONDITION when the batch has no essays with files yet or a run is going on; an
  accepted request gets a ``pipeline_run_id`` and the :mod:`deploy.sandbox.pipeline`
  simulator plays the run in the server's nursery. A retry with the same ``idempotency_key``
  returns the same run and starts nothing;
* ``ListBatches`` pages the actor's batches newest first (``page_size`` 1..100, 0 means 20)
  with an opaque page token.

The file backend (:mod:`deploy.sandbox.files`) reaches the batches through
:meth:`SandboxBatches.owned` and the slot methods, in the same process.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from common import correlation
from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as events_v1
from common.errors import ConflictError, GrpcStatus, NotFoundError, ValidationError
from common.logs import get_logger
from deploy.sandbox.pipeline import (
    ORCHESTRATOR_SOURCE,
    EventPublisher,
    PipelineRun,
    PipelineSimulator,
)

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_COURSE_CODE_CHARS",
    "MAX_ESSAYS",
    "MAX_INSTRUCTIONS_CHARS",
    "MAX_KEY_CHARS",
    "MAX_PAGE_SIZE",
    "BatchRecord",
    "PreconditionFailedError",
    "SandboxBatches",
    "actor_of",
]

#: Fields the registration event copies from the registered batch.
_REGISTERED_FIELDS = (
    "batch_id",
    "owner_user_id",
    "org_id",
    "course_code",
    "essay_instructions",
    "expected_essay_count",
    "class_id",
)
log = get_logger("deploy.sandbox.batches")

MAX_COURSE_CODE_CHARS = 32
MAX_INSTRUCTIONS_CHARS = 10_000
MAX_ESSAYS = 500
#: Longest class id, idempotency key or batch id accepted, in characters.
MAX_KEY_CHARS = 128
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100

Phase = common_v1.PipelinePhase
_KNOWN_PHASES = frozenset(p for p in Phase if p is not Phase.UNSPECIFIED)


class PreconditionFailedError(ConflictError):
    """The batch is not in a state that allows the request (FAILED_PRECONDITION; 409 at the
    gateway). ``common.errors`` has no class for this status, so it is kept here."""

    code = "failed_precondition"
    grpc_status = GrpcStatus.FAILED_PRECONDITION


def actor_of(actor: common_v1.Actor | None) -> common_v1.Actor:
    """The request's actor; :class:`ValidationError` (``actor.user_id``) when it names none."""
    if actor is None or not actor.user_id:
        raise ValidationError("actor.user_id is required", field="actor.user_id")
    return actor


def _text(value: str, name: str, high: int, *, required: bool = True) -> str:
    if required and not value.strip():
        raise ValidationError(f"{name} is required", field=name)
    if len(value) > high:
        raise ValidationError(f"{name} is longer than {high} characters", field=name)
    return value


def _not_found(batch_id: str) -> NotFoundError:
    # One message whether the batch is missing or someone else's.
    return NotFoundError(f"batch {batch_id} not found", field="batch_id")


@dataclass
class BatchRecord:
    """A registered batch: its message, its essay slots and its pipeline runs."""

    batch: batches_v1.Batch
    seq: int
    #: Slots reserved at registration, in order.
    essay_ids: list[str]
    #: Slots that have a file, in the order they were filled.
    assigned: list[str] = field(default_factory=list)
    running: str | None = None
    runs: dict[str, batches_v1.RequestPipelineResponse] = field(default_factory=dict)

    @property
    def batch_id(self) -> str:
        return self.batch.batch_id

    @property
    def owner(self) -> str:
        return self.batch.owner_user_id

    def free_slots(self) -> int:
        return len(self.essay_ids) - len(self.assigned)


def _copy(batch: batches_v1.Batch) -> batches_v1.Batch:
    # betterproto messages are mutable: callers get their own.
    return batches_v1.Batch.parse(bytes(batch))


class SandboxBatches(batches_v1.BatchServiceBase):
    """The BatchService over in-memory batches; see the module docstring.

    ``spawn(fn)`` starts a background task for a pipeline run (the server passes its
    nursery's ``start_soon``); the run is played by ``simulator``, events go out through
    ``publisher``.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        simulator: PipelineSimulator,
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> None:
        self._publisher = publisher
        self._simulator = simulator
        self._spawn = spawn
        self._batches: dict[str, BatchRecord] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._seq = 0

    # -- for the file backend ------------------------------------------------------------

    def owned(self, user_id: str, batch_id: str) -> BatchRecord:
        """The batch if ``user_id`` owns it; :class:`NotFoundError` otherwise (also when it
        does not exist, with the same message)."""
        if not batch_id:
            raise ValidationError("batch_id is required", field="batch_id")
        record = self._batches.get(batch_id)
        if record is None or record.owner != user_id:
            raise _not_found(batch_id)
        return record

    def assign_slots(self, batch_id: str, count: int) -> list[str]:
        """Fill the next ``count`` free essay slots; raises ``ValueError`` if too few."""
        record = self._batches[batch_id]
        if count > record.free_slots():
            raise ValueError(f"batch {batch_id} has {record.free_slots()} free slots")
        start = len(record.assigned)
        taken = record.essay_ids[start : start + count]
        record.assigned.extend(taken)
        return taken

    def release_slots(self, batch_id: str, essay_ids: Sequence[str]) -> None:
        """Undo :meth:`assign_slots` (an upload whose events could not be published)."""
        record = self._batches[batch_id]
        gone = set(essay_ids)
        record.assigned = [e for e in record.assigned if e not in gone]

    # -- the contract ----------------------------------------------------------------------

    async def register_batch(
        self, message: batches_v1.RegisterBatchRequest
    ) -> batches_v1.RegisterBatchResponse:
        """Create a batch owned by the actor (see the module docstring)."""
        await trio.lowlevel.checkpoint()
        actor = actor_of(message.actor)
        key = _text(message.idempotency_key, "idempotency_key", MAX_KEY_CHARS, required=False)
        if key and (existing := self._keys.get((actor.user_id, key))) is not None:
            return batches_v1.RegisterBatchResponse(batch=_copy(self._batches[existing].batch))
        course = _text(message.course_code, "course_code", MAX_COURSE_CODE_CHARS)
        instructions = _text(
            message.essay_instructions, "essay_instructions", MAX_INSTRUCTIONS_CHARS
        )
        count = message.expected_essay_count
        if not 1 <= count <= MAX_ESSAYS:
            raise ValidationError(
                f"expected_essay_count must be 1..{MAX_ESSAYS}, not {count}",
                field="expected_essay_count",
            )
        class_id = _text(message.class_id, "class_id", MAX_KEY_CHARS, required=False)
        batch_id = str(uuid.uuid4())
        self._seq += 1
        record = BatchRecord(
            batch=batches_v1.Batch(
                batch_id=batch_id,
                owner_user_id=actor.user_id,
                org_id=actor.org_id,
                course_code=course,
                essay_instructions=instructions,
                expected_essay_count=count,
                class_id=class_id,
                created_at=dt.datetime.now(dt.UTC),
            ),
            seq=self._seq,
            essay_ids=[str(uuid.uuid4()) for _ in range(count)],
        )
        # Claimed before the first await: a concurrent retry finds this batch.
        self._batches[batch_id] = record
        if key:
            self._keys[(actor.user_id, key)] = batch_id
        try:
            await self._publisher.publish(
                events_v1.BatchEssaysRegistered(
                    **{name: getattr(record.batch, name) for name in _REGISTERED_FIELDS},
                    essay_ids=list(record.essay_ids),
                ),
                key=batch_id,
                source=ORCHESTRATOR_SOURCE,
                user_id=actor.user_id,
                correlation_id=_correlation(actor),
            )
        except BaseException:
            # Not published, so it never existed (a retry creates it afresh).
            del self._batches[batch_id]
            if key:
                self._keys.pop((actor.user_id, key), None)
            raise
        log.info("batch registered", batch_id=batch_id, user_id=actor.user_id, essays=count)
        return batches_v1.RegisterBatchResponse(batch=_copy(record.batch))

    async def get_batch(self, message: batches_v1.GetBatchRequest) -> batches_v1.GetBatchResponse:
        """The actor's batch ``batch_id``; NOT_FOUND for a missing or foreign one."""
        await trio.lowlevel.checkpoint()
        actor = actor_of(message.actor)
        record = self.owned(actor.user_id, message.batch_id)
        return batches_v1.GetBatchResponse(batch=_copy(record.batch))

    async def list_batches(
        self, message: batches_v1.ListBatchesRequest
    ) -> batches_v1.ListBatchesResponse:
        """One page of the actor's batches, newest first."""
        await trio.lowlevel.checkpoint()
        actor = actor_of(message.actor)
        page = message.page or common_v1.PageRequest()
        size = page.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise ValidationError(
                f"page_size must be 0..{MAX_PAGE_SIZE}, not {page.page_size}",
                field="page.page_size",
            )
        before = _decode_token(page.page_token) if page.page_token else None
        mine = sorted(
            (
                r
                for r in self._batches.values()
                if r.owner == actor.user_id and (before is None or r.seq < before)
            ),
            key=lambda r: r.seq,
            reverse=True,
        )
        shown = mine[:size]
        more = len(mine) > size
        return batches_v1.ListBatchesResponse(
            batches=[_copy(r.batch) for r in shown],
            next_page_token=_encode_token(shown[-1].seq) if more else "",
        )

    async def request_pipeline(
        self, message: batches_v1.RequestPipelineRequest
    ) -> batches_v1.RequestPipelineResponse:
        """Start a pipeline run on the batch's essays (see the module docstring)."""
        await trio.lowlevel.checkpoint()
        actor = actor_of(message.actor)
        record = self.owned(actor.user_id, message.batch_id)
        phases = _phases(message.phases)
        key = _text(message.idempotency_key, "idempotency_key", MAX_KEY_CHARS, required=False)
        if key and key in record.runs:
            return _copy_run(record.runs[key])
        if not record.assigned:
            raise PreconditionFailedError(
                f"batch {record.batch_id} has no essays yet: upload files first",
                field="batch_id",
            )
        if record.running is not None:
            raise PreconditionFailedError(
                f"a pipeline is already running on batch {record.batch_id}", field="batch_id"
            )
        run = PipelineRun(
            batch_id=record.batch_id,
            owner_user_id=record.owner,
            pipeline_run_id=str(uuid.uuid4()),
            phases=tuple(phases),
            essay_ids=tuple(record.assigned),
            correlation_id=_correlation(actor),
        )
        record.running = run.pipeline_run_id
        record.batch.requested_phases = list(phases)
        response = batches_v1.RequestPipelineResponse(
            pipeline_run_id=run.pipeline_run_id, phases=list(phases)
        )
        if key:
            record.runs[key] = response
        self._spawn(lambda: self._play(record, run))
        log.info(
            "pipeline requested",
            batch_id=record.batch_id,
            pipeline_run_id=run.pipeline_run_id,
            phases=[p.name.lower() for p in phases],
        )
        return _copy_run(response)

    async def _play(self, record: BatchRecord, run: PipelineRun) -> None:
        try:
            await self._simulator.run(run)
        except Exception:
            # A bus failure ends the run; the batch must not stay blocked for new requests.
            log.exception("pipeline run failed", pipeline_run_id=run.pipeline_run_id)
        finally:
            if record.running == run.pipeline_run_id:
                record.running = None


def _phases(values: Sequence[Phase]) -> list[Phase]:
    if not values:
        raise ValidationError("phases must name at least one phase", field="phases")
    seen: set[Phase] = set()
    phases: list[Phase] = []
    for i, value in enumerate(values):
        if value not in _KNOWN_PHASES:
            raise ValidationError(
                f"phases[{i}] is not a pipeline phase: {int(value)}", field=f"phases.{i}"
            )
        phase = Phase(value)
        if phase in seen:
            raise ValidationError(f"phases[{i}] repeats {phase.name.lower()}", field=f"phases.{i}")
        seen.add(phase)
        phases.append(phase)
    return phases


def _copy_run(response: batches_v1.RequestPipelineResponse) -> batches_v1.RequestPipelineResponse:
    return batches_v1.RequestPipelineResponse.parse(bytes(response))


def _correlation(actor: common_v1.Actor) -> str:
    # The actor's id only when well-formed: client input is never echoed blindly.
    return (
        correlation.parse_correlation_id(actor.correlation_id or None)
        or correlation.current_correlation_id()
        or correlation.new_correlation_id()
    )


def _encode_token(seq: int) -> str:
    return base64.urlsafe_b64encode(f"b:{seq}".encode()).decode().rstrip("=")


def _decode_token(token: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        prefix, _, number = raw.partition(":")
        if prefix != "b" or not number.isdigit():
            raise ValueError(raw)
        return int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ValidationError("page_token is not valid", field="page.page_token") from None
