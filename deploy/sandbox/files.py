"""The sandbox file backend: ``huleedu.files.v1.FileService`` for development and tests.

File bytes are stored under a state folder, the registry of files lives in memory. What the
contract promises, and how it is kept here:

* ``UploadFiles`` reads the client stream in its one allowed order, ``header`` first, then
  per file ``file_start``, ``chunk``\\*, ``file_end``; anything else (a second header, a
  chunk outside a file, a ``file_index`` that is not the file's position, a stream that ends
  inside a file, a chunk over 1 MiB ...) answers INVALID_ARGUMENT naming the message or field.
  ``file_end`` is verified against what arrived: ``size_bytes`` and the lowercase hex
  ``sha256`` must match (INVALID_ARGUMENT ``file_end.size_bytes`` / ``file_end.sha256``);
* limits (:class:`FileLimits`: bytes per file, files per upload, and the batch's free essay
  slots) answer RESOURCE_EXHAUSTED as soon as they are crossed, the message naming the file
  (``field`` is ``files.<index>``);
* all-or-nothing: each file's bytes stream into its own temporary file under
  ``<state>/incoming`` (chunk by chunk: no file is ever held whole in memory); only when the
  client has half-closed a valid stream are all of them renamed into ``<state>/files`` (one
  worker-thread hop, undone if a rename fails) and registered. A cancelled call, a passed
  deadline or any error deletes every temporary file (in a shielded scope) and registers
  nothing. The commit itself is shielded, so a cancel that lands during it cannot leave half
  an upload: it either registers all files (a retry with the same ``upload_id`` then returns
  them) or none;
* ``upload_id`` makes retries safe: a stream whose ``upload_id`` already completed for that
  user and batch is read and checked but its bytes are discarded, and the first upload's
  response is returned; two concurrent streams with one id register once;
* registered files fill the batch's essay slots in upload order, and the upload publishes
  one ``EssaySlotAssigned`` per file (topic ``huleedu.els.essay.slot.assigned.v1``, keyed by
  batch id: what moves the aggregator's ``essays_received``) and one
  ``TeacherNotificationRequested`` ``file_uploaded`` per file (keyed by the teacher's user
  id) in one publish; if the bus refuses them the upload is rolled back and fails
  UNAVAILABLE;
* ``ListFiles`` lists a batch's files in upload order; every call names the acting user and
  another user's batch answers NOT_FOUND, like a missing one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import unicodedata
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import betterproto2
import pydantic
import trio
from pydantic import Field

from common.contracts.huleedu.events import v1 as events_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.errors import PayloadTooLargeError, UnavailableError, ValidationError
from common.logs import get_logger
from deploy.sandbox.batches import MAX_KEY_CHARS, BatchRecord, SandboxBatches, actor_of
from deploy.sandbox.pipeline import LIFECYCLE_SOURCE, EventPublisher

__all__ = [
    "COMMIT_TIMEOUT_S",
    "MAX_CHUNK_BYTES",
    "MAX_FILENAME_CHARS",
    "FileLimits",
    "FileStatistics",
    "SandboxFiles",
]

log = get_logger("deploy.sandbox.files")

#: Largest chunk message the contract allows.
MAX_CHUNK_BYTES = 1 << 20
MAX_FILENAME_CHARS = 255
MAX_CONTENT_TYPE_CHARS = 255
#: Seconds the shielded commit (renames, publishing) and cleanup may take before giving up.
COMMIT_TIMEOUT_S = 10.0
FILE_SOURCE = "sandbox-file-service"
_TEMP_SUFFIX = ".part"


class FileLimits(pydantic.BaseModel):
    """Limits of one upload (beyond them: RESOURCE_EXHAUSTED naming the file)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    #: Bytes one file may have.
    max_file_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    #: Files one upload may carry (the batch's free essay slots bound it too).
    max_files_per_upload: int = Field(default=100, ge=1, le=500)


@dataclass(frozen=True, slots=True)
class FileStatistics:
    """``uploads_active``: streams being received now; ``temp_files``: their temporary
    files on disk; ``files_registered`` / ``bytes_stored``: what uploads committed;
    ``uploads_rejected``: streams that ended without registering anything."""

    uploads_active: int
    temp_files: int
    files_registered: int
    bytes_stored: int
    uploads_rejected: int


@dataclass
class _Incoming:
    """One file of the upload being received."""

    index: int
    filename: str
    content_type: str
    temp: Path | None
    size: int = 0
    sha: Any = field(default_factory=hashlib.sha256)
    handle: Any = None  # trio's async file, while open
    closed: bool = False


@dataclass
class _Upload:
    """The stream so far: header facts and the files received."""

    user_id: str
    record: BatchRecord
    upload_id: str
    replay: files_v1.UploadFilesResponse | None
    files: list[_Incoming] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.user_id, self.record.batch_id, self.upload_id)


def _filename(value: str) -> str:
    name = value.strip()
    if not name:
        raise ValidationError("file_start.filename is required", field="file_start.filename")
    if len(name) > MAX_FILENAME_CHARS:
        raise ValidationError(
            f"file_start.filename is longer than {MAX_FILENAME_CHARS} characters",
            field="file_start.filename",
        )
    if (
        name in (".", "..")
        or "/" in name
        or "\\" in name
        or any(unicodedata.category(c).startswith("C") for c in name)
    ):
        raise ValidationError(
            "file_start.filename must be a plain file name (no directories or control characters)",
            field="file_start.filename",
        )
    return name


def _copy(info: files_v1.FileInfo) -> files_v1.FileInfo:
    return files_v1.FileInfo.parse(bytes(info))


def _move_all(pairs: list[tuple[Path, Path]]) -> None:
    """Rename every ``(temp, final)``; on a failure move the done ones back and re-raise."""
    done: list[tuple[Path, Path]] = []
    try:
        for temp, final in pairs:
            os.replace(temp, final)
            done.append((temp, final))
    except OSError:
        for temp, final in reversed(done):
            os.replace(final, temp)
        raise


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class SandboxFiles(files_v1.FileServiceBase):
    """The FileService over ``state_dir``; see the module docstring.

    Call :meth:`prepare` (blocking: from a worker thread) before serving: it creates the
    folders and deletes temporary files a crashed run left behind.
    """

    def __init__(
        self,
        state_dir: Path,
        batches: SandboxBatches,
        publisher: EventPublisher,
        limits: FileLimits | None = None,
    ) -> None:
        self.incoming_dir = state_dir / "incoming"
        self.files_dir = state_dir / "files"
        self._batches = batches
        self._publisher = publisher
        self.limits = limits or FileLimits()
        self._files: dict[str, list[files_v1.FileInfo]] = {}
        self._paths: dict[str, Path] = {}
        self._completed: dict[tuple[str, str, str], files_v1.UploadFilesResponse] = {}
        self._committing: dict[tuple[str, str, str], trio.Event] = {}
        self._active = 0
        self._temp_files = 0
        self._rejected = 0
        self._bytes_stored = 0

    def prepare(self) -> None:
        """Create the folders; delete leftover temporary files (blocking)."""
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming_dir.glob(f"*{_TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)

    def statistics(self) -> FileStatistics:
        return FileStatistics(
            uploads_active=self._active,
            temp_files=self._temp_files,
            files_registered=len(self._paths),
            bytes_stored=self._bytes_stored,
            uploads_rejected=self._rejected,
        )

    def path_of(self, file_id: str) -> Path:
        """Where a registered file's bytes are; ``KeyError`` for an unknown id."""
        return self._paths[file_id]

    # -- the contract ----------------------------------------------------------------------

    async def upload_files(
        self, messages: AsyncIterator[files_v1.UploadFilesRequest]
    ) -> files_v1.UploadFilesResponse:
        """Receive one upload (see the module docstring); all-or-nothing."""
        self._active += 1
        upload: _Upload | None = None
        committed = False
        try:
            stream = messages.__aiter__()
            upload = await self._header(stream)
            await self._receive(upload, stream)
            response = await self._commit(upload)
            committed = True
            return response
        finally:
            try:
                if upload is not None:
                    await self._discard(upload)
            finally:
                self._active -= 1
                if not committed:
                    self._rejected += 1

    async def list_files(self, message: files_v1.ListFilesRequest) -> files_v1.ListFilesResponse:
        """The actor's batch's files in upload order; NOT_FOUND for a missing or foreign one."""
        await trio.lowlevel.checkpoint()
        actor = actor_of(message.actor)
        record = self._batches.owned(actor.user_id, message.batch_id)
        return files_v1.ListFilesResponse(
            files=[_copy(f) for f in self._files.get(record.batch_id, [])]
        )

    # -- receiving -------------------------------------------------------------------------

    async def _header(self, stream: AsyncIterator[files_v1.UploadFilesRequest]) -> _Upload:
        first = await anext(stream, None)
        if first is None:
            raise ValidationError("the stream ended before the header", field="header")
        kind, header = betterproto2.which_one_of(first, "kind")
        if kind != "header" or not isinstance(header, files_v1.UploadHeader):
            raise ValidationError(
                f"the first message must be the header, not {kind or 'empty'}", field="header"
            )
        actor = actor_of(header.actor)
        record = self._batches.owned(actor.user_id, header.batch_id)
        upload_id = header.upload_id or uuid.uuid4().hex
        if len(upload_id) > MAX_KEY_CHARS:
            raise ValidationError(
                f"header.upload_id is longer than {MAX_KEY_CHARS} characters",
                field="header.upload_id",
            )
        key = (actor.user_id, record.batch_id, upload_id)
        return _Upload(actor.user_id, record, upload_id, self._completed.get(key))

    async def _receive(
        self, upload: _Upload, stream: AsyncIterator[files_v1.UploadFilesRequest]
    ) -> None:
        current: _Incoming | None = None
        async for message in stream:
            kind, value = betterproto2.which_one_of(message, "kind")
            if kind == "file_start" and isinstance(value, files_v1.FileStart):
                if current is not None:
                    raise ValidationError(
                        f"file_start before the file_end of {current.filename!r}",
                        field="file_start",
                    )
                current = await self._start(upload, value)
            elif kind == "chunk" and isinstance(value, bytes):
                if current is None:
                    raise ValidationError("chunk outside a file (no file_start)", field="chunk")
                await self._chunk(current, value)
            elif kind == "file_end" and isinstance(value, files_v1.FileEnd):
                if current is None:
                    raise ValidationError("file_end without a file_start", field="file_end")
                await self._end(current, value)
                current = None
            elif kind == "header":
                raise ValidationError("the header must be sent once, first", field="header")
            else:
                raise ValidationError("a message with nothing set", field="kind")
        if current is not None:
            raise ValidationError(
                f"the stream ended inside file {current.filename!r} (no file_end)",
                field="file_end",
            )
        if not upload.files:
            raise ValidationError("the upload holds no file", field="files")

    async def _start(self, upload: _Upload, start: files_v1.FileStart) -> _Incoming:
        index = len(upload.files)
        if start.file_index != index:
            raise ValidationError(
                f"file_start.file_index must be {index} (its position), not {start.file_index}",
                field="file_start.file_index",
            )
        name = _filename(start.filename)
        content_type = start.content_type.strip()
        if not content_type or len(content_type) > MAX_CONTENT_TYPE_CHARS:
            raise ValidationError(
                f"file_start.content_type of {name!r} must be 1..{MAX_CONTENT_TYPE_CHARS} "
                "characters",
                field="file_start.content_type",
            )
        where = f"files.{index}"
        if index >= self.limits.max_files_per_upload:
            raise PayloadTooLargeError(
                f"file {name!r} (#{index + 1}) is over the limit of "
                f"{self.limits.max_files_per_upload} files per upload",
                field=where,
            )
        if upload.replay is None and index >= upload.record.free_slots():
            raise PayloadTooLargeError(
                f"file {name!r} (#{index + 1}) does not fit: batch expects "
                f"{len(upload.record.essay_ids)} essays and has "
                f"{upload.record.free_slots()} without a file",
                field=where,
            )
        incoming = _Incoming(index, name, content_type, temp=None)
        upload.files.append(incoming)
        if upload.replay is None:
            # Registered before the open, so cleanup finds it whatever happens next.
            incoming.temp = self.incoming_dir / f"{uuid.uuid4().hex}{_TEMP_SUFFIX}"
            self._temp_files += 1
            incoming.handle = await trio.open_file(incoming.temp, "xb")
        return incoming

    async def _chunk(self, incoming: _Incoming, data: bytes) -> None:
        if len(data) > MAX_CHUNK_BYTES:
            raise ValidationError(
                f"a chunk of {incoming.filename!r} has {len(data)} bytes, over {MAX_CHUNK_BYTES}",
                field="chunk",
            )
        incoming.size += len(data)
        if incoming.size > self.limits.max_file_bytes:
            raise PayloadTooLargeError(
                f"file {incoming.filename!r} is larger than {self.limits.max_file_bytes} bytes",
                field=f"files.{incoming.index}",
            )
        incoming.sha.update(data)
        if incoming.handle is not None:
            await incoming.handle.write(data)

    async def _end(self, incoming: _Incoming, end: files_v1.FileEnd) -> None:
        name = incoming.filename
        if incoming.size == 0:
            raise ValidationError(f"file {name!r} is empty", field="file_end.size_bytes")
        if end.size_bytes != incoming.size:
            raise ValidationError(
                f"file {name!r}: file_end.size_bytes is {end.size_bytes} but "
                f"{incoming.size} bytes arrived",
                field="file_end.size_bytes",
            )
        received = incoming.sha.hexdigest()
        if not hmac.compare_digest(end.sha256.encode(), received.encode()):
            raise ValidationError(
                f"file {name!r}: file_end.sha256 does not match the bytes received",
                field="file_end.sha256",
            )
        if incoming.handle is not None:
            handle, incoming.handle = incoming.handle, None
            await handle.aclose()
        incoming.closed = True

    # -- committing ------------------------------------------------------------------------

    async def _commit(self, upload: _Upload) -> files_v1.UploadFilesResponse:
        key = upload.key
        while (pending := self._committing.get(key)) is not None:
            await pending.wait()  # a concurrent stream with this id is committing
        done = upload.replay or self._completed.get(key)
        if done is not None:
            return files_v1.UploadFilesResponse.parse(bytes(done))
        record = upload.record
        if len(upload.files) > record.free_slots():
            # Another upload filled slots while this one streamed.
            spare = upload.files[record.free_slots()]
            raise PayloadTooLargeError(
                f"file {spare.filename!r} (#{spare.index + 1}) does not fit: batch expects "
                f"{len(record.essay_ids)} essays and has {record.free_slots()} without a file",
                field=f"files.{spare.index}",
            )
        committing = self._committing[key] = trio.Event()
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(COMMIT_TIMEOUT_S) as timer:
                response = await self._register(upload)
            if timer.cancelled_caught:
                raise UnavailableError("the upload could not be committed in time")
            return response
        finally:
            del self._committing[key]
            committing.set()

    async def _register(self, upload: _Upload) -> files_v1.UploadFilesResponse:
        """Move the files into place, register them, publish; undo all on a failure."""
        record = upload.record
        essay_ids = self._batches.assign_slots(record.batch_id, len(upload.files))
        infos: list[files_v1.FileInfo] = []
        pairs: list[tuple[Path, Path]] = []
        now = dt.datetime.now(dt.UTC)
        for incoming, essay_id in zip(upload.files, essay_ids, strict=True):
            assert incoming.temp is not None and incoming.closed
            file_id = str(uuid.uuid4())
            pairs.append((incoming.temp, self.files_dir / file_id))
            infos.append(
                files_v1.FileInfo(
                    file_id=file_id,
                    batch_id=record.batch_id,
                    file_index=incoming.index,
                    filename=incoming.filename,
                    content_type=incoming.content_type,
                    size_bytes=incoming.size,
                    sha256=incoming.sha.hexdigest(),
                    uploaded_at=now,
                    essay_id=essay_id,
                )
            )
        try:
            await trio.to_thread.run_sync(_move_all, pairs)
        except BaseException:
            self._batches.release_slots(record.batch_id, essay_ids)
            raise
        for incoming in upload.files:
            incoming.temp = None  # moved: nothing left to discard
            self._temp_files -= 1
        finals = [final for _, final in pairs]
        listed = self._files.setdefault(record.batch_id, [])
        listed.extend(infos)
        for info, final in zip(infos, finals, strict=True):
            self._paths[info.file_id] = final
        self._bytes_stored += sum(i.size_bytes for i in infos)
        response = files_v1.UploadFilesResponse(upload_id=upload.upload_id, files=infos)
        self._completed[upload.key] = response
        try:
            await self._publish(upload, infos)
        except BaseException:
            self._completed.pop(upload.key, None)
            gone = {i.file_id for i in infos}
            self._files[record.batch_id] = [f for f in listed if f.file_id not in gone]
            for info in infos:
                self._paths.pop(info.file_id, None)
            self._bytes_stored -= sum(i.size_bytes for i in infos)
            self._batches.release_slots(record.batch_id, essay_ids)
            with trio.CancelScope(shield=True):  # the commit's timer may be what failed
                await trio.to_thread.run_sync(_remove_all, finals)
            raise
        log.info(
            "files uploaded",
            batch_id=record.batch_id,
            upload_id=upload.upload_id,
            files=len(infos),
            bytes=sum(i.size_bytes for i in infos),
        )
        return files_v1.UploadFilesResponse.parse(bytes(response))

    async def _publish(self, upload: _Upload, infos: list[files_v1.FileInfo]) -> None:
        record = upload.record
        owner = record.owner
        keyed = []
        for info in infos:
            keyed.append(
                (
                    record.batch_id,
                    self._publisher.envelope(
                        events_v1.EssaySlotAssigned(
                            batch_id=record.batch_id,
                            essay_id=info.essay_id,
                            file_id=info.file_id,
                            filename=info.filename,
                            text_storage_id=f"text-{info.file_id}",
                        ),
                        source=LIFECYCLE_SOURCE,
                        user_id=owner,
                    ),
                )
            )
            keyed.append(
                (
                    owner,
                    self._publisher.teacher_notification(
                        teacher_id=owner,
                        notification_type="file_uploaded",
                        category=events_v1.NotificationCategory.FILE_OPERATIONS,
                        batch_id=record.batch_id,
                        data={
                            "batch_id": record.batch_id,
                            "upload_id": upload.upload_id,
                            "file_id": info.file_id,
                            "essay_id": info.essay_id,
                            "filename": info.filename,
                            "size_bytes": info.size_bytes,
                        },
                        source=FILE_SOURCE,
                    ),
                )
            )
        await self._publisher.publish_envelopes(keyed)

    async def _discard(self, upload: _Upload) -> None:
        """Close and delete whatever temporary files the upload still has (shielded)."""
        left = [f for f in upload.files if f.temp is not None]
        if not left:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(COMMIT_TIMEOUT_S):
            for incoming in left:
                if incoming.handle is not None:
                    handle, incoming.handle = incoming.handle, None
                    await handle.aclose()
            paths = [f.temp for f in left if f.temp is not None]
            await trio.to_thread.run_sync(_remove_all, paths)
            for incoming in left:
                incoming.temp = None
                self._temp_files -= 1
