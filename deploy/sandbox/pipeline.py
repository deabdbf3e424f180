"""The sandbox pipeline simulator, and the event publisher the sandbox backends share.

After ``BatchService.RequestPipeline`` the simulator plays the processing services of the
platform for one run: for each requested phase, in order,

* it waits ``phase_delay_s`` (the phase being queued and started), then ``essay_delay_s`` per
  essay (the work), each essay failing with probability ``failure_rate`` (drawn from a
  :class:`random.Random` seeded from ``seed``, so a seeded run is the same every time);
* it publishes the phase's per-essay results: one ``SpellcheckResult`` per essay (with a
  corrections count) for spellcheck, one ``AssessmentResultPublished`` with rank, score and
  grade of every assessed essay for CJ assessment; the other phases have no per-essay result
  event in the contract, so for them the outcome alone carries the essays;
* then the ``BatchPhaseOutcome`` (SUCCEEDED, PARTIAL or FAILED) listing the essays;

and finally ``BatchPipelineCompleted`` with the run's final status. An essay that failed a
phase is reported failed in every later phase (the platform does not process it further); a
phase in which every essay failed ends the run with ``FAILED`` and later phases do not run.

Every event is keyed by the batch id and carries the run's correlation id and the batch
owner's user id in its envelope. The simulator publishes no teacher notifications: the
aggregator already turns these results into ``batch_status_changed`` /
``batch_results_ready`` notifications, and a second source would show the teacher every
transition twice.

All waiting is ``trio.sleep``, so under ``trio.testing.MockClock`` a run takes no real time.
Envelope timestamps come from :class:`TrioWallClock`: wall time at the first event plus the
Trio clock's progress since, strictly increasing, so the aggregator's latest-wins ordering of
facts matches the order of publication on a virtual clock too.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
import trio
from pydantic import Field

from common import correlation
from common.bus import EventBus
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as events_v1
from common.events import EventEnvelope, Payload, envelope_headers, make_envelope
from common.logs import get_logger
from common.tracing import inject_kafka_headers

__all__ = [
    "GRADES",
    "LIFECYCLE_SOURCE",
    "ORCHESTRATOR_SOURCE",
    "PHASE_SOURCES",
    "EventPublisher",
    "PipelineRun",
    "PipelineSettings",
    "PipelineSimulator",
    "RunSummary",
    "TrioWallClock",
]

log = get_logger("deploy.sandbox.pipeline")

Phase = common_v1.PipelinePhase

#: The platform service each phase's events come from (``source_service`` of the envelope).
PHASE_SOURCES: dict[Phase, str] = {
    Phase.SPELLCHECK: "sandbox-spellchecker",
    Phase.CJ_ASSESSMENT: "sandbox-cj-assessment",
    Phase.NLP: "sandbox-nlp",
    Phase.AI_FEEDBACK: "sandbox-ai-feedback",
    Phase.STUDENT_MATCHING: "sandbox-student-matching",
}
#: Phase outcomes come from the essay lifecycle, the run's end from the batch orchestrator.
LIFECYCLE_SOURCE = "sandbox-essay-lifecycle"
ORCHESTRATOR_SOURCE = "sandbox-batch-orchestrator"
#: Grades handed out by CJ rank, best first, in equal bands of the ranked essays.
GRADES = "ABCDEF"


class PipelineSettings(pydantic.BaseModel):
    """How the simulator behaves. Durations in seconds; ``failure_rate`` is the chance that
    one essay fails one phase; ``seed`` makes the failures and the results reproducible
    (None: a fresh seed per simulator)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    essay_delay_s: float = Field(default=0.05, ge=0, le=600)
    phase_delay_s: float = Field(default=0.05, ge=0, le=3600)
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = None


class TrioWallClock:
    """Wall-clock timestamps that advance with the Trio clock (virtual under ``MockClock``).

    Anchored at the first call; every later value is the anchor plus the Trio time elapsed,
    and at least one microsecond after the previous value, so timestamps are unique and in
    the order they were taken.
    """

    def __init__(self) -> None:
        self._anchor: tuple[dt.datetime, float] | None = None
        self._last: dt.datetime | None = None

    def now(self) -> dt.datetime:
        if self._anchor is None:
            self._anchor = (dt.datetime.now(dt.UTC), trio.current_time())
        wall, start = self._anchor
        value = wall + dt.timedelta(seconds=trio.current_time() - start)
        if self._last is not None and value <= self._last:
            value = self._last + dt.timedelta(microseconds=1)
        self._last = value
        return value


class EventPublisher:
    """Builds envelopes and publishes them on ``bus`` (waiting for the acknowledgement).

    Raises :class:`~common.errors.PublishError` when the bus does not take a record. The
    envelope's correlation id is the caller's (or the one bound for the current request);
    the trace context of the current span travels in the ``traceparent`` header.
    """

    def __init__(self, bus: EventBus, *, clock: TrioWallClock | None = None) -> None:
        self._bus = bus
        self._clock = clock or TrioWallClock()
        self.published = 0

    def envelope(
        self, payload: Payload, *, source: str, user_id: str, correlation_id: str = ""
    ) -> EventEnvelope:
        return make_envelope(
            payload,
            source_service=source,
            user_id=user_id,
            correlation_id=correlation_id or correlation.current_correlation_id() or "",
            occurred_at=self._clock.now(),
        )

    async def publish(
        self,
        payload: Payload,
        *,
        key: str,
        source: str,
        user_id: str,
        correlation_id: str = "",
    ) -> EventEnvelope:
        """Publish one event keyed by ``key`` (a batch id, or a user id for notifications)."""
        envelope = self.envelope(
            payload, source=source, user_id=user_id, correlation_id=correlation_id
        )
        await self.publish_envelopes([(key, envelope)])
        return envelope

    async def publish_envelopes(self, keyed: Sequence[tuple[str, EventEnvelope]]) -> None:
        """Publish ``(key, envelope)`` pairs in one go (all acknowledged, or an error)."""
        records = [
            (
                envelope.event_type,
                key.encode(),
                bytes(envelope),
                inject_kafka_headers(envelope_headers(envelope)),
            )
            for key, envelope in keyed
        ]
        await self._bus.publish_many(records)
        self.published += len(records)

    def teacher_notification(
        self,
        *,
        teacher_id: str,
        notification_type: str,
        category: events_v1.NotificationCategory,
        batch_id: str,
        data: dict[str, Any],
        source: str,
        correlation_id: str = "",
        priority: events_v1.NotificationPriority = events_v1.NotificationPriority.STANDARD,
    ) -> EventEnvelope:
        """A ``TeacherNotificationRequested`` envelope (publish it keyed by ``teacher_id``)."""
        return self.envelope(
            events_v1.TeacherNotificationRequested(
                teacher_id=teacher_id,
                notification_type=notification_type,
                category=category,
                priority=priority,
                batch_id=batch_id,
                payload_json=json.dumps(data, separators=(",", ":"), sort_keys=True),
            ),
            source=source,
            user_id=teacher_id,
            correlation_id=correlation_id,
        )


@dataclass(frozen=True, slots=True)
class PipelineRun:
    """One accepted ``RequestPipeline``: what to run, on which essays, for whom."""

    batch_id: str
    owner_user_id: str
    pipeline_run_id: str
    phases: tuple[Phase, ...]
    essay_ids: tuple[str, ...]
    correlation_id: str


@dataclass(frozen=True, slots=True)
class RunSummary:
    """How a run ended (also what ``BatchPipelineCompleted`` said)."""

    final_status: events_v1.FinalStatus
    completed_phases: tuple[Phase, ...]
    succeeded_essay_ids: tuple[str, ...]
    failed_essay_ids: tuple[str, ...]
    duration_ms: int


class PipelineSimulator:
    """Plays one pipeline run at a time per call of :meth:`run`; see the module docstring.

    Runs of different batches may go on concurrently (each call is independent); the random
    draws of concurrent runs interleave, so only a run alone on its simulator is reproducible
    from the seed.
    """

    def __init__(self, publisher: EventPublisher, settings: PipelineSettings | None = None):
        self._publisher = publisher
        self.settings = settings or PipelineSettings()
        # Not for security: reproducible simulated failures and scores.
        self._rng = random.Random(self.settings.seed)  # noqa: S311
        self.runs_finished = 0

    async def run(self, run: PipelineRun) -> RunSummary:
        """Publish the whole run's events; returns when ``BatchPipelineCompleted`` is out.

        Cancellation stops the run where it is (nothing more is published, the batch stays
        in processing, as when a real backend dies). :class:`~common.errors.PublishError`
        from the bus ends the run with that error.
        """
        started = trio.current_time()
        failed: set[str] = set()
        completed: list[Phase] = []
        final = events_v1.FinalStatus.COMPLETED_SUCCESSFULLY
        log.info(
            "pipeline run started",
            batch_id=run.batch_id,
            pipeline_run_id=run.pipeline_run_id,
            phases=[p.name.lower() for p in run.phases],
            essays=len(run.essay_ids),
        )
        for phase in run.phases:
            await trio.sleep(self.settings.phase_delay_s)
            newly_failed = await self._phase(run, phase, failed)
            failed |= newly_failed
            completed.append(phase)
            if len(failed) == len(run.essay_ids):
                final = events_v1.FinalStatus.FAILED
                break
        if final is not events_v1.FinalStatus.FAILED and failed:
            final = events_v1.FinalStatus.COMPLETED_WITH_FAILURES
        succeeded = tuple(e for e in run.essay_ids if e not in failed)
        duration_ms = round((trio.current_time() - started) * 1000)
        await self._emit(
            run,
            events_v1.BatchPipelineCompleted(
                batch_id=run.batch_id,
                pipeline_run_id=run.pipeline_run_id,
                completed_phases=list(completed),
                final_status=final,
                successful_essay_count=len(succeeded),
                failed_essay_count=len(run.essay_ids) - len(succeeded),
                duration_ms=duration_ms,
            ),
            ORCHESTRATOR_SOURCE,
        )
        self.runs_finished += 1
        log.info(
            "pipeline run finished",
            batch_id=run.batch_id,
            pipeline_run_id=run.pipeline_run_id,
            final_status=final.name.lower(),
            failed_essays=len(failed),
        )
        return RunSummary(final, tuple(completed), succeeded, tuple(sorted(failed)), duration_ms)

    async def _phase(self, run: PipelineRun, phase: Phase, failed_before: set[str]) -> set[str]:
        """Run one phase; returns the essays that failed in it."""
        source = PHASE_SOURCES[phase]
        newly_failed: set[str] = set()
        scores: dict[str, float] = {}
        for essay_id in run.essay_ids:
            if essay_id in failed_before:
                continue
            await trio.sleep(self.settings.essay_delay_s)
            fails = self._rng.random() < self.settings.failure_rate
            if fails:
                newly_failed.add(essay_id)
            if phase is Phase.SPELLCHECK:
                await self._emit(run, self._spellcheck(run, essay_id, fails), source)
            elif phase is Phase.CJ_ASSESSMENT and not fails:
                scores[essay_id] = round(self._rng.gauss(0.0, 1.0), 4)
        failed_now = failed_before | newly_failed
        if phase is Phase.CJ_ASSESSMENT:
            await self._emit(run, self._assessment(run, scores, failed_now), source)
        ok = [e for e in run.essay_ids if e not in failed_now]
        bad = [e for e in run.essay_ids if e in failed_now]
        outcome = (
            events_v1.PhaseOutcome.FAILED
            if not ok
            else events_v1.PhaseOutcome.PARTIAL
            if bad
            else events_v1.PhaseOutcome.SUCCEEDED
        )
        await self._emit(
            run,
            events_v1.BatchPhaseOutcome(
                batch_id=run.batch_id,
                phase=phase,
                outcome=outcome,
                succeeded_essay_ids=ok,
                failed_essay_ids=bad,
                pipeline_phases=list(run.phases),
                pipeline_run_id=run.pipeline_run_id,
            ),
            LIFECYCLE_SOURCE,
        )
        return newly_failed

    def _spellcheck(self, run: PipelineRun, essay_id: str, fails: bool) -> Payload:
        if fails:
            return events_v1.SpellcheckResult(
                batch_id=run.batch_id,
                essay_id=essay_id,
                outcome=events_v1.EssayPhaseOutcome.FAILED,
                error="simulated failure: the essay text could not be read",
            )
        return events_v1.SpellcheckResult(
            batch_id=run.batch_id,
            essay_id=essay_id,
            outcome=events_v1.EssayPhaseOutcome.SUCCEEDED,
            corrections_count=self._rng.randint(0, 40),
            corrected_text_storage_id=f"text-{essay_id}-spellchecked",
        )

    @staticmethod
    def _assessment(
        run: PipelineRun, scores: dict[str, float], failed: set[str]
    ) -> events_v1.AssessmentResultPublished:
        ranked = sorted(scores, key=lambda e: (-scores[e], e))
        bands = len(GRADES)
        return events_v1.AssessmentResultPublished(
            batch_id=run.batch_id,
            assessment_job_id=f"cj-{run.pipeline_run_id}",
            rankings=[
                events_v1.EssayAssessment(
                    essay_id=essay_id,
                    rank=rank,
                    score=scores[essay_id],
                    grade=GRADES[(rank - 1) * bands // len(ranked)],
                )
                for rank, essay_id in enumerate(ranked, start=1)
            ],
            failed_essay_ids=[e for e in run.essay_ids if e in failed],
        )

    async def _emit(self, run: PipelineRun, payload: Payload, source: str) -> None:
        await self._publisher.publish(
            payload,
            key=run.batch_id,
            source=source,
            user_id=run.owner_user_id,
            correlation_id=run.correlation_id,
        )
