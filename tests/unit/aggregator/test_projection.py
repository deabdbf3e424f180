"""The status model and the permutation invariance of the batch view (R3)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.projection import BatchState, apply_event, derive, to_batch_view
from common.contracts.huleedu.events import v1 as ev
from common.contracts.huleedu.results import v1 as results_v1
from common.events import EventEnvelope
from tests.unit.aggregator import events as E

Status = results_v1.BatchStatus
Phase = E.Phase


def fold(events: list[EventEnvelope]) -> BatchState:
    state = BatchState(
        events[0].batch_essays_registered.batch_id if events[0].batch_essays_registered else "b1"
    )
    seen: set[str] = set()
    for e in events:
        if e.event_id in seen:
            continue  # the store deduplicates by event_id
        seen.add(e.event_id)
        apply_event(state, e)
    return state


def view_bytes(state: BatchState) -> bytes:
    return bytes(to_batch_view(state, include_essays=True))


def status_after(events: list[EventEnvelope]) -> Status:
    state = BatchState("b1")
    for e in events:
        apply_event(state, e)
    return derive(state).status


def test_every_transition_in_order() -> None:
    b = "b1"
    steps = [
        (E.registered(b, n=2, at=0), Status.REGISTERED),
        (E.slot(b, 0, 1), Status.AWAITING_CONTENT),
        (E.slot(b, 1, 2), Status.READY),
        (E.spellcheck(b, 0, 3), Status.PROCESSING),
        (E.spellcheck(b, 1, 4), Status.PROCESSING),
        (E.phase_outcome(b, Phase.SPELLCHECK, [0, 1], [], 5, E.PIPELINE), Status.PROCESSING),
        # Every essay now has every requested phase finished: the batch is complete.
        (E.assessment(b, {0: 1, 1: 2}, 6), Status.COMPLETED_SUCCESSFULLY),
        (
            E.phase_outcome(b, Phase.CJ_ASSESSMENT, [0, 1], [], 7, E.PIPELINE),
            Status.COMPLETED_SUCCESSFULLY,
        ),
    ]
    state = BatchState(b)
    for event, expected in steps:
        apply_event(state, event)
        assert derive(state).status is expected, (event.event_type, derive(state))


def test_current_phase_follows_the_pipeline() -> None:
    b = "b1"
    state = BatchState(b)
    for e in [
        E.registered(b, n=1),
        E.slot(b, 0, 1),
        E.spellcheck(b, 0, 2),
        E.phase_outcome(b, Phase.SPELLCHECK, [0], [], 3, E.PIPELINE),
    ]:
        apply_event(state, e)
    derived = derive(state)
    assert derived.status is Status.PROCESSING
    assert derived.current_phase is Phase.CJ_ASSESSMENT


def test_first_phase_finishing_does_not_complete_a_multi_phase_batch() -> None:
    # The original service marked batches complete after the first phase.
    b = "b1"
    events = [
        E.registered(b, n=2),
        E.slot(b, 0, 1),
        E.slot(b, 1, 2),
        E.spellcheck(b, 0, 3),
        E.spellcheck(b, 1, 4),
        E.phase_outcome(b, Phase.SPELLCHECK, [0, 1], [], 5, E.PIPELINE),
    ]
    assert status_after(events) is Status.PROCESSING


def test_the_first_phase_shows_progress_before_the_pipeline_is_known() -> None:
    # No event names the pipeline until the first phase outcome: the phases results arrived
    # for are shown advancing, and finishing them does not complete the batch.
    b = "b1"
    state = BatchState(b)
    for e in [E.registered(b, n=3), E.slot(b, 0, 1), E.slot(b, 1, 2), E.slot(b, 2, 3)]:
        apply_event(state, e)
    assert derive(state).progress == ()
    apply_event(state, E.spellcheck(b, 0, 4))
    apply_event(state, E.spellcheck(b, 1, 5))
    derived = derive(state)
    assert derived.status is Status.PROCESSING
    assert derived.current_phase is Phase.SPELLCHECK
    (phase, status, total, ok, failed), *rest = derived.progress
    assert (phase, total, ok, failed, rest) == (int(Phase.SPELLCHECK), 3, 2, 0, [])
    assert status == int(results_v1.PhaseStatus.IN_PROGRESS)
    apply_event(state, E.spellcheck(b, 2, 6))
    assert derive(state).status is Status.PROCESSING  # CJ may follow: not complete yet


def test_processing_is_never_reported_as_awaiting_content() -> None:
    b = "b1"
    events = [E.registered(b, n=3), E.slot(b, 0, 1), E.spellcheck(b, 0, 2)]
    assert status_after(events) is Status.PROCESSING


def test_essays_before_their_batch_are_linked_on_registration() -> None:
    b = "b1"
    state = BatchState(b)
    for e in [E.slot(b, 0, 1), E.slot(b, 1, 2), E.spellcheck(b, 0, 3)]:
        apply_event(state, e)
    assert not state.registered
    apply_event(state, E.registered(b, n=2, at=0))
    view = to_batch_view(state, include_essays=True)
    assert state.registered and view.owner_user_id == "teacher-1"
    assert [e.essay_id for e in view.essays] == ["b1-e0", "b1-e1"]
    assert view.essays_received == 2


def test_metadata_updates_are_not_lost_and_latest_wins() -> None:
    b = "b1"
    state = BatchState(b)
    newer = E.registered(b, n=4, at=50, course="ENG6")
    older = E.registered(b, n=2, at=0, course="ENG5")
    apply_event(state, newer)
    apply_event(state, older)  # arrives late: must not overwrite the newer metadata
    assert (state.course_code, state.expected_essay_count) == ("ENG6", 4)
    assert state.created_at == older.occurred_at.isoformat()


def test_pipeline_completed_is_authoritative() -> None:
    b = "b1"
    events = [
        E.registered(b, n=2),
        E.slot(b, 0, 1),
        E.slot(b, 1, 2),
        E.spellcheck(b, 0, 3),
        E.completed(b, 9, ev.FinalStatus.COMPLETED_WITH_FAILURES, E.PIPELINE),
    ]
    assert status_after(events) is Status.COMPLETED_WITH_FAILURES
    cancelled = [*events[:-1], E.completed(b, 9, ev.FinalStatus.CANCELLED, E.PIPELINE)]
    assert status_after(cancelled) is Status.CANCELLED


def test_failed_essays_give_completed_with_failures() -> None:
    b = "b1"
    one = (Phase.SPELLCHECK,)
    events = [
        E.registered(b, n=2),
        E.slot(b, 0, 1),
        E.slot(b, 1, 2),
        E.spellcheck(b, 0, 3),
        E.spellcheck(b, 1, 4, ok=False),
        E.phase_outcome(b, Phase.SPELLCHECK, [0], [1], 5, one),
    ]
    state = fold(events)
    view = to_batch_view(state, include_essays=True)
    assert view.status is Status.COMPLETED_WITH_FAILURES
    assert view.phases[0].essays_failed == 1 and view.phases[0].essays_succeeded == 1
    assert view.essays[1].phases[0].status is results_v1.PhaseStatus.FAILED
    assert view.completed_at is not None


def test_per_essay_results_reach_the_view() -> None:
    view = to_batch_view(fold(E.full_run("b1")), include_essays=True)
    assert view.status is Status.COMPLETED_SUCCESSFULLY
    assert [e.spellcheck_corrections for e in view.essays] == [0, 1, 2]
    assert [e.cj_rank for e in view.essays] == [2, 1, 3]
    assert view.requested_phases == list(E.PIPELINE)
    assert view.version == len(E.full_run("b2"))


@settings(max_examples=300, deadline=None)
@given(data=st.data(), final=st.booleans())
def test_r3_any_permutation_with_duplicates_gives_the_same_view(
    data: st.DataObject, final: bool
) -> None:
    events = E.full_run("b1", final=final)
    reference = view_bytes(fold(events))
    shuffled = data.draw(st.permutations(events))
    extra = data.draw(st.lists(st.sampled_from(events), max_size=10))
    positions = data.draw(
        st.lists(st.integers(0, len(shuffled)), min_size=len(extra), max_size=len(extra))
    )
    mixed = list(shuffled)
    for pos, dup in zip(positions, extra, strict=True):
        mixed.insert(pos, dup)
    assert view_bytes(fold(mixed)) == reference
