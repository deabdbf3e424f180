"""The sandbox pipeline simulator: what the processing services would publish for a run.

For each requested phase, in order, it publishes per-essay results, then the phase's outcome;
at the end ``BatchPipelineCompleted``. Every event is keyed by the batch and carries the
batch owner's user id and the request's correlation id, like the real services' events:

* spellcheck: one ``SpellcheckResult`` per essay (corrections counted in a deterministic way
  from the essay id, so reruns agree);
* CJ assessment: one ``AssessmentResultPublished`` with a ranking (rank 1 = best, a score in
  [0, 1] and a grade A-F) of the essays that succeeded, and the failed ones listed;
* nlp, ai_feedback, student_matching: the ``BatchPhaseOutcome`` alone (the essays that
  succeeded and failed), as those services publish nothing else the tier reads;
* each ``BatchPhaseOutcome`` names the whole pipeline (``pipeline_phases``) and run id.

``failure_rate`` fails that share of essays per phase (a seeded :class:`random.Random`, so a
test knows the outcome); an essay that failed a phase is not processed by later phases. All
waiting is ``trio.sleep``: on a virtual clock a run takes no real time.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Any

import trio

from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as events_v1
from common.events import Payload, make_envelope
from common.logs import get_logger
from deploy.sandbox.orchestrator import Essay, Publish

__all__ = ["PipelineSimulator", "SimulatorSettings"]

log = get_logger("sandbox.pipeline")
Phase = common_v1.PipelinePhase
SOURCES = {
    Phase.SPELLCHECK: "sandbox-spellchecker",
    Phase.CJ_ASSESSMENT: "sandbox-cj-assessment",
    Phase.NLP: "sandbox-nlp",
    Phase.AI_FEEDBACK: "sandbox-ai-feedback",
    Phase.STUDENT_MATCHING: "sandbox-student-matching",
}
GRADES = "ABCDEF"


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    #: Seconds per essay within a phase, and once per phase (queueing, model start-up).
    essay_delay_s: float = 0.05
    phase_delay_s: float = 0.1
    #: Share of essays that fail each phase (0 = none).
    failure_rate: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.failure_rate <= 1:
            raise ValueError(f"failure_rate must be in [0, 1], got {self.failure_rate!r}")
        if self.essay_delay_s < 0 or self.phase_delay_s < 0:
            raise ValueError("delays must be >= 0")


def _corrections(essay_id: str) -> int:
    return hashlib.sha256(essay_id.encode()).digest()[0] % 23


class PipelineSimulator:
    def __init__(self, publish: Publish, settings: SimulatorSettings | None = None) -> None:
        self._publish = publish
        self.settings = settings or SimulatorSettings()
        # Simulated outcomes, seeded so a test knows them: not security-relevant.
        self._rng = random.Random(self.settings.seed)  # noqa: S311  # nosec B311
        self.runs_completed = 0

    async def _emit(self, payload: Payload, source: str, batch: Any, cid: str) -> None:
        envelope = make_envelope(
            payload,
            source_service=source,
            user_id=batch.batch.owner_user_id,
            correlation_id=cid,
        )
        await self._publish(envelope, batch.batch.batch_id)

    async def run(
        self,
        batch: Any,
        run_id: str,
        phases: list[common_v1.PipelinePhase],
        essays: list[Essay],
        correlation_id: str,
    ) -> None:
        """Run ``phases`` over ``essays`` of ``batch`` (an orchestrator batch entry)."""
        batch_id = batch.batch.batch_id
        started = time.monotonic()
        alive = [e.essay_id for e in essays]
        failed_total: set[str] = set()
        completed: list[common_v1.PipelinePhase] = []
        s = self.settings
        for phase in phases:
            await trio.sleep(s.phase_delay_s)
            ok: list[str] = []
            failed: list[str] = []
            for essay_id in alive:
                await trio.sleep(s.essay_delay_s)
                (failed if self._rng.random() < s.failure_rate else ok).append(essay_id)
                if phase == Phase.SPELLCHECK:
                    good = essay_id in ok
                    await self._emit(
                        events_v1.SpellcheckResult(
                            batch_id=batch_id,
                            essay_id=essay_id,
                            outcome=(
                                events_v1.EssayPhaseOutcome.SUCCEEDED
                                if good
                                else events_v1.EssayPhaseOutcome.FAILED
                            ),
                            corrections_count=_corrections(essay_id) if good else 0,
                            corrected_text_storage_id=f"corrected-{essay_id}" if good else "",
                            error="" if good else "spellchecker could not read the text",
                        ),
                        SOURCES[phase],
                        batch,
                        correlation_id,
                    )
            if phase == Phase.CJ_ASSESSMENT:
                scores = {e: self._rng.random() for e in ok}
                ranked = sorted(ok, key=lambda e: -scores[e])
                await self._emit(
                    events_v1.AssessmentResultPublished(
                        batch_id=batch_id,
                        assessment_job_id=f"cj-{run_id}",
                        rankings=[
                            events_v1.EssayAssessment(
                                essay_id=e,
                                rank=i + 1,
                                score=round(scores[e], 4),
                                grade=GRADES[min(5, int((1 - scores[e]) * 6))],
                            )
                            for i, e in enumerate(ranked)
                        ],
                        failed_essay_ids=failed,
                    ),
                    SOURCES[phase],
                    batch,
                    correlation_id,
                )
            outcome = (
                events_v1.PhaseOutcome.SUCCEEDED
                if not failed
                else events_v1.PhaseOutcome.FAILED
                if not ok
                else events_v1.PhaseOutcome.PARTIAL
            )
            await self._emit(
                events_v1.BatchPhaseOutcome(
                    batch_id=batch_id,
                    phase=phase,
                    outcome=outcome,
                    succeeded_essay_ids=ok,
                    failed_essay_ids=failed,
                    pipeline_phases=phases,
                    pipeline_run_id=run_id,
                ),
                "sandbox-essay-lifecycle",
                batch,
                correlation_id,
            )
            completed.append(phase)
            failed_total.update(failed)
            alive = ok
        successful = len(essays) - len(failed_total)
        final = (
            events_v1.FinalStatus.COMPLETED_SUCCESSFULLY
            if not failed_total
            else events_v1.FinalStatus.FAILED
            if successful == 0
            else events_v1.FinalStatus.COMPLETED_WITH_FAILURES
        )
        await self._emit(
            events_v1.BatchPipelineCompleted(
                batch_id=batch_id,
                pipeline_run_id=run_id,
                completed_phases=completed,
                final_status=final,
                successful_essay_count=successful,
                failed_essay_count=len(failed_total),
                duration_ms=int((time.monotonic() - started) * 1000),
            ),
            "sandbox-batch-orchestrator",
            batch,
            correlation_id,
        )
        self.runs_completed += 1
        log.info("pipeline completed", batch_id=batch_id, run_id=run_id, final=final.name)
