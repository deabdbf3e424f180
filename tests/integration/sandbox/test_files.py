"""The sandbox FileService over real gRPC: the stream order, size and digest checks, limits
naming the file, the all-or-nothing contract (a client that cancels or runs out of time
mid-stream leaves no file on disk and nothing registered), retried upload ids, ownership,
and the events that move the aggregator's essays_received."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable

import pytest
import trio

from common.contracts.huleedu.events import v1 as events_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.errors import (
    DeadlineExceededError,
    NotFoundError,
    PayloadTooLargeError,
    ValidationError,
)
from common.events import Topic
from deploy.sandbox.files import FileLimits
from tests.integration.sandbox.conftest import (
    LIMITS,
    OTHER,
    TEACHER,
    Sandbox,
    SandboxFactory,
    essay,
    upload_messages,
)

pytestmark = pytest.mark.slow
Messages = list[files_v1.UploadFilesRequest]


async def _send_all(sandbox: Sandbox, messages: Messages) -> files_v1.UploadFilesResponse:
    return await sandbox.send_stream(messages)


async def _assert_nothing_kept(sandbox: Sandbox, batch_id: str) -> None:
    with trio.fail_after(5):  # the server notices the end of the call a moment later
        while sandbox.running.files.statistics().uploads_active:
            await trio.sleep(0.005)
    incoming, stored = sandbox.on_disk()
    assert incoming == [], f"temporary files left behind: {incoming}"
    assert stored == [], f"files stored by a failed upload: {stored}"
    assert await sandbox.list_files(batch_id) == []
    assert await sandbox.events(Topic.ESSAY_SLOT_ASSIGNED) == []
    assert sandbox.running.files.statistics().temp_files == 0


async def test_upload_stores_registers_and_publishes(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=3)
    files = [essay(1, 2500), essay(2, 10), essay(3, 64 * 1024)]
    reply = await sandbox.upload(batch.batch_id, files, upload_id="up-1")
    assert reply.upload_id == "up-1"
    assert [(f.file_index, f.filename, f.size_bytes) for f in reply.files] == [
        (i, name, len(data)) for i, (name, data) in enumerate(files)
    ]
    assert [f.sha256 for f in reply.files] == [hashlib.sha256(d).hexdigest() for _, d in files]
    assert all(f.essay_id and f.batch_id == batch.batch_id for f in reply.files)
    assert await sandbox.list_files(batch.batch_id) == reply.files
    incoming, stored = sandbox.on_disk()
    assert incoming == [] and len(stored) == 3
    for info, (_, data) in zip(reply.files, files, strict=True):
        assert sandbox.running.files.path_of(info.file_id).read_bytes() == data

    slots = [e for e in await sandbox.events(Topic.ESSAY_SLOT_ASSIGNED)]
    assigned = {e.essay_slot_assigned.essay_id: e for e in slots if e.essay_slot_assigned}
    assert set(assigned) == {f.essay_id for f in reply.files}
    for info in reply.files:
        event = assigned[info.essay_id]
        assert event.user_id == TEACHER.user_id
        assert event.essay_slot_assigned is not None
        assert event.essay_slot_assigned.file_id == info.file_id
        assert event.essay_slot_assigned.filename == info.filename
    registered = (await sandbox.events(Topic.BATCH_REGISTERED))[0].batch_essays_registered
    assert registered is not None
    assert sorted(assigned) == sorted(registered.essay_ids), "files fill the reserved slots"

    notes = [
        e.teacher_notification_requested for e in await sandbox.events(Topic.TEACHER_NOTIFICATION)
    ]
    assert [n.notification_type for n in notes if n] == ["file_uploaded"] * 3
    for note in notes:
        assert note is not None and note.teacher_id == TEACHER.user_id
        assert note.category is events_v1.NotificationCategory.FILE_OPERATIONS
        assert json.loads(note.payload_json)["batch_id"] == batch.batch_id


async def test_files_list_in_upload_order_across_uploads(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=4)
    await sandbox.upload(batch.batch_id, [essay(1), essay(2)])
    await sandbox.upload(batch.batch_id, [essay(3), essay(4)])
    names = [f.filename for f in await sandbox.list_files(batch.batch_id)]
    assert names == ["essay-1.txt", "essay-2.txt", "essay-3.txt", "essay-4.txt"]


def _break_sha(m: Messages) -> Messages:
    assert m[-1].file_end is not None
    m[-1].file_end.sha256 = hashlib.sha256(b"something else").hexdigest()
    return m


def _break_size(m: Messages) -> Messages:
    assert m[-1].file_end is not None
    m[-1].file_end.size_bytes += 1
    return m


def _chunk_before_start(m: Messages) -> Messages:
    return [m[0], files_v1.UploadFilesRequest(chunk=b"loose"), *m[1:]]


def _no_header(m: Messages) -> Messages:
    return m[1:]


def _two_headers(m: Messages) -> Messages:
    return [m[0], m[0], *m[1:]]


def _wrong_index(m: Messages) -> Messages:
    assert m[1].file_start is not None
    m[1].file_start.file_index = 1
    return m


def _ends_inside_file(m: Messages) -> Messages:
    return m[:-1]


def _start_inside_file(m: Messages) -> Messages:
    return [*m[:-1], m[1], *m[2:]]


def _end_without_start(m: Messages) -> Messages:
    return [m[0], m[-1]]


def _directory_name(m: Messages) -> Messages:
    assert m[1].file_start is not None
    m[1].file_start.filename = "../../etc/passwd"
    return m


def _header_only(m: Messages) -> Messages:
    return m[:1]


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (_break_sha, "file_end.sha256"),
        (_break_size, "file_end.size_bytes"),
        (_chunk_before_start, "chunk"),
        (_no_header, "header"),
        (_two_headers, "header"),
        (_wrong_index, "file_start.file_index"),
        (_ends_inside_file, "file_end"),
        (_start_inside_file, "file_start"),
        (_end_without_start, "file_end"),
        (_directory_name, "file_start.filename"),
        (_header_only, "files"),
    ],
)
async def test_a_broken_stream_is_refused_naming_the_problem_and_leaves_nothing(
    sandbox: Sandbox, spoil: Callable[[Messages], Messages], named: str
) -> None:
    batch = await sandbox.register(essays=3)
    messages = spoil(upload_messages(batch.batch_id, [essay(1, 3000)]))
    with pytest.raises(ValidationError) as caught:
        await _send_all(sandbox, messages)
    error = caught.value
    # grpclib drops the trailers (and the field) when the server ends a call mid-stream; the
    # message names the field as well.
    assert error.field == named or named.split(".")[-1] in error.message, error
    await _assert_nothing_kept(sandbox, batch.batch_id)


async def test_a_bad_file_after_good_ones_registers_none_of_them(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=3)
    messages = upload_messages(batch.batch_id, [essay(1), essay(2), essay(3)])
    _break_sha(messages)
    with pytest.raises(ValidationError, match="sha256"):
        await _send_all(sandbox, messages)
    await _assert_nothing_kept(sandbox, batch.batch_id)


async def test_oversized_file_is_resource_exhausted_naming_it(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=3)
    big = ("too-long.txt", b"x" * (LIMITS.max_file_bytes + 1))
    with pytest.raises(PayloadTooLargeError, match=r"too-long\.txt") as caught:
        await sandbox.upload(batch.batch_id, [essay(1), big], chunk=16 * 1024)
    assert caught.value.field in (None, "files.1")
    await _assert_nothing_kept(sandbox, batch.batch_id)


async def test_too_many_files_per_upload_is_resource_exhausted(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=10)
    files = [essay(i, 100) for i in range(LIMITS.max_files_per_upload + 1)]
    with pytest.raises(PayloadTooLargeError, match=rf"essay-{LIMITS.max_files_per_upload}\.txt"):
        await sandbox.upload(batch.batch_id, files)
    await _assert_nothing_kept(sandbox, batch.batch_id)


async def test_more_files_than_essay_slots_is_resource_exhausted(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=2)
    await sandbox.upload(batch.batch_id, [essay(1)])
    with pytest.raises(PayloadTooLargeError, match=r"essay-3\.txt"):
        await sandbox.upload(batch.batch_id, [essay(2), essay(3)])
    assert [f.filename for f in await sandbox.list_files(batch.batch_id)] == ["essay-1.txt"]
    assert len(sandbox.on_disk()[1]) == 1


async def test_chunk_over_one_mib_is_refused(start_sandbox: SandboxFactory) -> None:
    sandbox = await start_sandbox(files=FileLimits(max_file_bytes=4 << 20))
    batch = await sandbox.register()
    with pytest.raises(ValidationError, match="chunk"):
        await sandbox.upload(batch.batch_id, [("big.txt", b"y" * ((1 << 20) + 1))], chunk=2 << 20)
    await _assert_nothing_kept(sandbox, batch.batch_id)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
async def test_client_gone_mid_stream_leaves_no_file(sandbox: Sandbox, how: str) -> None:
    batch = await sandbox.register(essays=3)
    messages = upload_messages(batch.batch_id, [essay(1, 5000), essay(2, 5000)])
    files = sandbox.running.files
    sent_half = trio.Event()

    async def upload(cancel_scope: trio.CancelScope) -> None:
        async with sandbox.channel.stream_unary(sandbox.files.upload_files) as call:
            for message in messages[: len(messages) // 2 + 2]:
                await call.send(message)
            sent_half.set()
            await trio.sleep_forever()  # never half-closes

    with trio.fail_after(5):
        if how == "cancel":
            async with trio.open_nursery() as nursery:
                scope = trio.CancelScope()

                async def run() -> None:
                    with scope:
                        await upload(scope)

                nursery.start_soon(run)
                await sent_half.wait()
                # The server has the first file on disk and the second one open.
                while files.statistics().temp_files < 2:
                    await trio.sleep(0.005)
                assert len(sandbox.on_disk()[0]) == 2
                scope.cancel()
        else:
            # The deadline goes to the server as grpc-timeout; the client's own scope ends
            # at the same moment, so either side may be the first to stop the call.
            with trio.move_on_after(0.3):
                with contextlib.suppress(DeadlineExceededError):
                    await upload(trio.CancelScope())
            assert sent_half.is_set()
    await _assert_nothing_kept(sandbox, batch.batch_id)
    assert files.statistics().uploads_rejected >= 1


async def test_retried_upload_id_registers_nothing_twice(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=3)
    files = [essay(1), essay(2), essay(3)]
    first = await sandbox.upload(batch.batch_id, files, upload_id="retry-me")
    again = await sandbox.upload(batch.batch_id, files, upload_id="retry-me")
    assert again == first
    assert len(await sandbox.list_files(batch.batch_id)) == 3
    assert len(sandbox.on_disk()[1]) == 3 and sandbox.on_disk()[0] == []
    assert len(await sandbox.events(Topic.ESSAY_SLOT_ASSIGNED)) == 3


async def test_concurrent_streams_with_one_upload_id_register_once(sandbox: Sandbox) -> None:
    batch = await sandbox.register(essays=3)
    replies: list[files_v1.UploadFilesResponse] = []

    async def one() -> None:
        replies.append(await sandbox.upload(batch.batch_id, [essay(1)], upload_id="same"))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    assert len({r.files[0].file_id for r in replies}) == 1
    assert len(await sandbox.list_files(batch.batch_id)) == 1


async def test_another_users_batch_is_not_found_for_files(sandbox: Sandbox) -> None:
    batch = await sandbox.register()
    await sandbox.upload(batch.batch_id, [essay(1)])
    with pytest.raises(NotFoundError):
        await sandbox.list_files(batch.batch_id, actor=OTHER)
    with pytest.raises(NotFoundError):
        await sandbox.upload(batch.batch_id, [essay(2)], actor=OTHER)
    assert len(await sandbox.list_files(batch.batch_id)) == 1
