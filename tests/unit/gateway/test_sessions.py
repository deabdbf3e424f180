"""The session store's compare-and-swap rotation, on a real SQLite database file."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from gateway.sessions import (
    RotateOutcome,
    Session,
    SqliteSessionStore,
    hash_refresh_token,
    new_refresh_token,
    open_sqlite_session_store,
)

T0 = 1_800_000_000.0


def session(sid: str = "s1", lifetime: float = 3600.0) -> Session:
    return Session(
        sid=sid,
        user_id="u1",
        org_id="o1",
        roles=("teacher",),
        display_name="Ada",
        created_at=T0,
        expires_at=T0 + lifetime,
    )


@pytest.fixture
async def store(tmp_path: Path) -> SqliteSessionStore:
    opened = await open_sqlite_session_store(tmp_path / "sessions.db")
    return opened


def test_refresh_tokens_are_256_bit_and_distinct() -> None:
    tokens = {new_refresh_token() for _ in range(1000)}
    assert len(tokens) == 1000
    assert all(len(t) == 43 for t in tokens)
    assert len(hash_refresh_token("x")) == 32


async def test_rotation_spends_the_token_and_issues_the_next(store: SqliteSessionStore) -> None:
    first, second, third = (hash_refresh_token(new_refresh_token()) for _ in range(3))
    await store.create(session(), first, T0 + 600)
    outcome, found = await store.rotate(first, second, now=T0 + 10, refresh_expires_at=T0 + 610)
    assert outcome is RotateOutcome.ROTATED and found is not None and found.sid == "s1"
    outcome, _ = await store.rotate(second, third, now=T0 + 20, refresh_expires_at=T0 + 620)
    assert outcome is RotateOutcome.ROTATED


async def test_replaying_a_spent_token_revokes_the_family(store: SqliteSessionStore) -> None:
    first, second, third = (hash_refresh_token(new_refresh_token()) for _ in range(3))
    await store.create(session(), first, T0 + 600)
    await store.rotate(first, second, now=T0 + 10, refresh_expires_at=T0 + 610)
    outcome, found = await store.rotate(first, third, now=T0 + 11, refresh_expires_at=T0 + 611)
    assert outcome is RotateOutcome.REUSED
    assert found is not None and found.revoked and found.revoke_reason == "refresh_reuse"
    # The legitimate holder's newer token is dead too.
    outcome, _ = await store.rotate(second, third, now=T0 + 12, refresh_expires_at=T0 + 612)
    assert outcome is RotateOutcome.REVOKED


async def test_idle_expiry_absolute_lifetime_and_unknown(store: SqliteSessionStore) -> None:
    a, b, c = (hash_refresh_token(new_refresh_token()) for _ in range(3))
    await store.create(session("idle"), a, T0 + 100)
    outcome, _ = await store.rotate(a, b, now=T0 + 100, refresh_expires_at=T0 + 200)
    assert outcome is RotateOutcome.EXPIRED  # exactly at the idle expiry
    await store.create(session("short", lifetime=50), c, T0 + 600)
    outcome, _ = await store.rotate(c, b, now=T0 + 50, refresh_expires_at=T0 + 650)
    assert outcome is RotateOutcome.EXPIRED  # the absolute lifetime wins
    outcome, found = await store.rotate(b"\0" * 32, b, now=T0, refresh_expires_at=T0 + 1)
    assert outcome is RotateOutcome.UNKNOWN and found is None


async def test_a_rotated_token_never_outlives_its_session(store: SqliteSessionStore) -> None:
    a, b, c = (hash_refresh_token(new_refresh_token()) for _ in range(3))
    await store.create(session(lifetime=100), a, T0 + 100)
    outcome, _ = await store.rotate(a, b, now=T0 + 10, refresh_expires_at=T0 + 10_000)
    assert outcome is RotateOutcome.ROTATED
    outcome, _ = await store.rotate(b, c, now=T0 + 100, refresh_expires_at=T0 + 10_100)
    assert outcome is RotateOutcome.EXPIRED


async def test_fifty_concurrent_rotations_exactly_one_wins(store: SqliteSessionStore) -> None:
    token = hash_refresh_token(new_refresh_token())
    await store.create(session(), token, T0 + 600)
    outcomes: list[RotateOutcome] = []

    async def attempt() -> None:
        new = hash_refresh_token(new_refresh_token())
        outcome, _ = await store.rotate(token, new, now=T0 + 1, refresh_expires_at=T0 + 601)
        outcomes.append(outcome)

    async with trio.open_nursery() as nursery:
        for _ in range(50):
            nursery.start_soon(attempt)
    assert outcomes.count(RotateOutcome.ROTATED) == 1
    assert set(outcomes) - {RotateOutcome.ROTATED} <= {RotateOutcome.REUSED, RotateOutcome.REVOKED}


async def test_two_processes_sharing_the_file_still_serialise(tmp_path: Path) -> None:
    """Two store connections on one file (two gateway processes): one winner."""
    first = await open_sqlite_session_store(tmp_path / "shared.db")
    second = await open_sqlite_session_store(tmp_path / "shared.db")
    token = hash_refresh_token(new_refresh_token())
    await first.create(session(), token, T0 + 600)
    outcomes: list[RotateOutcome] = []

    async def attempt(store: SqliteSessionStore) -> None:
        new = hash_refresh_token(new_refresh_token())
        outcome, _ = await store.rotate(token, new, now=T0 + 1, refresh_expires_at=T0 + 601)
        outcomes.append(outcome)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(attempt, first if i % 2 else second)
    assert outcomes.count(RotateOutcome.ROTATED) == 1
    await first.close()
    await second.close()


async def test_revoke_is_idempotent_and_listed(store: SqliteSessionStore) -> None:
    await store.create(session(), hash_refresh_token(new_refresh_token()), T0 + 600)
    revoked = await store.revoke("s1", now=T0 + 5, reason="logout")
    assert revoked is not None and revoked.revoked_at == T0 + 5
    again = await store.revoke("s1", now=T0 + 9, reason="admin")
    assert again is not None and again.revoked_at == T0 + 5 and again.revoke_reason == "logout"
    assert [s.sid for s in await store.revoked_since(T0)] == ["s1"]
    assert await store.revoked_since(T0 + 6) == []
    assert await store.revoke("nope", now=T0, reason="logout") is None


async def test_purge_forgets_sessions_past_their_lifetime(store: SqliteSessionStore) -> None:
    await store.create(session("old", lifetime=10), hash_refresh_token("a" * 43), T0 + 10)
    await store.create(session("new", lifetime=1000), hash_refresh_token("b" * 43), T0 + 10)
    assert await store.purge(T0 + 10) == 1
    assert await store.get("old") is None
    assert (await store.get("new")) is not None


async def test_refresh_tokens_are_stored_only_as_hashes(tmp_path: Path) -> None:
    store = await open_sqlite_session_store(tmp_path / "s.db")
    token = new_refresh_token()
    await store.create(session(), hash_refresh_token(token), T0 + 600)
    await store.close()
    for path in await trio.to_thread.run_sync(lambda: list(tmp_path.iterdir())):
        assert token.encode() not in path.read_bytes()
