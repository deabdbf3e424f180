"""The sans-IO core of the aggregator: folding result events into a batch's state.

A batch's state is a *set of facts* (registration metadata, essay slots, per-essay phase
results, phase outcomes, the pipeline's final word), each fact kept as the latest by
``(occurred_at, event_id)``. Status, current phase and progress are *derived* from the facts,
never accumulated step by step, so applying any permutation of the same events - with any
duplicates - gives the same view (the store also deduplicates by ``event_id``).

Status model::

    REGISTERED -> AWAITING_CONTENT -> READY -> PROCESSING(current phase)
        -> COMPLETED_SUCCESSFULLY | COMPLETED_WITH_FAILURES | FAILED | CANCELLED

A batch completes when every requested phase is finished for every received essay, or when
the batch backend's ``BatchPipelineCompleted`` says so (authoritative: its final status wins).
Essays may arrive before their batch: they are kept and linked when the registration lands.
Events that make no sense (a result for a phase the pipeline does not have, an assessment of
an unknown essay) are kept as *anomalies* beside the view and do not change it.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as events_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.events import EventEnvelope, PbEnvelope

__all__ = [
    "BatchState",
    "Change",
    "Derived",
    "apply_event",
    "as_pb",
    "batch_id_of",
    "derive",
    "essays_finished",
    "fold_event",
    "to_batch_summary",
    "to_batch_view",
]

Phase = common_v1.PipelinePhase
Status = results_v1.BatchStatus
PhaseStatus = results_v1.PhaseStatus
_TERMINAL_PHASE = (PhaseStatus.SUCCEEDED, PhaseStatus.FAILED, PhaseStatus.SKIPPED)
_FINAL = {
    events_v1.FinalStatus.COMPLETED_SUCCESSFULLY: Status.COMPLETED_SUCCESSFULLY,
    events_v1.FinalStatus.COMPLETED_WITH_FAILURES: Status.COMPLETED_WITH_FAILURES,
    events_v1.FinalStatus.FAILED: Status.FAILED,
    events_v1.FinalStatus.CANCELLED: Status.CANCELLED,
}
_DONE = frozenset(_FINAL.values())

# A fact's stamp: later (occurred_at, event_id) wins, whatever the arrival order.
Stamp = tuple[str, str]


def as_pb(envelope: Any) -> Any:
    """The upb form of ``envelope`` (the store passes upb already; tests pass betterproto2)."""
    if isinstance(envelope, EventEnvelope):
        return PbEnvelope.FromString(bytes(envelope))
    return envelope


def _stamp(envelope: Any) -> Stamp:
    at = (
        envelope.occurred_at.ToDatetime(tzinfo=dt.UTC)
        if envelope.HasField("occurred_at")
        else dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    )
    return (at.astimezone(dt.UTC).isoformat(), envelope.event_id)


def _newer(a: Stamp | None, b: Stamp) -> bool:
    return a is None or b > a


@dataclass
class BatchState:
    """Everything known about one batch (JSON-serialisable; see :meth:`to_json`)."""

    batch_id: str
    registered: bool = False
    owner_user_id: str = ""
    org_id: str = ""
    course_code: str = ""
    expected_essay_count: int = 0
    meta_stamp: Stamp | None = None
    #: essay_id -> {"filename", "file_id", "stamp"}
    slots: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: f"{essay_id}|{phase}" -> {"status", "error", "stamp", extra result fields}
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: str(phase) -> {"outcome", "stamp"}
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    pipeline: list[int] = field(default_factory=list)
    pipeline_stamp: Stamp | None = None
    final: dict[str, Any] | None = None
    created_at: str = ""
    updated_at: str = ""
    version: int = 0

    def to_json(self) -> str:
        # Every field is already JSON-ready; asdict's deep copy is the slow part.
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> BatchState:
        raw = json.loads(text)
        for key in ("meta_stamp", "pipeline_stamp"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        for bucket in ("slots", "results", "outcomes"):
            for value in raw.get(bucket, {}).values():
                value["stamp"] = tuple(value["stamp"])
                if value.get("detail_stamp") is not None:
                    value["detail_stamp"] = tuple(value["detail_stamp"])
        if raw.get("final") is not None:
            raw["final"]["stamp"] = tuple(raw["final"]["stamp"])
        return cls(**raw)


@dataclass(frozen=True, slots=True)
class Change:
    """What applying one event did to a batch's derived view."""

    before: Derived
    after: Derived
    #: Why parts of the event were ignored or look wrong (kept beside the view, not in it).
    notes: tuple[str, ...] = ()

    @property
    def visible(self) -> bool:
        return self.before != self.after

    @property
    def completed_now(self) -> bool:
        return self.after.status in _DONE and self.before.status not in _DONE


@dataclass(frozen=True, slots=True)
class Derived:
    status: Status
    current_phase: Phase
    essays_received: int
    progress: tuple[tuple[int, int, int, int, int], ...]  # (phase, status, total, ok, failed)


def _set_result(
    state: BatchState,
    essay_id: str,
    phase: Phase,
    stamp: Stamp,
    *,
    status: int,
    error: str,
    notes: list[str],
    details: dict[str, Any] | None = None,
) -> None:
    """Record a phase result; status and details are separate facts, each latest-wins.

    A phase outcome listing an essay as succeeded must not wipe the corrections count or the
    CJ rank that the per-essay result carried.
    """
    key = f"{essay_id}|{int(phase)}"
    current = state.results.get(key)
    if current is None:
        current = state.results[key] = {"stamp": stamp, "status": status, "error": error}
    elif _newer(tuple(current["stamp"]), stamp):
        current.update(stamp=stamp, status=status, error=error)
    else:
        notes.append(f"older {phase.name.lower()} result for essay {essay_id} ignored")
    if details is not None:
        detail_stamp = current.get("detail_stamp")
        if _newer(tuple(detail_stamp) if detail_stamp else None, stamp):
            current.update(details, detail_stamp=stamp)


def _touch(state: BatchState, stamp: Stamp) -> None:
    state.version += 1
    state.updated_at = max(state.updated_at, stamp[0])


def apply_event(state: BatchState, envelope: Any) -> Change:
    """Fold one (already deduplicated) event into ``state``; returns the view change."""
    before = derive(state)
    notes = fold_event(state, envelope)
    return Change(before, derive(state), notes)


def fold_event(state: BatchState, envelope: Any) -> tuple[str, ...]:
    """Fold one (already deduplicated) event into ``state``; returns anomaly notes.

    The cheap core of :func:`apply_event`: a caller folding many events derives the view
    only where it needs it.
    """
    envelope = as_pb(envelope)
    stamp = _stamp(envelope)
    kind = envelope.WhichOneof("payload")
    payload: Any = getattr(envelope, kind) if kind else None
    notes: list[str] = []
    if kind == "batch_essays_registered":
        if not _newer(state.meta_stamp, stamp):
            notes.append("older registration metadata ignored")
        else:
            state.registered = True
            state.owner_user_id = payload.owner_user_id
            state.org_id = payload.org_id
            state.course_code = payload.course_code
            state.expected_essay_count = payload.expected_essay_count
            state.meta_stamp = stamp
        state.created_at = min(state.created_at or stamp[0], stamp[0])
    elif kind == "essay_slot_assigned":
        current = state.slots.get(payload.essay_id)
        if _newer(tuple(current["stamp"]) if current else None, stamp):
            state.slots[payload.essay_id] = {
                "stamp": stamp,
                "filename": payload.filename,
                "file_id": payload.file_id,
            }
    elif kind == "spellcheck_result":
        ok = payload.outcome == events_v1.EssayPhaseOutcome.SUCCEEDED
        _set_result(
            state,
            payload.essay_id,
            Phase.SPELLCHECK,
            stamp,
            status=int(PhaseStatus.SUCCEEDED if ok else PhaseStatus.FAILED),
            notes=notes,
            error="" if ok else payload.error,
            details={"corrections": payload.corrections_count if ok else None},
        )
    elif kind == "assessment_result_published":
        for ranking in payload.rankings:
            _set_result(
                state,
                ranking.essay_id,
                Phase.CJ_ASSESSMENT,
                stamp,
                status=int(PhaseStatus.SUCCEEDED),
                notes=notes,
                error="",
                details={"rank": ranking.rank, "score": ranking.score, "grade": ranking.grade},
            )
        for essay_id in payload.failed_essay_ids:
            _set_result(
                state,
                essay_id,
                Phase.CJ_ASSESSMENT,
                stamp,
                status=int(PhaseStatus.FAILED),
                notes=notes,
                error="assessment failed",
            )
    elif kind == "batch_phase_outcome":
        key = str(int(payload.phase))
        if _newer(tuple(state.outcomes[key]["stamp"]) if key in state.outcomes else None, stamp):
            state.outcomes[key] = {"stamp": stamp, "outcome": int(payload.outcome)}
        for essay_id in payload.succeeded_essay_ids:
            _set_result(
                state,
                essay_id,
                Phase(payload.phase),
                stamp,
                status=int(PhaseStatus.SUCCEEDED),
                notes=notes,
                error="",
            )
        for essay_id in payload.failed_essay_ids:
            _set_result(
                state,
                essay_id,
                Phase(payload.phase),
                stamp,
                status=int(PhaseStatus.FAILED),
                error="phase failed",
                notes=notes,
            )
        if payload.pipeline_phases and _newer(state.pipeline_stamp, stamp):
            state.pipeline = [int(p) for p in payload.pipeline_phases]
            state.pipeline_stamp = stamp
    elif kind == "batch_pipeline_completed":
        if _newer(tuple(state.final["stamp"]) if state.final else None, stamp):
            state.final = {"stamp": stamp, "final_status": int(payload.final_status)}
        if payload.completed_phases and _newer(state.pipeline_stamp, stamp):
            state.pipeline = [int(p) for p in payload.completed_phases]
            state.pipeline_stamp = stamp
    if (
        state.final is not None
        and kind != "batch_pipeline_completed"
        and stamp > tuple(state.final["stamp"])
    ):
        notes.append("event arrived after the pipeline completed")
    _touch(state, stamp)
    return tuple(notes)


def _essay_ids(state: BatchState) -> list[str]:
    """Received essays in a stable order (slot stamp, then id)."""
    return sorted(state.slots, key=lambda e: (tuple(state.slots[e]["stamp"]), e))


def _phase_status(state: BatchState, phase: int, essays: list[str]) -> tuple[int, int, int, int]:
    ok = failed = 0
    for essay_id in essays:
        result = state.results.get(f"{essay_id}|{phase}")
        if result is None:
            continue
        if result["status"] == int(PhaseStatus.SUCCEEDED):
            ok += 1
        elif result["status"] == int(PhaseStatus.FAILED):
            failed += 1
    total = max(len(essays), 0)
    outcome = state.outcomes.get(str(phase), {}).get("outcome")
    if outcome == int(events_v1.PhaseOutcome.FAILED):
        status = PhaseStatus.FAILED
    elif outcome is not None or (total and ok + failed >= total):
        status = PhaseStatus.SUCCEEDED if failed < total or not total else PhaseStatus.FAILED
    elif ok + failed:
        status = PhaseStatus.IN_PROGRESS
    else:
        status = PhaseStatus.PENDING
    return int(status), total, ok, failed


def _phases_seen(state: BatchState) -> list[int]:
    """The phases any result or outcome arrived for, in pipeline order."""
    seen = {int(key.rsplit("|", 1)[1]) for key in state.results}
    seen.update(int(key) for key in state.outcomes)
    return sorted(seen)


def derive(state: BatchState) -> Derived:
    """The view-level facts (status, phase, progress) implied by ``state``."""
    essays = _essay_ids(state)
    # Until a phase outcome names the pipeline, the phases results arrived for show progress
    # (the teacher sees the first phase advance), but cannot complete the batch.
    phases = state.pipeline or _phases_seen(state)
    progress = tuple((phase, *_phase_status(state, phase, essays)) for phase in phases)
    current = Phase.UNSPECIFIED
    if state.final is not None:
        status = _FINAL.get(
            events_v1.FinalStatus(state.final["final_status"]), Status.COMPLETED_WITH_FAILURES
        )
    elif (
        state.pipeline
        and progress
        and all(p[1] in map(int, _TERMINAL_PHASE) for p in progress)
        and essays
    ):
        failed_any = any(p[4] for p in progress)
        all_failed = all(p[1] == int(PhaseStatus.FAILED) for p in progress)
        status = (
            Status.FAILED
            if all_failed
            else Status.COMPLETED_WITH_FAILURES
            if failed_any
            else Status.COMPLETED_SUCCESSFULLY
        )
    elif state.results or state.outcomes or state.pipeline:
        status = Status.PROCESSING
        pending = [p for p in progress if p[1] not in map(int, _TERMINAL_PHASE)]
        if pending:
            current = Phase(pending[0][0])
        elif phases:
            current = Phase(phases[-1])
    elif not essays:
        status = Status.REGISTERED
    elif len(essays) < state.expected_essay_count:
        status = Status.AWAITING_CONTENT
    else:
        status = Status.READY
    return Derived(status, current, len(essays), progress)


def _timestamp(value: str) -> dt.datetime | None:
    return dt.datetime.fromisoformat(value) if value else None


def to_batch_summary(state: BatchState) -> results_v1.BatchSummary:
    derived = derive(state)
    return results_v1.BatchSummary(
        batch_id=state.batch_id,
        course_code=state.course_code,
        status=derived.status,
        current_phase=derived.current_phase,
        expected_essay_count=state.expected_essay_count,
        essays_received=derived.essays_received,
        created_at=_timestamp(state.created_at),
        updated_at=_timestamp(state.updated_at),
    )


def to_batch_view(state: BatchState, *, include_essays: bool) -> results_v1.BatchView:
    derived = derive(state)
    view = results_v1.BatchView(
        batch_id=state.batch_id,
        owner_user_id=state.owner_user_id,
        course_code=state.course_code,
        status=derived.status,
        current_phase=derived.current_phase,
        requested_phases=[Phase(p) for p in state.pipeline],
        expected_essay_count=state.expected_essay_count,
        essays_received=derived.essays_received,
        phases=[
            results_v1.PhaseProgress(
                phase=Phase(p),
                status=PhaseStatus(s),
                essays_total=t,
                essays_succeeded=ok,
                essays_failed=f,
            )
            for p, s, t, ok, f in derived.progress
        ],
        created_at=_timestamp(state.created_at),
        updated_at=_timestamp(state.updated_at),
        completed_at=_timestamp(state.updated_at) if derived.status in _DONE else None,
        version=state.version,
    )
    if include_essays:
        view.essays = [_essay_view(state, essay_id) for essay_id in _essay_ids(state)]
    return view


def _essay_view(state: BatchState, essay_id: str) -> results_v1.EssayResult:
    essay = results_v1.EssayResult(essay_id=essay_id, filename=state.slots[essay_id]["filename"])
    for phase in state.pipeline:
        result = state.results.get(f"{essay_id}|{phase}")
        status = PhaseStatus(result["status"]) if result else PhaseStatus.PENDING
        essay.phases.append(
            results_v1.EssayPhaseResult(
                phase=Phase(phase), status=status, error=result["error"] if result else ""
            )
        )
    spell = state.results.get(f"{essay_id}|{int(Phase.SPELLCHECK)}")
    if spell is not None and spell.get("corrections") is not None:
        essay.spellcheck_corrections = spell["corrections"]
    cj = state.results.get(f"{essay_id}|{int(Phase.CJ_ASSESSMENT)}")
    if cj is not None and cj.get("rank") is not None:
        essay.cj_rank = cj["rank"]
        essay.cj_score = cj["score"]
        essay.cj_grade = cj.get("grade", "")
    return essay


def essays_finished(state: BatchState) -> int:
    """Received essays whose every requested phase has a terminal result."""
    if not state.pipeline:
        return 0
    terminal = {int(s) for s in _TERMINAL_PHASE}
    return sum(
        1
        for essay in state.slots
        if all(
            state.results.get(f"{essay}|{p}", {}).get("status") in terminal for p in state.pipeline
        )
    )


def batch_id_of(envelope: Any) -> str:
    """The batch an event belongs to (every result payload names one)."""
    envelope = as_pb(envelope)
    kind = envelope.WhichOneof("payload")
    value = getattr(getattr(envelope, kind), "batch_id", "") if kind else ""
    return value if isinstance(value, str) else ""
