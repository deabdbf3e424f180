"""The sandbox file backend: ``huleedu.files.v1.FileService`` for development and tests.

Files are stored under a state folder (``<root>/batches/<batch_id>/<file_id>``). What the
contract promises, and how it is kept here:

* **all-or-nothing**: an upload's bytes go to a private temporary folder as they arrive
  (never held whole in memory); only when the stream completes normally are the files moved
  into place and registered. A cancelled call, a passed deadline, an out-of-order message or
  any error deletes the temporary folder: nothing is registered, no byte is kept;
* the order is ``header``, then per file ``file_start`` (``file_index`` counting from 0),
  ``chunk``\\* (each at most 1 MiB) and ``file_end``, whose size and SHA-256 must match the
  bytes received; anything else answers INVALID_ARGUMENT naming the field;
* a file over ``max_file_bytes`` or more than ``max_files`` files answer RESOURCE_EXHAUSTED
  naming the limit (:class:`~common.errors.PayloadTooLargeError`);
* the batch must be the actor's (else NOT_FOUND); a retried ``upload_id`` returns the first
  result and registers nothing twice;
* on success each file becomes an essay: ``EssaySlotAssigned`` per file on the bus, the
  orchestrator told (so a pipeline can be requested), and a teacher notification
  (``files_uploaded``, file operations) published.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.events import v1 as events_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.errors import NotFoundError, PayloadTooLargeError, ValidationError
from common.events import make_envelope
from common.logs import get_logger
from deploy.sandbox.orchestrator import Essay, Publish, SandboxBatches

__all__ = ["FileLimits", "SandboxFiles"]

log = get_logger("sandbox.files")
SOURCE = "sandbox-file-service"
MAX_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class FileLimits:
    max_file_bytes: int = 100 << 20
    max_files: int = 500


@dataclass
class _Incoming:
    start: files_v1.FileStart
    path: Path
    handle: Any
    size: int = 0

    def __post_init__(self) -> None:
        self.sha = hashlib.sha256()


def _user(actor: common_v1.Actor | None) -> common_v1.Actor:
    if actor is None or not actor.user_id:
        raise ValidationError("header.actor.user_id is required", field="header.actor.user_id")
    return actor


class SandboxFiles(files_v1.FileServiceBase):
    def __init__(
        self,
        root: Path,
        batches: SandboxBatches,
        publish: Publish,
        *,
        limits: FileLimits | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.root = root
        (root / "batches").mkdir(parents=True, exist_ok=True)
        (root / "incoming").mkdir(parents=True, exist_ok=True)
        self._batches = batches
        self._publish = publish
        self.limits = limits or FileLimits()
        self._now = now
        self._files: dict[str, list[files_v1.FileInfo]] = {}
        self._uploads: dict[tuple[str, str], files_v1.UploadFilesResponse] = {}

    def incoming(self) -> list[Path]:
        """Temporary upload folders still present (none once every upload has ended)."""
        return sorted((self.root / "incoming").iterdir())

    async def upload_files(
        self, messages: AsyncIterator[files_v1.UploadFilesRequest]
    ) -> files_v1.UploadFilesResponse:
        first = await anext(messages, None)
        if first is None or first.header is None:
            raise ValidationError("the first message must be the header", field="header")
        header = first.header
        actor = _user(header.actor)
        if not header.upload_id or len(header.upload_id) > 128:
            raise ValidationError("upload_id must be 1..128 characters", field="header.upload_id")
        if not self._batches.owner_of(actor.user_id, header.batch_id):
            raise NotFoundError("batch not found", field="header.batch_id")
        previous = self._uploads.get((actor.user_id, header.upload_id))
        if previous is not None:
            async for _ in messages:  # drain: the retry's bytes are not kept
                pass
            return previous
        folder = self.root / "incoming" / uuid.uuid4().hex
        folder.mkdir()
        try:
            done = await self._receive(messages, folder)
            return await self._register(actor, header, done, folder)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(shutil.rmtree, folder, True)

    async def _receive(
        self, messages: AsyncIterator[files_v1.UploadFilesRequest], folder: Path
    ) -> list[_Incoming]:
        done: list[_Incoming] = []
        current: _Incoming | None = None
        try:
            async for message in messages:
                if message.header is not None:
                    raise ValidationError("the header may come only once", field="header")
                if message.file_start is not None:
                    if current is not None:
                        raise ValidationError(
                            "file_start before the open file's file_end", field="file_start"
                        )
                    start = message.file_start
                    if start.file_index != len(done):
                        raise ValidationError(
                            f"file_index must be {len(done)}", field="file_start.file_index"
                        )
                    if not start.filename or "/" in start.filename or len(start.filename) > 255:
                        raise ValidationError(
                            "filename must be 1..255 characters with no '/'",
                            field="file_start.filename",
                        )
                    if len(done) >= self.limits.max_files:
                        raise PayloadTooLargeError(
                            f"more than {self.limits.max_files} files", field="max_files"
                        )
                    path = folder / f"{len(done):05d}"
                    current = _Incoming(start, path, await trio.open_file(path, "wb"))
                elif message.chunk is not None:
                    if current is None:
                        raise ValidationError("chunk outside a file", field="chunk")
                    if len(message.chunk) > MAX_CHUNK:
                        raise ValidationError("chunk over 1 MiB", field="chunk")
                    current.size += len(message.chunk)
                    if current.size > self.limits.max_file_bytes:
                        raise PayloadTooLargeError(
                            f"{current.start.filename}: over {self.limits.max_file_bytes} bytes",
                            field="max_file_bytes",
                        )
                    current.sha.update(message.chunk)
                    await current.handle.write(message.chunk)
                elif message.file_end is not None:
                    if current is None:
                        raise ValidationError("file_end outside a file", field="file_end")
                    end = message.file_end
                    if end.size_bytes != current.size:
                        raise ValidationError(
                            f"{current.start.filename}: file_end says {end.size_bytes} bytes, "
                            f"{current.size} received",
                            field="file_end.size_bytes",
                        )
                    if end.sha256 != current.sha.hexdigest():
                        raise ValidationError(
                            f"{current.start.filename}: SHA-256 does not match the bytes",
                            field="file_end.sha256",
                        )
                    await current.handle.aclose()
                    done.append(current)
                    current = None
                else:
                    raise ValidationError("an empty message", field="kind")
            if current is not None:
                raise ValidationError("the stream ended inside a file", field="file_end")
            if not done:
                raise ValidationError("the upload holds no file", field="file_start")
            return done
        finally:
            if current is not None:
                with trio.CancelScope(shield=True):
                    await current.handle.aclose()

    async def _register(
        self,
        actor: common_v1.Actor,
        header: files_v1.UploadHeader,
        done: list[_Incoming],
        folder: Path,
    ) -> files_v1.UploadFilesResponse:
        target = self.root / "batches" / header.batch_id
        target.mkdir(parents=True, exist_ok=True)
        registered = self._files.setdefault(header.batch_id, [])
        now = self._now()
        infos: list[files_v1.FileInfo] = []
        essays: list[Essay] = []
        for incoming in done:
            file_id = str(uuid.uuid4())
            essay_id = str(uuid.uuid4())
            incoming.path.rename(target / file_id)
            infos.append(
                files_v1.FileInfo(
                    file_id=file_id,
                    batch_id=header.batch_id,
                    file_index=len(registered) + len(infos),
                    filename=incoming.start.filename,
                    content_type=incoming.start.content_type,
                    size_bytes=incoming.size,
                    sha256=incoming.sha.hexdigest(),
                    uploaded_at=now,
                    essay_id=essay_id,
                )
            )
            essays.append(Essay(essay_id, incoming.start.filename, file_id))
        # Registered from here on; nothing below can fail half-way for the client.
        registered.extend(infos)
        self._batches.essays_registered(header.batch_id, essays)
        reply = files_v1.UploadFilesResponse(upload_id=header.upload_id, files=infos)
        self._uploads[(actor.user_id, header.upload_id)] = reply
        with trio.CancelScope(shield=True):
            for essay in essays:
                await self._publish(
                    make_envelope(
                        events_v1.EssaySlotAssigned(
                            batch_id=header.batch_id,
                            essay_id=essay.essay_id,
                            file_id=essay.file_id,
                            filename=essay.filename,
                            text_storage_id=f"text-{essay.file_id}",
                        ),
                        source_service=SOURCE,
                        user_id=actor.user_id,
                        correlation_id=actor.correlation_id,
                    ),
                    header.batch_id,
                )
            await self._publish(
                make_envelope(
                    events_v1.TeacherNotificationRequested(
                        teacher_id=actor.user_id,
                        notification_type="files_uploaded",
                        category=events_v1.NotificationCategory.FILE_OPERATIONS,
                        priority=events_v1.NotificationPriority.STANDARD,
                        batch_id=header.batch_id,
                        payload_json=json.dumps(
                            {
                                "batch_id": header.batch_id,
                                "files": [i.filename for i in infos],
                                "upload_id": header.upload_id,
                            }
                        ),
                    ),
                    source_service=SOURCE,
                    user_id=actor.user_id,
                    correlation_id=actor.correlation_id,
                ),
                actor.user_id,
            )
        log.info("upload registered", batch_id=header.batch_id, files=len(infos))
        return reply

    async def list_files(self, message: files_v1.ListFilesRequest) -> files_v1.ListFilesResponse:
        actor = message.actor
        if actor is None or not actor.user_id:
            raise ValidationError("actor.user_id is required", field="actor.user_id")
        if not self._batches.owner_of(actor.user_id, message.batch_id):
            raise NotFoundError("batch not found", field="batch_id")
        return files_v1.ListFilesResponse(files=list(self._files.get(message.batch_id, [])))
