"""The aggregator's store: batch states, applied offsets, processed event ids and the outbox,
behind :class:`ResultStore`; SQLite (WAL) is the embedded implementation.

:meth:`SqliteResultStore.apply_records` applies a consumed batch of records **in one
transaction** together with the next offsets of their partitions, the ids of the events it
applied, and the outbox rows it produced (notifications and dead-letter records). So a crash at
any point either keeps all of it or none, and on restart the consumer seeks to the stored
offsets: nothing is lost, nothing applied twice.

One thread owns the SQLite connection: every call goes through ``trio.to_thread`` with a
limiter of one, so calls are serialised and never block the Trio loop.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from aggregator.projection import (
    BatchState,
    Change,
    Derived,
    batch_id_of,
    derive,
    essays_finished,
    fold_event,
)
from common.bus import Record, TopicPartition
from common.errors import StorageError, ValidationError
from common.events import PoisonMessageError, parse_envelope

__all__ = [
    "ApplyResult",
    "OutboxRow",
    "ResultStore",
    "SqliteResultStore",
    "open_sqlite_store",
]

T = TypeVar("T")

#: Parsed batch states kept for the apply path (memory <= this x one state's size).
STATE_CACHE = 20_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    owner_user_id TEXT NOT NULL,
    registered INTEGER NOT NULL,
    status INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    essays_done INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_owner
    ON batches (owner_user_id, created_at DESC, batch_id DESC);
CREATE TABLE IF NOT EXISTS applied_offsets (
    topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS processed_events (event_id TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL, key BLOB, value BLOB NOT NULL, headers TEXT NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (sent, id);
CREATE TABLE IF NOT EXISTS anomalies (
    id INTEGER PRIMARY KEY AUTOINCREMENT, batch_id TEXT, event_id TEXT, note TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


@dataclass
class ApplyResult:
    applied: int = 0
    duplicates: int = 0
    poison: int = 0
    skipped_old: int = 0
    #: batch_id -> owner_user_id of every batch an applied event touched (cache invalidation).
    changed: dict[str, str] = field(default_factory=dict)
    outbox_rows: int = 0
    anomalies: int = 0
    by_topic: dict[tuple[str, str], int] = field(default_factory=dict)

    def count(self, topic: str, outcome: str) -> None:
        self.by_topic[(topic, outcome)] = self.by_topic.get((topic, outcome), 0) + 1


#: One outbox row to be: (topic, key, value, headers).
Row = tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]
#: Builds outbox rows for a batch whose view changed.
Notifier = Callable[[BatchState, Change], list[Row]]
#: Builds the dead-letter row for a poison record.
DeadLetter = Callable[[Record, PoisonMessageError], Row]


class ResultStore(Protocol):
    async def apply_records(
        self,
        records: Sequence[Record],
        notify: Notifier,
        dead_letter: DeadLetter,
        *,
        before_commit: Callable[[ApplyResult], None] | None = None,
    ) -> ApplyResult: ...

    async def stored_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]: ...

    async def load(self, batch_id: str) -> BatchState | None: ...

    async def list_for_owner(
        self, owner: str, *, limit: int, after: tuple[str, str] | None, statuses: Sequence[int]
    ) -> list[BatchState]: ...

    async def dashboard(self, owner: str) -> tuple[dict[int, int], int]: ...

    async def pending_outbox(self, limit: int) -> list[OutboxRow]: ...

    async def mark_sent(self, ids: Sequence[int]) -> None: ...

    async def outbox_backlog(self) -> int: ...

    async def anomalies(self, batch_id: str) -> list[str]: ...

    async def close(self) -> None: ...


class SqliteResultStore:
    """See the module docstring. Create with :func:`open_sqlite_store`."""

    def __init__(self, conn: sqlite3.Connection, *, state_cache: int = STATE_CACHE) -> None:
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)
        # Parsed batch states for the apply path only (store thread): a batch's events arrive
        # spread over topics and transactions, and re-parsing its JSON each time is a large
        # share of intake. Mutated in place by a transaction, so replaced after COMMIT and
        # evicted on ROLLBACK; queries never see these objects (they read the database).
        self._states: OrderedDict[str, BatchState] = OrderedDict()
        self._state_cache = state_cache

    async def _run(self, fn: Callable[[], T]) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=self._limiter)
        except sqlite3.OperationalError as exc:
            # "database is locked" and friends are transient; the caller retries.
            raise StorageError(f"sqlite: {exc}", service="sqlite") from None

    # -- applying -------------------------------------------------------------------------------

    def _state_for_apply(self, batch_id: str) -> BatchState:
        cached = self._states.pop(batch_id, None)
        if cached is not None:
            return cached
        return self._load_sync(batch_id) or BatchState(batch_id)

    def _load_sync(self, batch_id: str) -> BatchState | None:
        row = self._conn.execute(
            "SELECT state FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        return BatchState.from_json(row[0]) if row else None

    def _apply_sync(
        self,
        records: Sequence[Record],
        notify: Notifier,
        dead_letter: DeadLetter,
        before_commit: Callable[[ApplyResult], None] | None,
    ) -> ApplyResult:
        conn = self._conn
        result = ApplyResult()
        states: dict[str, BatchState] = {}
        #: The derived view of each batch before this transaction touched it.
        first_seen: dict[str, Derived] = {}
        outbox: list[Row] = []
        positions: dict[tuple[str, int], int] = {}
        stored = {
            (t, p): o
            for t, p, o in conn.execute("SELECT topic, partition, next_offset FROM applied_offsets")
        }
        conn.execute("BEGIN IMMEDIATE")
        try:
            for record in records:
                key = (record.topic, record.partition)
                if record.offset < stored.get(key, 0):
                    result.skipped_old += 1  # already applied before a restart
                    continue
                positions[key] = max(positions.get(key, 0), record.offset + 1)
                try:
                    envelope = parse_envelope(record.value, expected_topics=(record.topic,))
                    if not batch_id_of(envelope):
                        raise PoisonMessageError(
                            "payload has no batch_id", reason="invalid_payload", field="batch_id"
                        )
                except PoisonMessageError as exc:
                    result.poison += 1
                    outbox.append(dead_letter(record, exc))
                    result.count(record.topic, "poison")
                    continue
                inserted = conn.execute(
                    "INSERT OR IGNORE INTO processed_events (event_id) VALUES (?)",
                    (envelope.event_id,),
                ).rowcount
                if not inserted:
                    result.duplicates += 1
                    result.count(record.topic, "duplicate")
                    continue
                batch_id = batch_id_of(envelope)
                state = states.get(batch_id) or self._state_for_apply(batch_id)
                states[batch_id] = state
                if batch_id not in first_seen:
                    first_seen[batch_id] = derive(state)
                notes = fold_event(state, envelope)
                result.applied += 1
                if notes:
                    conn.executemany(
                        "INSERT INTO anomalies (batch_id, event_id, note) VALUES (?,?,?)",
                        [(batch_id, envelope.event_id, note) for note in notes],
                    )
                    result.anomalies += len(notes)
                result.count(record.topic, "applied")
                # Every applied event changes the view (version, updated_at): invalidate
                # for all of them.
                result.changed[batch_id] = state.owner_user_id
            for batch_id, before in first_seen.items():
                # One notification per changed batch per transaction (the latest state): the
                # intermediate states of one transaction are superseded before anyone sees them.
                state = states[batch_id]
                derived = derive(state)
                change = Change(before, derived)
                if (change.visible or change.completed_now) and state.registered:
                    outbox.extend(notify(state, change))
                done = essays_finished(state)
                conn.execute(
                    "INSERT INTO batches (batch_id, owner_user_id, registered, status, created_at,"
                    " updated_at, essays_done, state) VALUES (?,?,?,?,?,?,?,?)"
                    " ON CONFLICT (batch_id) DO UPDATE SET owner_user_id=excluded.owner_user_id,"
                    " registered=excluded.registered, status=excluded.status,"
                    " created_at=excluded.created_at, updated_at=excluded.updated_at,"
                    " essays_done=excluded.essays_done, state=excluded.state",
                    (
                        state.batch_id,
                        state.owner_user_id,
                        int(state.registered),
                        int(derived.status),
                        state.created_at or state.updated_at,
                        state.updated_at,
                        done,
                        state.to_json(),
                    ),
                )
            conn.executemany(
                "INSERT INTO outbox (topic, key, value, headers) VALUES (?,?,?,?)",
                [(t, k, v, _encode_headers(h)) for t, k, v, h in outbox],
            )
            conn.executemany(
                "INSERT INTO applied_offsets (topic, partition, next_offset) VALUES (?,?,?)"
                " ON CONFLICT (topic, partition) DO UPDATE SET next_offset ="
                " max(next_offset, excluded.next_offset)",
                [(t, p, o) for (t, p), o in positions.items()],
            )
            result.outbox_rows = len(outbox)
            if before_commit is not None:
                before_commit(result)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            # Taken states were popped from the cache and may be half-mutated: dropping them
            # means the next transaction re-reads the committed truth.
            raise
        for batch_id, state in states.items():
            self._states[batch_id] = state
        while len(self._states) > self._state_cache:
            self._states.popitem(last=False)
        return result

    async def apply_records(
        self,
        records: Sequence[Record],
        notify: Notifier,
        dead_letter: DeadLetter,
        *,
        before_commit: Callable[[ApplyResult], None] | None = None,
    ) -> ApplyResult:
        """Apply ``records`` in one transaction (see the module docstring).

        ``before_commit`` runs on the store thread after everything is written and before
        COMMIT (the aggregator invalidates its query cache there, so no query can see the
        old view once the new one is committed). Raises :class:`StorageError` on transient
        database trouble; nothing is kept then.
        """
        return await self._run(
            lambda: self._apply_sync(records, notify, dead_letter, before_commit)
        )

    async def stored_offsets(
        self, partitions: Sequence[TopicPartition]
    ) -> dict[TopicPartition, int]:
        def read() -> dict[TopicPartition, int]:
            out: dict[TopicPartition, int] = {}
            for tp in partitions:
                row = self._conn.execute(
                    "SELECT next_offset FROM applied_offsets WHERE topic = ? AND partition = ?",
                    (tp.topic, tp.partition),
                ).fetchone()
                if row is not None:
                    out[tp] = int(row[0])
            return out

        return await self._run(read)

    # -- queries --------------------------------------------------------------------------------

    async def load(self, batch_id: str) -> BatchState | None:
        return await self._run(lambda: self._load_sync(batch_id))

    async def list_for_owner(
        self, owner: str, *, limit: int, after: tuple[str, str] | None, statuses: Sequence[int]
    ) -> list[BatchState]:
        def read() -> list[BatchState]:
            sql = "SELECT state FROM batches WHERE owner_user_id = ? AND registered = 1"
            args: list[Any] = [owner]
            if statuses:
                sql += f" AND status IN ({','.join('?' * len(statuses))})"
                args += list(statuses)
            if after is not None:
                sql += " AND (created_at, batch_id) < (?, ?)"
                args += list(after)
            sql += " ORDER BY created_at DESC, batch_id DESC LIMIT ?"
            args.append(limit)
            return [BatchState.from_json(r[0]) for r in self._conn.execute(sql, args)]

        return await self._run(read)

    async def dashboard(self, owner: str) -> tuple[dict[int, int], int]:
        def read() -> tuple[dict[int, int], int]:
            counts = dict(
                self._conn.execute(
                    "SELECT status, count(*) FROM batches"
                    " WHERE owner_user_id = ? AND registered = 1 GROUP BY status",
                    (owner,),
                ).fetchall()
            )
            done = self._conn.execute(
                "SELECT coalesce(sum(essays_done), 0) FROM batches WHERE owner_user_id = ?"
                " AND registered = 1",
                (owner,),
            ).fetchone()[0]
            return {int(k): int(v) for k, v in counts.items()}, int(done)

        return await self._run(read)

    # -- outbox ---------------------------------------------------------------------------------

    async def pending_outbox(self, limit: int) -> list[OutboxRow]:
        def read() -> list[OutboxRow]:
            rows = self._conn.execute(
                "SELECT id, topic, key, value, headers FROM outbox"
                " WHERE sent = 0 ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            return [OutboxRow(i, t, k, v, _decode_headers(h)) for i, t, k, v, h in rows]

        return await self._run(read)

    async def mark_sent(self, ids: Sequence[int]) -> None:
        def write() -> None:
            with self._conn:
                self._conn.executemany(
                    "UPDATE outbox SET sent = 1 WHERE id = ?", [(i,) for i in ids]
                )

        await self._run(write)

    async def outbox_backlog(self) -> int:
        def read() -> int:
            row = self._conn.execute("SELECT count(*) FROM outbox WHERE sent = 0").fetchone()
            return int(row[0])

        return await self._run(read)

    async def anomalies(self, batch_id: str) -> list[str]:
        """Notes recorded for ``batch_id`` (events that were stale or made no sense)."""

        def read() -> list[str]:
            rows = self._conn.execute(
                "SELECT note FROM anomalies WHERE batch_id = ? ORDER BY id", (batch_id,)
            )
            return [r[0] for r in rows]

        return await self._run(read)

    async def close(self) -> None:
        await self._run(self._conn.close)


def _encode_headers(headers: Sequence[tuple[str, bytes]]) -> str:
    return json.dumps([[k, base64.b64encode(v).decode()] for k, v in headers])


def _decode_headers(text: str) -> tuple[tuple[str, bytes], ...]:
    return tuple((k, base64.b64decode(v)) for k, v in json.loads(text))


async def open_sqlite_store(path: Path | str) -> SqliteResultStore:
    """Open (creating if needed) the store at ``path`` (``":memory:"`` for tests)."""

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(_SCHEMA)
        return conn

    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = await trio.to_thread.run_sync(connect)
    except sqlite3.Error as exc:
        raise ValidationError(f"cannot open store at {path}: {exc}", field="db_path") from None
    return SqliteResultStore(conn)
