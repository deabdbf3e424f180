from __future__ import annotations

import pytest
import trio

from common.correlation import (
    bind_correlation_id,
    current_correlation_id,
    new_correlation_id,
    parse_correlation_id,
)


@pytest.mark.parametrize("value", ["abc", "req-1.2:3_x", "A" * 128, new_correlation_id()])
def test_well_formed_ids_are_accepted(value: str) -> None:
    assert parse_correlation_id(value) == value


@pytest.mark.parametrize(
    "value", [None, "", "A" * 129, "has space", "new\nline", "<script>", "ünï", "a/b"]
)
def test_hostile_or_malformed_ids_are_refused(value: str | None) -> None:
    assert parse_correlation_id(value) is None


async def test_bound_id_flows_into_child_tasks_and_threads() -> None:
    seen: list[str | None] = []

    async def child() -> None:
        seen.append(current_correlation_id())

    assert current_correlation_id() is None
    with bind_correlation_id("cid-1"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child)
        seen.append(await trio.to_thread.run_sync(current_correlation_id))
    assert seen == ["cid-1", "cid-1"]
    assert current_correlation_id() is None
