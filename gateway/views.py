"""What the gateway's batch routes accept and answer: pydantic models and the conversions
from the backends' proto messages.

Enums travel as lowercase names (``"spellcheck"``, ``"completed_successfully"``), times as
RFC 3339 UTC strings, absent optional values as ``null``. The models are the OpenAPI schema
too, so every field has a description and a bound.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from typing import Annotated, Any, Literal

import pydantic

from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import ValidationError
from gateway.http import Strict

__all__ = [
    "BATCH_ID",
    "BatchOut",
    "BatchPage",
    "BatchProgress",
    "BatchSummaryOut",
    "Dashboard",
    "EssayPhaseOut",
    "EssayResultOut",
    "FileList",
    "FileOut",
    "ListBatchesQuery",
    "Overview",
    "PhaseName",
    "PhaseProgressOut",
    "PipelineAccepted",
    "PipelineRequest",
    "RegisterBatchRequest",
    "StatusName",
    "batch_id_from_path",
    "phase_from_name",
    "status_from_name",
]

PhaseName = Literal["spellcheck", "cj_assessment", "nlp", "ai_feedback", "student_matching"]
StatusName = Literal[
    "registered",
    "awaiting_content",
    "ready",
    "processing",
    "completed_successfully",
    "completed_with_failures",
    "failed",
    "cancelled",
]
PhaseStatusName = Literal["pending", "in_progress", "succeeded", "failed", "skipped"]

#: Batch ids the gateway passes on: what the backends issue (UUIDs, slugs), nothing else.
BATCH_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def batch_id_from_path(value: str) -> str:
    if not BATCH_ID.fullmatch(value):
        raise ValidationError(
            "batch_id: 1..64 letters, digits, '-' or '_', starting with a letter or digit",
            field="batch_id",
        )
    return value


def phase_from_name(name: str) -> common_v1.PipelinePhase:
    return common_v1.PipelinePhase[name.upper()]


def _enum_name(value: enum.IntEnum) -> Any:
    """A proto enum value as its lowercase name; ``UNSPECIFIED`` (0) as None. The callers'
    return types are the Literals of the names (checked by the response models)."""
    return None if int(value) == 0 else str(value.name).lower()


def _phase_name(phase: common_v1.PipelinePhase) -> PhaseName | None:
    name: PhaseName | None = _enum_name(phase)
    return name


def status_from_name(name: str) -> results_v1.BatchStatus:
    return results_v1.BatchStatus[name.upper()]


def _status_name(status: results_v1.BatchStatus) -> StatusName | None:
    name: StatusName | None = _enum_name(status)
    return name


def _phase_status(status: results_v1.PhaseStatus) -> PhaseStatusName | None:
    name: PhaseStatusName | None = _enum_name(status)
    return name


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _phases(values: list[common_v1.PipelinePhase]) -> list[PhaseName]:
    return [name for p in values if (name := _phase_name(p)) is not None]


# -- requests ---------------------------------------------------------------------------------


class RegisterBatchRequest(Strict):
    """A new batch of essays."""

    course_code: Annotated[
        str, pydantic.Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$")
    ] = pydantic.Field(description="Course code, e.g. ENG5.")
    essay_instructions: str = pydantic.Field(
        min_length=1, max_length=10_000, description="The instructions the students were given."
    )
    expected_essay_count: int = pydantic.Field(
        ge=1, le=500, strict=True, description="How many essays to expect."
    )
    class_id: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Class the batch belongs to.",
    )


class PipelineRequest(Strict):
    """Phases to run on the batch's essays, in order."""

    phases: list[PhaseName] = pydantic.Field(min_length=1, max_length=5)

    @pydantic.field_validator("phases")
    @classmethod
    def _unique(cls, value: list[PhaseName]) -> list[PhaseName]:
        if len(set(value)) != len(value):
            raise ValueError("phases must not repeat")
        return value


class ListBatchesQuery(Strict):
    """``GET /v1/batches`` query parameters."""

    page_size: int = pydantic.Field(default=20, ge=1, le=100, description="Batches per page.")
    page_token: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=512,
        pattern=r"^[A-Za-z0-9_=-]+$",
        description="`next_page_token` of the previous page.",
    )
    status: str | None = pydantic.Field(
        default=None,
        max_length=200,
        description="Comma-separated statuses to keep, e.g. `processing,ready`.",
    )

    def statuses(self) -> list[results_v1.BatchStatus]:
        if self.status is None:
            return []
        names = [n.strip() for n in self.status.split(",")]
        allowed = StatusName.__args__  # type: ignore[attr-defined]
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValidationError(
                f"status: unknown {bad[0]!r}; one of {', '.join(allowed)}", field="status"
            )
        return [status_from_name(n) for n in dict.fromkeys(names)]


# -- responses --------------------------------------------------------------------------------


class _Out(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(frozen=True)


class BatchOut(_Out):
    """A batch's registration, as the batch backend knows it."""

    batch_id: str
    course_code: str
    essay_instructions: str
    expected_essay_count: int
    class_id: str | None
    created_at: dt.datetime | None
    requested_phases: list[PhaseName]

    @classmethod
    def of(cls, batch: batches_v1.Batch) -> BatchOut:
        return cls(
            batch_id=batch.batch_id,
            course_code=batch.course_code,
            essay_instructions=batch.essay_instructions,
            expected_essay_count=batch.expected_essay_count,
            class_id=batch.class_id or None,
            created_at=_utc(batch.created_at),
            requested_phases=_phases(batch.requested_phases),
        )


class PhaseProgressOut(_Out):
    phase: PhaseName | None
    status: PhaseStatusName | None
    essays_total: int
    essays_succeeded: int
    essays_failed: int


class EssayPhaseOut(_Out):
    phase: PhaseName | None
    status: PhaseStatusName | None
    error: str | None


class EssayResultOut(_Out):
    essay_id: str
    filename: str
    phases: list[EssayPhaseOut]
    spellcheck_corrections: int | None
    cj_rank: int | None
    cj_score: float | None
    cj_grade: str | None


class BatchSummaryOut(_Out):
    batch_id: str
    course_code: str
    status: StatusName | None
    current_phase: PhaseName | None
    expected_essay_count: int
    essays_received: int
    created_at: dt.datetime | None
    updated_at: dt.datetime | None

    @classmethod
    def of(cls, s: results_v1.BatchSummary) -> BatchSummaryOut:
        return cls(
            batch_id=s.batch_id,
            course_code=s.course_code,
            status=_status_name(s.status),
            current_phase=_phase_name(s.current_phase),
            expected_essay_count=s.expected_essay_count,
            essays_received=s.essays_received,
            created_at=_utc(s.created_at),
            updated_at=_utc(s.updated_at),
        )


class BatchProgress(_Out):
    """A batch's processing state and results, from the result aggregator."""

    batch_id: str
    course_code: str
    status: StatusName | None
    current_phase: PhaseName | None
    requested_phases: list[PhaseName]
    expected_essay_count: int
    essays_received: int
    phases: list[PhaseProgressOut]
    essays: list[EssayResultOut]
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    completed_at: dt.datetime | None
    version: int

    @classmethod
    def of(cls, v: results_v1.BatchView) -> BatchProgress:
        return cls(
            batch_id=v.batch_id,
            course_code=v.course_code,
            status=_status_name(v.status),
            current_phase=_phase_name(v.current_phase),
            requested_phases=_phases(v.requested_phases),
            expected_essay_count=v.expected_essay_count,
            essays_received=v.essays_received,
            phases=[
                PhaseProgressOut(
                    phase=_phase_name(p.phase),
                    status=_phase_status(p.status),
                    essays_total=p.essays_total,
                    essays_succeeded=p.essays_succeeded,
                    essays_failed=p.essays_failed,
                )
                for p in v.phases
            ],
            essays=[
                EssayResultOut(
                    essay_id=e.essay_id,
                    filename=e.filename,
                    phases=[
                        EssayPhaseOut(
                            phase=_phase_name(p.phase),
                            status=_phase_status(p.status),
                            error=p.error or None,
                        )
                        for p in e.phases
                    ],
                    spellcheck_corrections=e.spellcheck_corrections,
                    cj_rank=e.cj_rank,
                    cj_score=e.cj_score,
                    cj_grade=e.cj_grade or None,
                )
                for e in v.essays
            ],
            created_at=_utc(v.created_at),
            updated_at=_utc(v.updated_at),
            completed_at=_utc(v.completed_at),
            version=v.version,
        )


class BatchPage(_Out):
    batches: list[BatchSummaryOut]
    next_page_token: str | None = pydantic.Field(
        description="Pass as `page_token` for the next page; null on the last page."
    )


class FileOut(_Out):
    file_id: str
    file_index: int
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    uploaded_at: dt.datetime | None
    essay_id: str | None

    @classmethod
    def of(cls, f: files_v1.FileInfo) -> FileOut:
        return cls(
            file_id=f.file_id,
            file_index=f.file_index,
            filename=f.filename,
            content_type=f.content_type,
            size_bytes=f.size_bytes,
            sha256=f.sha256,
            uploaded_at=_utc(f.uploaded_at),
            essay_id=f.essay_id or None,
        )


class FileList(_Out):
    batch_id: str
    files: list[FileOut]


class PipelineAccepted(_Out):
    batch_id: str
    pipeline_run_id: str
    phases: list[PhaseName]


Part = Literal["registration", "progress", "files", "summary", "registrations"]


class Overview(_Out):
    """One batch from every backend at once. A backend that failed or missed the deadline
    leaves its part ``null`` and is named in ``incomplete``."""

    batch_id: str
    registration: BatchOut | None
    progress: BatchProgress | None
    files: list[FileOut] | None
    incomplete: list[Part] = pydantic.Field(
        description="Parts missing because their backend failed or was too slow; [] = all."
    )


class Dashboard(_Out):
    """The teacher's batches at a glance, from the result aggregator (``summary``: totals,
    counts, recent progress) and the batch backend (``registrations``: the newest batches as
    registered), fetched concurrently. A part whose backend failed or missed the deadline is
    ``null`` and named in ``incomplete``."""

    total_batches: int | None
    essays_processed: int | None
    counts: dict[str, int] | None = pydantic.Field(description="Batches per status name.")
    recent: list[BatchSummaryOut] | None
    registrations: list[BatchOut] | None = pydantic.Field(
        description="The newest batches as the batch backend registered them."
    )
    incomplete: list[Part] = pydantic.Field(
        description="Parts missing because their backend failed or was too slow; [] = all."
    )
