"""Builders of realistic result events for aggregator tests."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid

from common.bus import Record
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as ev
from common.events import EventEnvelope, envelope_headers, make_envelope

Phase = common_v1.PipelinePhase
T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
_ids = itertools.count()


def envelope(payload: object, seconds: float, owner: str = "teacher-1") -> EventEnvelope:
    return make_envelope(
        payload,  # type: ignore[arg-type]
        source_service="test",
        user_id=owner,
        # Globally unique like real event ids: a persistent broker keeps earlier runs' events.
        event_id=f"ev-{next(_ids)}-{uuid.uuid4().hex[:12]}",
        occurred_at=T0 + dt.timedelta(seconds=seconds),
    )


def registered(
    batch: str, owner: str = "teacher-1", n: int = 3, at: float = 0, course: str = "ENG5"
) -> EventEnvelope:
    return envelope(
        ev.BatchEssaysRegistered(
            batch_id=batch,
            owner_user_id=owner,
            org_id="org-1",
            course_code=course,
            essay_instructions="Write about winter.",
            expected_essay_count=n,
            essay_ids=[f"{batch}-e{i}" for i in range(n)],
        ),
        at,
        owner,
    )


def slot(batch: str, i: int, at: float) -> EventEnvelope:
    return envelope(
        ev.EssaySlotAssigned(
            batch_id=batch,
            essay_id=f"{batch}-e{i}",
            file_id=f"f{i}",
            filename=f"essay-{i}.docx",
            text_storage_id=f"t{i}",
        ),
        at,
    )


def spellcheck(
    batch: str, i: int, at: float, ok: bool = True, corrections: int = 2
) -> EventEnvelope:
    return envelope(
        ev.SpellcheckResult(
            batch_id=batch,
            essay_id=f"{batch}-e{i}",
            outcome=ev.EssayPhaseOutcome.SUCCEEDED if ok else ev.EssayPhaseOutcome.FAILED,
            corrections_count=corrections if ok else 0,
            error="" if ok else "unreadable",
        ),
        at,
    )


def phase_outcome(
    batch: str,
    phase: Phase,
    ok_ids: list[int],
    failed_ids: list[int],
    at: float,
    pipeline: tuple[Phase, ...],
) -> EventEnvelope:
    return envelope(
        ev.BatchPhaseOutcome(
            batch_id=batch,
            phase=phase,
            outcome=ev.PhaseOutcome.PARTIAL if failed_ids else ev.PhaseOutcome.SUCCEEDED,
            succeeded_essay_ids=[f"{batch}-e{i}" for i in ok_ids],
            failed_essay_ids=[f"{batch}-e{i}" for i in failed_ids],
            pipeline_phases=list(pipeline),
            pipeline_run_id="run-1",
        ),
        at,
    )


def assessment(batch: str, ranks: dict[int, int], at: float) -> EventEnvelope:
    return envelope(
        ev.AssessmentResultPublished(
            batch_id=batch,
            assessment_job_id="cj-1",
            rankings=[
                ev.EssayAssessment(
                    essay_id=f"{batch}-e{i}", rank=r, score=1.0 / r, grade="AB"[r % 2]
                )
                for i, r in ranks.items()
            ],
        ),
        at,
    )


def completed(
    batch: str, at: float, final: ev.FinalStatus, phases: tuple[Phase, ...]
) -> EventEnvelope:
    return envelope(
        ev.BatchPipelineCompleted(
            batch_id=batch,
            pipeline_run_id="run-1",
            completed_phases=list(phases),
            final_status=final,
            successful_essay_count=3,
        ),
        at,
    )


PIPELINE = (Phase.SPELLCHECK, Phase.CJ_ASSESSMENT)


def full_run(batch: str, owner: str = "teacher-1", *, final: bool = True) -> list[EventEnvelope]:
    """A whole batch: registration, 3 essays, spellcheck, CJ, completion."""
    events = [registered(batch, owner, 3, 0)]
    events += [slot(batch, i, 1 + i) for i in range(3)]
    events += [spellcheck(batch, i, 10 + i, corrections=i) for i in range(3)]
    events.append(phase_outcome(batch, Phase.SPELLCHECK, [0, 1, 2], [], 20, PIPELINE))
    events.append(assessment(batch, {0: 2, 1: 1, 2: 3}, 30))
    events.append(phase_outcome(batch, Phase.CJ_ASSESSMENT, [0, 1, 2], [], 31, PIPELINE))
    if final:
        events.append(completed(batch, 40, ev.FinalStatus.COMPLETED_SUCCESSFULLY, PIPELINE))
    for e in events:
        e.user_id = owner
    return events


def as_records(
    envelopes: list[EventEnvelope], offsets: dict[str, int] | None = None
) -> list[Record]:
    """Bus records for ``envelopes`` (partition 0 of each topic). Pass the same ``offsets``
    dict across calls to keep offsets rising, as a store applying several batches needs."""
    offsets = {} if offsets is None else offsets
    out = []
    for e in envelopes:
        offset = offsets.get(e.event_type, 0)
        offsets[e.event_type] = offset + 1
        out.append(Record(e.event_type, 0, offset, b"k", bytes(e), tuple(envelope_headers(e))))
    return out
