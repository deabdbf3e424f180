"""Fixtures: the sandbox backends on 127.0.0.1 (port 0) over real gRPC, on a memory bus."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_asyncio
from grpclib import GRPCError
from grpclib.const import Status

from common.bus import EventBus, open_memory_bus
from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.errors import UnavailableError
from common.events import EventEnvelope, decode_envelope
from common.rpc import RpcChannel, open_channel, open_rpc_loop
from deploy.sandbox.files import FileLimits
from deploy.sandbox.pipeline import PipelineSettings
from deploy.sandbox.serve import SandboxBackends, SandboxSettings, serve_sandbox_backends

TEACHER = common_v1.Actor(user_id="teacher-1", org_id="org-1", roles=["teacher"])
OTHER = common_v1.Actor(user_id="teacher-2", org_id="org-1", roles=["teacher"])
#: Real-time delays small enough that a whole run takes milliseconds.
FAST = PipelineSettings(essay_delay_s=0.001, phase_delay_s=0.001, seed=7)
LIMITS = FileLimits(max_file_bytes=64 * 1024, max_files_per_upload=4)
#: Resends of a stream that hit the client-side closed-stream race (see ``send_stream``).
RACE_RETRIES = 5


@dataclass
class Sandbox:
    running: SandboxBackends
    channel: RpcChannel
    bus: EventBus
    settings: SandboxSettings

    @property
    def batches(self) -> batches_v1.BatchServiceStub:
        return self.channel.stub(batches_v1.BatchServiceStub)

    @property
    def files(self) -> files_v1.FileServiceStub:
        return self.channel.stub(files_v1.FileServiceStub)

    def on_disk(self) -> tuple[list[Path], list[Path]]:
        """``(incoming, stored)`` files under the state folder."""
        state = self.settings.state_dir
        return sorted((state / "incoming").iterdir()), sorted((state / "files").iterdir())

    async def register(
        self, actor: common_v1.Actor = TEACHER, essays: int = 3, **fields: Any
    ) -> batches_v1.Batch:
        values: dict[str, Any] = {
            "actor": actor,
            "course_code": "ENG5",
            "essay_instructions": "Write about winter.",
            "expected_essay_count": essays,
            **fields,
        }
        request = batches_v1.RegisterBatchRequest(**values)
        with trio.fail_after(5):
            reply = await self.channel.call(self.batches.register_batch, request)
        assert reply.batch is not None
        return reply.batch

    async def upload(
        self,
        batch_id: str,
        files: Sequence[tuple[str, bytes]],
        *,
        actor: common_v1.Actor = TEACHER,
        upload_id: str | None = None,
        chunk: int = 1000,
    ) -> files_v1.UploadFilesResponse:
        messages = upload_messages(batch_id, files, actor=actor, upload_id=upload_id, chunk=chunk)
        return await self.send_stream(messages)

    async def send_stream(
        self, messages: Sequence[files_v1.UploadFilesRequest]
    ) -> files_v1.UploadFilesResponse:
        """Send an upload stream and half-close it.

        When the server ends the call while the client is still sending (a refused upload),
        grpclib's client may trip over the closed HTTP/2 stream before it reads the server's
        status (``common.rpc`` then reports "the server closed the stream before it ended").
        That is a client-side race, not the behaviour under test, so the stream is sent
        again (a refused upload keeps nothing, so a resend is the same upload).
        """
        for _ in range(RACE_RETRIES):
            try:
                return await self._send_once(messages)
            except UnavailableError as exc:
                if "closed the stream before it ended" not in exc.message:
                    raise
        raise AssertionError(f"the stream hit the client race {RACE_RETRIES} times")

    async def _send_once(
        self, messages: Sequence[files_v1.UploadFilesRequest]
    ) -> files_v1.UploadFilesResponse:
        with trio.fail_after(5):
            async with self.channel.stream_unary(self.files.upload_files) as call:
                for message in messages:
                    await call.send(message)
                return await call.finish()

    async def list_files(
        self, batch_id: str, actor: common_v1.Actor = TEACHER
    ) -> list[files_v1.FileInfo]:
        request = files_v1.ListFilesRequest(actor=actor, batch_id=batch_id)
        with trio.fail_after(5):
            return (await self.channel.call(self.files.list_files, request)).files

    async def events(self, *topics: str) -> list[EventEnvelope]:
        """Every event published so far on ``topics`` (any order across partitions)."""
        await self.bus.ensure_topics(list(topics))
        found: list[EventEnvelope] = []
        async with self.bus.subscribe(list(topics), f"probe-{uuid.uuid4().hex}") as sub:
            while batch := await sub.get_batch(timeout_s=0.05):
                found += [decode_envelope(r.value) for r in batch]
        return found


def upload_messages(
    batch_id: str,
    files: Sequence[tuple[str, bytes]],
    *,
    actor: common_v1.Actor = TEACHER,
    upload_id: str | None = None,
    chunk: int = 1000,
) -> list[files_v1.UploadFilesRequest]:
    """A well-formed upload stream of ``(filename, data)`` files."""
    messages = [
        files_v1.UploadFilesRequest(
            header=files_v1.UploadHeader(
                actor=actor, batch_id=batch_id, upload_id=upload_id or uuid.uuid4().hex
            )
        )
    ]
    for index, (name, data) in enumerate(files):
        messages.append(
            files_v1.UploadFilesRequest(
                file_start=files_v1.FileStart(
                    file_index=index, filename=name, content_type="text/plain"
                )
            )
        )
        for at in range(0, len(data), chunk):
            messages.append(files_v1.UploadFilesRequest(chunk=data[at : at + chunk]))
        messages.append(
            files_v1.UploadFilesRequest(
                file_end=files_v1.FileEnd(
                    size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
                )
            )
        )
    return messages


def essay(n: int, size: int = 2500) -> tuple[str, bytes]:
    text = f"Essay {n}: winter is cold and the nights are long. ".encode()
    return f"essay-{n}.txt", (text * (size // len(text) + 1))[:size]


async def raw_status(method: Callable[..., Awaitable[Any]], request: Any) -> Status:
    """The gRPC status a unary call answers, straight from grpclib (no error mapping)."""
    try:
        await trio_asyncio.aio_as_trio(method)(request, timeout=5)
    except GRPCError as exc:
        return exc.status
    return Status.OK


SandboxFactory = Callable[..., Awaitable[Sandbox]]


@pytest.fixture
async def start_sandbox(tmp_path: Path) -> AsyncIterator[SandboxFactory]:
    """``await start_sandbox(pipeline=..., files=...)``: a running sandbox with a client."""
    async with open_rpc_loop(), open_memory_bus() as bus, trio.open_nursery() as nursery:

        async def start(**overrides: Any) -> Sandbox:
            values: dict[str, Any] = {
                "grpc_port": 0,
                "state_dir": tmp_path / f"sandbox-{uuid.uuid4().hex[:6]}",
                "pipeline": FAST,
                "files": LIMITS,
                "shutdown_grace_s": 1,
                **overrides,
            }
            settings = SandboxSettings(**values)
            running = await nursery.start(partial(serve_sandbox_backends, settings, bus=bus))
            channel = await nursery.start(_channel, running.port)
            return Sandbox(running, channel, bus, settings)

        yield start
        nursery.cancel_scope.cancel()


async def _channel(port: int, task_status: trio.TaskStatus[RpcChannel]) -> None:
    async with open_channel(f"127.0.0.1:{port}", service="sandbox") as channel:
        task_status.started(channel)
        await trio.sleep_forever()


@pytest.fixture
async def sandbox(start_sandbox: SandboxFactory) -> Sandbox:
    return await start_sandbox()
