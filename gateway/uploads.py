"""The streaming upload proxy: ``POST /v1/batches/{id}/files`` (multipart/form-data) into the
client-streaming ``FileService.UploadFiles``.

The body is pulled from the client chunk by chunk (:class:`~gateway.bodystream.BodyStream`),
parsed incrementally (:mod:`gateway.multipart`) and forwarded as it arrives: a header message,
then per file ``file_start``, ``chunk``\\* (at most ``upload_chunk_bytes`` each) and ``file_end``
with the size and SHA-256 the gateway computed. Memory is bounded by a few chunks whatever the
file size: the gRPC stream's buffer is small, and the client is read only as fast as the
backend takes the bytes.

Limits, each a problem document naming the setting:

* a file over ``upload_max_file_bytes``, the body over ``upload_max_total_bytes`` -> 413;
* more than ``upload_max_files`` files -> 413 (``upload_max_files``);
* a declared type outside ``upload_allowed_types``, or first bytes that do not match the
  declared type -> 415 (``content_type``);
* a part without a file name, a malformed body -> 422.

All-or-nothing: on any error (a limit, the client going away, the backend failing, the
deadline) the gRPC call is cancelled before it completes, and the backend contract is that
an upload whose stream did not complete registers nothing and discards every byte.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pydantic
from quart import Response, g, request
from quart_trio import QuartTrio

from common.contracts.huleedu.files import v1 as files_v1
from common.errors import (
    ClientError,
    HuleEduError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from common.logs import get_logger
from common.rpc import StreamCall
from common.tokens import AccessClaims
from gateway.backends import public_error, route_budget
from gateway.batches import BatchBackends, RouteBudgets, actor, idempotency_key
from gateway.bodystream import SCOPE_KEY, BodyStream, ClientDisconnected
from gateway.http import asgi_scope, json_response
from gateway.multipart import (
    MultipartParser,
    PartData,
    PartEnded,
    PartStarted,
    boundary_from_content_type,
)
from gateway.openapi import api
from gateway.sniff import SNIFF_BYTES, check_type
from gateway.views import FileList, FileOut, batch_id_from_path

__all__ = ["UPLOAD_PATH", "UploadForm", "UploadLimits", "is_upload", "register_upload_routes"]

log = get_logger("gateway.uploads")

Handler = Callable[..., Awaitable[Response]]
Protect = Callable[[Handler], Handler]

UPLOAD_PATH = re.compile(r"/v1/batches/[^/]+/files")


def is_upload(method: str, path: str) -> bool:
    return method == "POST" and UPLOAD_PATH.fullmatch(path) is not None


class UploadForm(pydantic.BaseModel):
    """One or more essay files, each a part with a file name and its media type."""

    files: list[bytes] = pydantic.Field(description="The files (parts with a filename).")


@dataclass(frozen=True, slots=True)
class UploadLimits:
    max_file_bytes: int
    max_files: int
    max_total_bytes: int
    allowed_types: frozenset[str]
    chunk_bytes: int


@dataclass
class _OpenFile:
    index: int
    filename: str
    content_type: str
    size: int = 0
    #: Bytes held back until SNIFF_BYTES are known (then sent; empty afterwards).
    head: bytearray | None = None
    started: bool = False

    def __post_init__(self) -> None:
        self.sha = hashlib.sha256()
        self.head = bytearray()


class _Uploader:
    """Feeds one multipart body into one ``UploadFiles`` call."""

    def __init__(
        self, call: StreamCall[files_v1.UploadFilesRequest, object], limits: UploadLimits
    ) -> None:
        self._call = call
        self._limits = limits
        self._file: _OpenFile | None = None
        self._count = 0
        self._pending = bytearray()

    async def on_start(self, part: PartStarted) -> None:
        if not part.filename:
            raise ValidationError(
                f"part {part.name!r} is not a file (no filename); only files are accepted",
                field=part.name,
            )
        if self._count >= self._limits.max_files:
            raise PayloadTooLargeError(
                f"more than {self._limits.max_files} files", field="upload_max_files"
            )
        declared = (part.content_type or "").split(";")[0].strip().lower()
        if declared not in self._limits.allowed_types:
            raise UnsupportedMediaTypeError(
                f"{part.filename}: type {declared or 'none'!r} is not accepted; one of "
                f"{', '.join(sorted(self._limits.allowed_types))}",
                field="content_type",
            )
        self._file = _OpenFile(self._count, part.filename, declared)
        self._count += 1

    async def on_data(self, data: bytes) -> None:
        f = self._file
        assert f is not None
        f.size += len(data)
        if f.size > self._limits.max_file_bytes:
            raise PayloadTooLargeError(
                f"{f.filename}: over {self._limits.max_file_bytes} bytes",
                field="upload_max_file_bytes",
            )
        f.sha.update(data)
        if not f.started:
            assert f.head is not None
            f.head += data
            if len(f.head) < SNIFF_BYTES:
                return
            await self._begin(f)
            return
        self._pending += data
        while len(self._pending) >= self._limits.chunk_bytes:
            await self._flush(self._limits.chunk_bytes)

    async def on_end(self) -> None:
        f = self._file
        assert f is not None
        if not f.started:
            await self._begin(f)
        await self._flush(len(self._pending))
        await self._call.send(
            files_v1.UploadFilesRequest(
                file_end=files_v1.FileEnd(size_bytes=f.size, sha256=f.sha.hexdigest())
            )
        )
        self._file = None

    @property
    def files(self) -> int:
        return self._count

    async def _begin(self, f: _OpenFile) -> None:
        assert f.head is not None
        check_type(f.content_type, bytes(f.head[:SNIFF_BYTES]), filename=f.filename)
        await self._call.send(
            files_v1.UploadFilesRequest(
                file_start=files_v1.FileStart(
                    file_index=f.index, filename=f.filename, content_type=f.content_type
                )
            )
        )
        f.started = True
        self._pending += f.head
        f.head = None
        while len(self._pending) >= self._limits.chunk_bytes:
            await self._flush(self._limits.chunk_bytes)

    async def _flush(self, size: int) -> None:
        if size <= 0:
            return
        chunk = bytes(self._pending[:size])
        del self._pending[:size]
        await self._call.send(files_v1.UploadFilesRequest(chunk=chunk))


def register_upload_routes(
    app: QuartTrio,
    protected: Protect,
    backends: BatchBackends,
    budget: RouteBudgets,
    limits: UploadLimits,
) -> None:
    b = backends

    @app.post("/v1/batches/<batch_id>/files")
    @api(
        "upload_files",
        "files",
        ok=201,
        request=UploadForm,
        response=FileList,
        request_content_type="multipart/form-data",
        errors=(401, 404, 408, 409, 413, 415, 422, 502, 503, 504),
    )
    @protected
    async def upload_files(batch_id: str) -> Response:
        batch_id = batch_id_from_path(batch_id)
        claims: AccessClaims = g.claims
        stream = asgi_scope().get(SCOPE_KEY)
        if not isinstance(stream, BodyStream):  # pragma: no cover - the edge always sets it
            raise ClientError("upload body not available", field="body")
        stream.check_declared_length()
        boundary = boundary_from_content_type(request.headers.get("content-type", ""))
        parser = MultipartParser(boundary)
        upload_id = idempotency_key() or uuid.uuid4().hex
        header = files_v1.UploadFilesRequest(
            header=files_v1.UploadHeader(
                actor=actor(claims), batch_id=batch_id, upload_id=upload_id
            )
        )
        with route_budget(budget("upload_files")):
            try:
                async with b.files.stream(
                    lambda: b.file_channel.stream_unary(b.file_stub.upload_files)
                ) as call:
                    await call.send(header)
                    uploader = _Uploader(call, limits)
                    while chunk := await stream.receive_some():
                        for event in parser.feed(chunk):
                            await _dispatch(uploader, event)
                    for event in parser.end():
                        await _dispatch(uploader, event)
                    if uploader.files == 0:
                        raise ValidationError("the upload holds no file", field="files")
                    reply = await call.finish()
            except ClientDisconnected:
                log.info("upload abandoned by the client", batch_id=batch_id)
                raise ClientError("client went away") from None
            except HuleEduError as exc:
                if exc.service is not None:  # from the backend: the one error table
                    raise public_error(exc, "batch") from None
                raise
        assert isinstance(reply, files_v1.UploadFilesResponse)
        out = FileList(batch_id=batch_id, files=[FileOut.of(f) for f in reply.files])
        return json_response(out.model_dump(mode="json"), status=201)


async def _dispatch(uploader: _Uploader, event: object) -> None:
    if isinstance(event, PartStarted):
        await uploader.on_start(event)
    elif isinstance(event, PartData):
        await uploader.on_data(event.data)
    elif isinstance(event, PartEnded):
        await uploader.on_end()
