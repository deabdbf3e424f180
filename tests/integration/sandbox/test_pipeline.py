"""The pipeline simulator on the virtual clock (no sockets): which events a run publishes, in
which order and at which exact virtual times, keyed and stamped for the aggregator; seeded
failures that are reproducible; and the settings' bounds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pydantic
import pytest
import trio

from common.bus import Headers, RecordMetadata
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as ev
from common.events import EventEnvelope, Topic, decode_envelope
from deploy.sandbox.pipeline import (
    EventPublisher,
    PipelineRun,
    PipelineSettings,
    PipelineSimulator,
)

Phase = common_v1.PipelinePhase
ESSAYS = ("e-1", "e-2", "e-3")


@dataclass
class Published:
    at: float
    key: str
    envelope: EventEnvelope
    headers: Headers


@dataclass
class RecordingBus:
    """Takes records like a bus and keeps them, with the virtual time they came in."""

    records: list[Published] = field(default_factory=list)

    async def publish_many(
        self, records: Sequence[tuple[str, bytes | None, bytes, Headers]]
    ) -> list[RecordMetadata]:
        for topic, key, value, headers in records:
            envelope = decode_envelope(value, expected_topics=[topic])
            assert key is not None
            self.records.append(Published(trio.current_time(), key.decode(), envelope, headers))
        await trio.lowlevel.checkpoint()
        return [RecordMetadata(t, 0, i) for i, (t, _, _, _) in enumerate(records)]


def _run(phases: tuple[Phase, ...], essays: tuple[str, ...] = ESSAYS) -> PipelineRun:
    return PipelineRun(
        batch_id="batch-1",
        owner_user_id="teacher-1",
        pipeline_run_id="run-1",
        phases=phases,
        essay_ids=essays,
        correlation_id="corr-1",
    )


def _simulator(settings: PipelineSettings) -> tuple[PipelineSimulator, RecordingBus]:
    bus = RecordingBus()
    return PipelineSimulator(EventPublisher(bus), settings), bus  # type: ignore[arg-type]


async def test_a_run_publishes_results_outcomes_and_completion_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    simulator, bus = _simulator(PipelineSettings(essay_delay_s=0.05, phase_delay_s=0.1, seed=1))
    start = trio.current_time()
    summary = await simulator.run(_run((Phase.SPELLCHECK, Phase.CJ_ASSESSMENT)))

    timeline = [(round(p.at - start, 6), p.envelope.event_type) for p in bus.records]
    assert timeline == [
        (0.15, Topic.SPELLCHECK_RESULTS),
        (0.2, Topic.SPELLCHECK_RESULTS),
        (0.25, Topic.SPELLCHECK_RESULTS),
        (0.25, Topic.BATCH_PHASE_OUTCOME),
        (0.5, Topic.ASSESSMENT_RESULT),
        (0.5, Topic.BATCH_PHASE_OUTCOME),
        (0.5, Topic.PIPELINE_COMPLETED),
    ]
    for record in bus.records:
        envelope = record.envelope
        assert record.key == "batch-1", "every event is keyed by its batch"
        assert (envelope.user_id, envelope.correlation_id) == ("teacher-1", "corr-1")
        assert envelope.source_service.startswith("sandbox-")
        assert dict(record.headers)["event_type"] == envelope.event_type.encode()
    stamps = [p.envelope.occurred_at for p in bus.records if p.envelope.occurred_at]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps), "stamps in order"

    spell = [p.envelope.spellcheck_result for p in bus.records[:3]]
    assert [s.essay_id for s in spell if s] == list(ESSAYS)
    assert all(s and s.outcome is ev.EssayPhaseOutcome.SUCCEEDED for s in spell)
    assert all(s and 0 <= s.corrections_count <= 40 for s in spell)
    cj = bus.records[4].envelope.assessment_result_published
    assert cj is not None and cj.failed_essay_ids == []
    assert sorted(r.rank for r in cj.rankings) == [1, 2, 3]
    by_rank = sorted(cj.rankings, key=lambda r: r.rank)
    assert [r.score for r in by_rank] == sorted((r.score for r in by_rank), reverse=True)
    assert [r.grade for r in by_rank] == ["A", "C", "E"]
    outcome = bus.records[3].envelope.batch_phase_outcome
    assert outcome is not None and outcome.outcome is ev.PhaseOutcome.SUCCEEDED
    assert outcome.pipeline_phases == [Phase.SPELLCHECK, Phase.CJ_ASSESSMENT]
    assert outcome.succeeded_essay_ids == list(ESSAYS) and outcome.pipeline_run_id == "run-1"
    done = bus.records[-1].envelope.batch_pipeline_completed
    assert done is not None
    assert done.final_status is ev.FinalStatus.COMPLETED_SUCCESSFULLY
    assert (done.successful_essay_count, done.failed_essay_count, done.duration_ms) == (3, 0, 500)
    assert summary.final_status is ev.FinalStatus.COMPLETED_SUCCESSFULLY


async def test_phases_without_result_events_report_through_the_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    simulator, bus = _simulator(PipelineSettings(essay_delay_s=0.01, phase_delay_s=0))
    await simulator.run(_run((Phase.NLP, Phase.AI_FEEDBACK)))
    assert [p.envelope.event_type for p in bus.records] == [
        Topic.BATCH_PHASE_OUTCOME,
        Topic.BATCH_PHASE_OUTCOME,
        Topic.PIPELINE_COMPLETED,
    ]


async def test_failures_follow_the_seed_and_carry_through_later_phases(
    autojump_clock: trio.testing.MockClock,
) -> None:
    essays = tuple(f"e-{i}" for i in range(20))
    settings = PipelineSettings(essay_delay_s=0.001, phase_delay_s=0.001, failure_rate=0.3, seed=42)
    runs = []
    for _ in range(2):
        simulator, bus = _simulator(settings)
        summary = await simulator.run(_run((Phase.SPELLCHECK, Phase.CJ_ASSESSMENT), essays))
        runs.append((summary, bus))
    (first, bus), (second, _) = runs
    assert first.failed_essay_ids == second.failed_essay_ids, "same seed, same failures"
    assert 0 < len(first.failed_essay_ids) < len(essays)
    assert first.final_status is ev.FinalStatus.COMPLETED_WITH_FAILURES

    spell_failed = {
        p.envelope.spellcheck_result.essay_id
        for p in bus.records
        if p.envelope.spellcheck_result
        and p.envelope.spellcheck_result.outcome is ev.EssayPhaseOutcome.FAILED
    }
    outcomes = [
        p.envelope.batch_phase_outcome for p in bus.records if p.envelope.batch_phase_outcome
    ]
    assert [o.outcome for o in outcomes] == [ev.PhaseOutcome.PARTIAL] * 2
    assert set(outcomes[0].failed_essay_ids) == spell_failed
    assert spell_failed <= set(outcomes[1].failed_essay_ids), "failed essays stay failed"
    cj = next(
        p.envelope.assessment_result_published
        for p in bus.records
        if p.envelope.assessment_result_published
    )
    assert cj is not None
    assert {r.essay_id for r in cj.rankings} | set(cj.failed_essay_ids) == set(essays)
    done = bus.records[-1].envelope.batch_pipeline_completed
    assert done is not None
    assert done.failed_essay_count == len(first.failed_essay_ids)
    assert done.successful_essay_count == len(essays) - len(first.failed_essay_ids)


async def test_a_phase_where_every_essay_fails_ends_the_run(
    autojump_clock: trio.testing.MockClock,
) -> None:
    simulator, bus = _simulator(PipelineSettings(failure_rate=1.0, seed=3))
    summary = await simulator.run(_run((Phase.SPELLCHECK, Phase.CJ_ASSESSMENT)))
    assert summary.final_status is ev.FinalStatus.FAILED
    assert summary.completed_phases == (Phase.SPELLCHECK,)
    kinds = [p.envelope.event_type for p in bus.records]
    assert Topic.ASSESSMENT_RESULT not in kinds, "no phase runs after a total failure"
    outcome = next(
        p.envelope.batch_phase_outcome for p in bus.records if p.envelope.batch_phase_outcome
    )
    assert outcome is not None and outcome.outcome is ev.PhaseOutcome.FAILED
    assert kinds[-1] == Topic.PIPELINE_COMPLETED


@pytest.mark.parametrize(
    "bad",
    [{"failure_rate": 1.5}, {"failure_rate": -0.1}, {"essay_delay_s": -1}, {"bogus": 1}],
)
def test_settings_refuse_bad_values(bad: dict[str, float]) -> None:
    with pytest.raises(pydantic.ValidationError):
        PipelineSettings(**bad)
