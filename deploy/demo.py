"""``huleedu demo``: one batch of essays through the whole tier, the way a teacher's app does it.

1. log in at the gateway (the sandbox's demo teacher unless told otherwise);
2. get a one-time WebSocket ticket and connect to the WebSocket manager, *before* the batch
   exists, so no notification about it can be missed;
3. register a batch, upload the essays (one streaming ``multipart/form-data`` request), and
   request the pipeline ``spellcheck`` → ``cj_assessment``;
4. print a line per live event of that batch until its status is terminal (the aggregator's
   ``batch_status_changed`` notifications carry the status; ``batch_results_ready`` follows
   once the batch is done);
5. read the batch over REST (``GET /v1/batches/{id}``) and print the results table.

:func:`run_demo` does all of it within one overall deadline and returns a :class:`DemoResult`;
it succeeds only if every step worked and the batch ended ``completed_successfully``.
Otherwise ``DemoResult.error`` is one line naming the step, e.g. ``login failed: 401 ...``.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio

from deploy.client import (
    ClientConfig,
    Frame,
    GatewayClient,
    LiveSocket,
    OptionsError,
    Session,
    StepError,
    add_connection_arguments,
    event_data,
    event_summary,
    open_gateway,
    open_live_socket,
    resolve_config,
)
from deploy.samples import ESSAY_PROMPT, ESSAYS_DIR

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "PHASES",
    "TERMINAL_STATUSES",
    "DemoResult",
    "EssayFile",
    "ProgressEvent",
    "ResultRow",
    "add_arguments",
    "find_essays",
    "main",
    "results_table",
    "run_demo",
]

#: The pipeline the demo requests, in order.
PHASES = ("spellcheck", "cj_assessment")
#: Batch statuses after which nothing more happens (the aggregator's ``_DONE``).
TERMINAL_STATUSES = frozenset(
    {"completed_successfully", "completed_with_failures", "failed", "cancelled"}
)
SUCCESS = "completed_successfully"
RESULTS_READY = "batch_results_ready"
#: Seconds the whole demo may take, login to results table.
DEFAULT_TIMEOUT_S = 120.0
#: Seconds to wait for ``batch_results_ready`` after the terminal status arrived (it is
#: published right after it, so this only matters if the server drops it).
RESULTS_GRACE_S = 2.0
COURSE_CODE = "ENG5"
#: Bytes read from an essay file per upload chunk: the upload streams, whatever the size.
UPLOAD_CHUNK_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class EssayFile:
    path: Path
    size: int


def find_essays(folder: Path) -> list[EssayFile]:
    """The ``*.txt`` files in ``folder`` by name. Raises :class:`StepError` (``essays``) if
    the folder cannot be read or holds none."""
    try:
        paths = sorted(p for p in folder.iterdir() if p.suffix == ".txt" and p.is_file())
        essays = [EssayFile(p, p.stat().st_size) for p in paths]
    except OSError as exc:
        raise StepError("essays", f"cannot read {folder}: {exc.strerror or exc}") from None
    if not essays:
        raise StepError("essays", f"no .txt files in {folder}")
    return essays


@dataclass(frozen=True, slots=True)
class ProgressEvent:
    """One live event of the demo's batch, as printed (``epoch:offset`` resumes after it)."""

    epoch: str
    offset: int
    event_type: str
    status: str | None
    line: str


@dataclass(frozen=True, slots=True)
class ResultRow:
    """One essay of the final view."""

    filename: str
    spellcheck: str | None
    corrections: int | None
    cj_rank: int | None
    cj_score: float | None
    cj_grade: str | None


@dataclass(slots=True)
class DemoResult:
    batch_id: str | None = None
    #: The batch's status in the final REST view.
    status: str | None = None
    progress: list[ProgressEvent] = field(default_factory=list)
    rows: list[ResultRow] = field(default_factory=list)
    #: One line naming the failed step; None when the demo succeeded.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == SUCCESS

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


class _Run:
    """The step in progress (named on a timeout), the clock and the output."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.step = "essays"
        self.started = trio.current_time()

    def elapsed(self) -> float:
        return trio.current_time() - self.started


# -- upload -------------------------------------------------------------------------------------


def _part_head(boundary: str, name: str) -> bytes:
    safe = name.isascii() and name.isprintable() and not any(c in name for c in '"\\')
    disposition = f'form-data; name="files"; filename="{name if safe else "essay.txt"}"'
    if not safe:
        disposition += f"; filename*=UTF-8''{quote(name, safe='')}"
    return (
        f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    ).encode()


def _read_chunk(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read(size)


async def _file_chunks(essay: EssayFile) -> AsyncIterator[bytes]:
    # No file stays open across a yield, so an abandoned upload leaves nothing to clean up.
    offset = 0
    while offset < essay.size:
        wanted = min(UPLOAD_CHUNK_BYTES, essay.size - offset)
        chunk = await trio.to_thread.run_sync(_read_chunk, essay.path, offset, wanted)
        if not chunk:
            raise StepError("upload", f"{essay.path} shrank while it was uploaded")
        offset += len(chunk)
        yield chunk


def _multipart(essays: Sequence[EssayFile]) -> tuple[AsyncIterator[bytes], int, str]:
    """The streaming body, its exact length, and its content type."""
    boundary = f"huleedu-{secrets.token_hex(12)}"
    heads = [_part_head(boundary, e.path.name) for e in essays]
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(h) + e.size + 2 for h, e in zip(heads, essays, strict=True)) + len(tail)

    async def body() -> AsyncIterator[bytes]:
        for head, essay in zip(heads, essays, strict=True):
            yield head
            async for chunk in _file_chunks(essay):
                yield chunk
            yield b"\r\n"
        yield tail

    return body(), length, f"multipart/form-data; boundary={boundary}"


# -- the steps ----------------------------------------------------------------------------------


async def _submit(
    gateway: GatewayClient, session: Session, essays: Sequence[EssayFile], run: _Run
) -> str:
    """Register, upload, request the pipeline; returns the batch id."""
    run.step = "register batch"
    batch = await gateway.call(
        run.step,
        "POST",
        "/v1/batches",
        session=session,
        expect=201,
        json={
            "course_code": COURSE_CODE,
            "essay_instructions": ESSAY_PROMPT,
            "expected_essay_count": len(essays),
        },
    )
    batch_id = str(batch["batch_id"])
    run.out(f"registered batch {batch_id} ({len(essays)} essays expected)")
    run.step = "upload"
    body, length, content_type = _multipart(essays)
    stored = await gateway.call(
        run.step,
        "POST",
        f"/v1/batches/{batch_id}/files",
        session=session,
        expect=201,
        content=body,
        headers={"content-type": content_type, "content-length": str(length)},
    )
    files = stored["files"]
    if len(files) != len(essays):
        raise StepError(run.step, f"sent {len(essays)} files, the gateway stored {len(files)}")
    run.out(f"uploaded {len(files)} files ({sum(e.size for e in essays)} bytes)")
    run.step = "request pipeline"
    accepted = await gateway.call(
        run.step,
        "POST",
        f"/v1/batches/{batch_id}/pipelines",
        session=session,
        expect=202,
        json={"phases": list(PHASES)},
    )
    run.out(
        f"pipeline {' -> '.join(accepted['phases'])} accepted (run {accepted['pipeline_run_id']})"
    )
    return batch_id


def _progress(frame: Frame, batch_id: str, run: _Run) -> ProgressEvent | None:
    body = frame.body
    if frame.type != "event" or body.get("batch_id") != batch_id:
        return None
    event_type = str(body.get("event_type", ""))
    data = event_data(body)
    status = data.get("status") if event_type.startswith("batch_") else None
    line = f"[{run.elapsed():6.2f}s] {event_type:<21} {event_summary(event_type, data)}"
    return ProgressEvent(
        str(body.get("epoch", "")), int(body.get("offset", -1)), event_type, status, line
    )


async def _watch(live: LiveSocket, batch_id: str, run: _Run, result: DemoResult) -> None:
    """Print the batch's events until it is done (``batch_results_ready``, or the terminal
    status plus :data:`RESULTS_GRACE_S`)."""
    terminal = False
    with trio.CancelScope() as grace:
        while (frame := await live.receive()) is not None:
            event = _progress(frame, batch_id, run)
            if event is None:
                continue
            result.progress.append(event)
            run.out(event.line)
            if event.event_type == RESULTS_READY:
                return
            if event.status in TERMINAL_STATUSES and not terminal:
                terminal = True
                grace.deadline = trio.current_time() + RESULTS_GRACE_S
    if not terminal:
        raise StepError(run.step, f"the live-update connection closed: {live.closed}")


def _phase_status(essay: dict[str, Any], phase: str) -> str | None:
    for item in essay.get("phases") or []:
        if item.get("phase") == phase:
            return str(item.get("status"))
    return None


def _rows(view: dict[str, Any]) -> list[ResultRow]:
    rows = [
        ResultRow(
            filename=str(e.get("filename")),
            spellcheck=_phase_status(e, "spellcheck"),
            corrections=e.get("spellcheck_corrections"),
            cj_rank=e.get("cj_rank"),
            cj_score=e.get("cj_score"),
            cj_grade=e.get("cj_grade"),
        )
        for e in view.get("essays") or []
    ]
    return sorted(rows, key=lambda r: (r.cj_rank is None, r.cj_rank or 0, r.filename))


def _cell(value: object, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def results_table(rows: Sequence[ResultRow]) -> list[str]:
    """The results as aligned text lines: a header, then one line per essay."""
    header = ("rank", "file", "spellcheck", "corrections", "score", "grade")
    cells = [
        (
            _cell(r.cj_rank),
            r.filename,
            _cell(r.spellcheck),
            _cell(r.corrections),
            _cell(r.cj_score),
            _cell(r.cj_grade),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    right = {0, 3, 4}
    return [
        "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *cells]
    ]


async def _results(
    gateway: GatewayClient, session: Session, batch_id: str, run: _Run, result: DemoResult
) -> None:
    run.step = "fetch results"
    view = await gateway.call(run.step, "GET", f"/v1/batches/{batch_id}", session=session)
    result.status = str(view.get("status"))
    result.rows = _rows(view)
    run.out(f"batch {batch_id}: {result.status} after {run.elapsed():.2f} s")
    for line in results_table(result.rows):
        run.out(line)


async def _demo(
    config: ClientConfig, essays: Sequence[EssayFile], run: _Run, result: DemoResult
) -> None:
    run.out(f"demo: {len(essays)} essays; gateway {config.gateway_url}; live {config.ws_url}")
    async with open_gateway(config) as gateway:
        run.step = "login"
        session = await gateway.login(config.email, config.password)
        run.out(f"logged in as {session.display_name or config.email} <{config.email}>")
        try:
            run.step = "ws ticket"
            ticket = await gateway.ws_ticket(session)
            run.step = "ws connect"
            async with open_live_socket(config, ticket) as live:
                run.out(f"live updates connected ({live.welcome.body.get('connection_id')})")
                result.batch_id = await _submit(gateway, session, essays, run)
                run.step = "watch progress"
                await _watch(live, result.batch_id, run, result)
            await _results(gateway, session, result.batch_id, run, result)
        finally:
            await gateway.logout_quietly(session)


async def run_demo(
    config: ClientConfig,
    *,
    essays_dir: Path = ESSAYS_DIR,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    out: Callable[[str], None] = print,
) -> DemoResult:
    """Run the demo against the tier ``config`` names; ``out`` gets each progress line.

    Never raises for a failed step or the deadline: the result's ``error`` names the step.
    Cancellation from outside propagates (after a best-effort logout).
    """
    result = DemoResult()
    run = _Run(out)
    with trio.move_on_after(timeout_s) as deadline:
        try:
            essays = await trio.to_thread.run_sync(find_essays, essays_dir)
            await _demo(config, essays, run, result)
        except StepError as exc:
            result.error = str(exc)
    if deadline.cancelled_caught:
        result.error = f"{run.step} failed: timed out ({timeout_s:g} s for the whole demo)"
    elif result.error is None and result.status != SUCCESS:
        result.error = f"batch {result.batch_id} ended {result.status}"
    return result


# -- command line -------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``huleedu demo``."""
    add_connection_arguments(parser)
    parser.add_argument(
        "--essays",
        type=Path,
        default=ESSAYS_DIR,
        metavar="DIR",
        help="folder of .txt essays to upload (default: the bundled samples)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline for the whole demo (default {DEFAULT_TIMEOUT_S:g})",
    )


def _print(line: str) -> None:
    print(line, flush=True)


def main(args: argparse.Namespace) -> int:
    """Run ``huleedu demo``: 0 when the batch completed successfully; 1 when a step failed
    (one line on stderr names it); 2 for unusable options; 130 on Ctrl-C."""
    try:
        config = resolve_config(args, os.environ)
    except OptionsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    try:
        result = trio.run(
            partial(run_demo, config, essays_dir=args.essays, timeout_s=args.timeout, out=_print)
        )
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    if result.error:
        print(f"demo: {result.error}", file=sys.stderr)
    return result.exit_code
