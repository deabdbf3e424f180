"""Login sessions and their refresh tokens, behind :class:`SessionStore`; SQLite by default.

A *session* (``sid``, the token claim) starts at login and lives at most until its absolute
``expires_at``. It owns one family of refresh tokens: every refresh spends the presented token
and issues the next one, so at most one token of a family is live. Tokens are stored only as
SHA-256 hashes (a 256-bit random token needs no slow hash: it cannot be guessed).

:meth:`SessionStore.rotate` is one atomic compare-and-swap:

* the live token of a live session -> it is marked spent and the new hash stored (``ROTATED``);
* a token already spent -> the whole session is revoked (``REUSED``; the caller publishes the
  revocation): someone holds a copy of a token that was used, so nobody's copy is trusted;
* a token of a revoked session -> ``REVOKED``; past the token's idle expiry or the session's
  absolute lifetime -> ``EXPIRED``; a hash never stored -> ``UNKNOWN``.

Of any number of concurrent rotations of one token exactly one is ``ROTATED``; the others see a
spent token. One thread owns the SQLite connection (calls go through ``trio.to_thread`` with a
limiter of one) and every write runs inside ``BEGIN IMMEDIATE``, so two gateway processes on
one database file also serialise on it.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import trio

from common.errors import StorageError, ValidationError

__all__ = [
    "RotateOutcome",
    "Session",
    "SessionStore",
    "SqliteSessionStore",
    "hash_refresh_token",
    "new_refresh_token",
    "open_sqlite_session_store",
]

T = TypeVar("T")

#: 32 random bytes = 256 bits; base64url without padding is 43 characters.
REFRESH_TOKEN_BYTES = 32
REFRESH_TOKEN_CHARS = 43


def new_refresh_token() -> str:
    """A fresh opaque refresh token (256 bits from the OS CSPRNG, base64url)."""
    return secrets.token_urlsafe(REFRESH_TOKEN_BYTES)


def hash_refresh_token(token: str) -> bytes:
    """What the store keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class RotateOutcome(enum.Enum):
    ROTATED = "rotated"
    REUSED = "reused"
    REVOKED = "revoked"
    EXPIRED = "expired"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    user_id: str
    org_id: str
    roles: tuple[str, ...]
    display_name: str
    created_at: float
    #: Absolute end of the session (wall-clock seconds); no refresh extends it.
    expires_at: float
    revoked_at: float | None = None
    revoke_reason: str | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


class SessionStore(Protocol):
    async def create(
        self, session: Session, refresh_hash: bytes, refresh_expires_at: float
    ) -> None:
        """Store a new session with its first refresh token."""
        ...

    async def rotate(
        self, old_hash: bytes, new_hash: bytes, *, now: float, refresh_expires_at: float
    ) -> tuple[RotateOutcome, Session | None]:
        """The compare-and-swap of the module docstring; the session when one was found."""
        ...

    async def revoke(self, sid: str, *, now: float, reason: str) -> Session | None:
        """Revoke ``sid`` (idempotent: the first reason and time stay); ``None`` if unknown."""
        ...

    async def get(self, sid: str) -> Session | None: ...

    async def revoked_since(self, since: float) -> list[Session]:
        """Sessions revoked at or after ``since`` (to rebuild the revocation set at start)."""
        ...

    async def purge(self, now: float) -> int:
        """Forget sessions past their absolute lifetime; returns how many."""
        ...

    async def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    sid TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    roles TEXT NOT NULL,
    display_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL,
    revoke_reason TEXT
);
CREATE INDEX IF NOT EXISTS sessions_revoked ON sessions (revoked_at);
CREATE TABLE IF NOT EXISTS refresh_tokens (
    token_hash BLOB PRIMARY KEY,
    sid TEXT NOT NULL REFERENCES sessions (sid) ON DELETE CASCADE,
    issued_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    spent_at REAL
);
CREATE INDEX IF NOT EXISTS refresh_tokens_sid ON refresh_tokens (sid);
"""

_SELECT_SESSION = (
    "SELECT sid, user_id, org_id, roles, display_name, created_at, expires_at, revoked_at, "
    "revoke_reason FROM sessions "
)
_BY_SID = _SELECT_SESSION + "WHERE sid = ?"
_REVOKED_SINCE = _SELECT_SESSION + "WHERE revoked_at >= ?"


def _row_to_session(row: tuple[object, ...]) -> Session:
    sid, user_id, org_id, roles, name, created, expires, revoked_at, reason = row
    return Session(
        sid=str(sid),
        user_id=str(user_id),
        org_id=str(org_id),
        roles=tuple(json.loads(str(roles))),
        display_name=str(name),
        created_at=float(created),  # type: ignore[arg-type]
        expires_at=float(expires),  # type: ignore[arg-type]
        revoked_at=None if revoked_at is None else float(revoked_at),  # type: ignore[arg-type]
        revoke_reason=None if reason is None else str(reason),
    )


class SqliteSessionStore:
    """See the module docstring. Create with :func:`open_sqlite_session_store`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise StorageError(f"session store: {exc}", service="sqlite") from None

    def _transaction(self, body: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    def _select(self, conn: sqlite3.Connection, sid: str) -> Session | None:
        row = conn.execute(
            _BY_SID,
            (sid,),
        ).fetchone()
        return None if row is None else _row_to_session(row)

    async def create(
        self, session: Session, refresh_hash: bytes, refresh_expires_at: float
    ) -> None:
        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    session.sid,
                    session.user_id,
                    session.org_id,
                    json.dumps(list(session.roles)),
                    session.display_name,
                    session.created_at,
                    session.expires_at,
                    session.revoked_at,
                    session.revoke_reason,
                ),
            )
            conn.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, NULL)",
                (refresh_hash, session.sid, session.created_at, refresh_expires_at),
            )

        await self._run(lambda: self._transaction(body))

    async def rotate(
        self, old_hash: bytes, new_hash: bytes, *, now: float, refresh_expires_at: float
    ) -> tuple[RotateOutcome, Session | None]:
        def body(conn: sqlite3.Connection) -> tuple[RotateOutcome, Session | None]:
            row = conn.execute(
                "SELECT sid, expires_at, spent_at FROM refresh_tokens WHERE token_hash = ?",
                (old_hash,),
            ).fetchone()
            if row is None:
                return RotateOutcome.UNKNOWN, None
            sid, token_expires, spent_at = row
            session = self._select(conn, sid)
            if session is None:
                return RotateOutcome.UNKNOWN, None
            if session.revoked:
                return RotateOutcome.REVOKED, session
            if spent_at is not None:
                conn.execute(
                    "UPDATE sessions SET revoked_at = ?, revoke_reason = ? WHERE sid = ?",
                    (now, "refresh_reuse", sid),
                )
                return RotateOutcome.REUSED, self._select(conn, sid)
            if now >= token_expires or now >= session.expires_at:
                return RotateOutcome.EXPIRED, session
            swapped = conn.execute(
                "UPDATE refresh_tokens SET spent_at = ? WHERE token_hash = ? AND spent_at IS NULL",
                (now, old_hash),
            ).rowcount
            if swapped != 1:  # cannot happen inside BEGIN IMMEDIATE; never hand out two
                raise StorageError("refresh token changed under the transaction", service="sqlite")
            conn.execute(
                "INSERT INTO refresh_tokens VALUES (?, ?, ?, ?, NULL)",
                (new_hash, sid, now, min(refresh_expires_at, session.expires_at)),
            )
            return RotateOutcome.ROTATED, session

        return await self._run(lambda: self._transaction(body))

    async def revoke(self, sid: str, *, now: float, reason: str) -> Session | None:
        def body(conn: sqlite3.Connection) -> Session | None:
            conn.execute(
                "UPDATE sessions SET revoked_at = ?, revoke_reason = ? "
                "WHERE sid = ? AND revoked_at IS NULL",
                (now, reason, sid),
            )
            return self._select(conn, sid)

        return await self._run(lambda: self._transaction(body))

    async def get(self, sid: str) -> Session | None:
        return await self._run(lambda: self._select(self._conn, sid))

    async def revoked_since(self, since: float) -> list[Session]:
        def read() -> list[Session]:
            rows = self._conn.execute(
                _REVOKED_SINCE,
                (since,),
            ).fetchall()
            return [_row_to_session(r) for r in rows]

        return await self._run(read)

    async def purge(self, now: float) -> int:
        def body(conn: sqlite3.Connection) -> int:
            conn.execute(
                "DELETE FROM refresh_tokens WHERE sid IN "
                "(SELECT sid FROM sessions WHERE expires_at <= ?)",
                (now,),
            )
            return conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount

        return await self._run(lambda: self._transaction(body))

    async def close(self) -> None:
        await self._run(self._conn.close)


async def open_sqlite_session_store(path: Path | str) -> SqliteSessionStore:
    """Open (creating if needed) the session store at ``path`` (``":memory:"`` for tests)."""

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        if str(path) != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(_SCHEMA)
        return conn

    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = await trio.to_thread.run_sync(connect)
    except sqlite3.Error as exc:
        raise ValidationError(
            f"cannot open session store at {path}: {exc}", field="db_path"
        ) from None
    return SqliteSessionStore(conn)
