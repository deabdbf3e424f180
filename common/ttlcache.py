"""A bounded TTL + LRU cache with tag invalidation and a stale-write guard, sans-IO.

Entries expire ``ttl_s`` after they were set (times are the caller's monotonic ``now``; an
entry set at ``t`` is served up to but not at ``t + ttl_s``) and the least recently used entry
is evicted beyond ``max_entries``. Entries carry tags (the aggregator uses ``batch:<id>`` and
``user:<id>``); :meth:`TtlCache.invalidate_tag` drops exactly the entries carrying a tag.

**The race the guard closes.** A query misses, reads the store, and, while it awaits the
store, an event is applied and invalidates the entry; the query then writes the answer it read
*before* the event into the cache, where it would be served as current until it expires. So:
call :meth:`TtlCache.begin` *before* reading the store and :meth:`TtlCache.set_if_current`
with its token afterwards. The write is refused if the key or any of the tags being written
was invalidated (or the cache cleared) after ``begin``.

The guard remembers one invalidation mark per key and per tag. Beyond
``max_invalidation_marks`` marks it forgets them all and refuses every write begun before that
moment instead: always safe, merely a missed fill for queries in flight. Not thread-safe: use
one cache from one Trio run.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["CacheStatistics", "CacheToken", "TtlCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class CacheToken:
    """Proof of when a computation began; pass it to :meth:`TtlCache.set_if_current`."""

    epoch: int


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """A snapshot of a :class:`TtlCache` (for ``/metrics``)."""

    size: int
    hits: int
    misses: int
    #: Live entries dropped to respect ``max_entries`` (least recently used first).
    evictions: int
    #: Entries found past their TTL (on ``get`` or at the LRU end) and dropped.
    expirations: int
    #: ``invalidate`` and ``invalidate_tag`` calls.
    invalidations: int
    #: ``set_if_current`` writes refused as possibly stale.
    refused_stale_writes: int


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires_at: float
    tags: tuple[str, ...]


def _check_ttl(ttl_s: float) -> None:
    if not (ttl_s > 0 and math.isfinite(ttl_s)):
        raise ValueError(f"ttl_s must be a positive finite number, got {ttl_s!r}")


class TtlCache(Generic[K, V]):
    """A TTL + LRU cache; see the module docstring.

    ``get`` answers ``None`` on a miss, so do not cache ``None`` itself (wrap it). Memory is
    bounded by ``max_entries`` entries plus ``max_invalidation_marks`` guard marks.
    """

    __slots__ = (
        "_by_tag",
        "_entries",
        "_epoch",
        "_evictions",
        "_expirations",
        "_floor",
        "_hits",
        "_invalidations",
        "_key_marks",
        "_max",
        "_max_marks",
        "_misses",
        "_refused",
        "_tag_marks",
        "_ttl_s",
    )

    def __init__(
        self, *, ttl_s: float, max_entries: int = 10_000, max_invalidation_marks: int = 10_000
    ) -> None:
        _check_ttl(ttl_s)
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries!r}")
        if max_invalidation_marks < 1:
            raise ValueError(f"max_invalidation_marks must be >= 1, got {max_invalidation_marks!r}")
        self._ttl_s = ttl_s
        self._max = max_entries
        self._max_marks = max_invalidation_marks
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._by_tag: dict[str, set[K]] = {}
        # Stale-write guard: every invalidation takes the next epoch; a token issued at epoch
        # e is stale if its key or a tag was marked at >= e, or if e < _floor.
        self._epoch = 0
        self._floor = 0
        self._key_marks: dict[K, int] = {}
        self._tag_marks: dict[str, int] = {}
        self._hits = self._misses = self._evictions = self._expirations = 0
        self._invalidations = self._refused = 0

    def get(self, key: K, now: float) -> V | None:
        """The live value for ``key`` (marking it most recently used), else ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        if entry.expires_at <= now:
            self._drop(key)
            self._expirations += 1
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry.value

    def set(
        self,
        key: K,
        value: V,
        now: float,
        *,
        ttl_s: float | None = None,
        tags: Iterable[str] = (),
    ) -> None:
        """Store ``value`` until ``now + ttl_s`` (default: the cache's TTL), tagged ``tags``.

        Replaces any entry for ``key``, tags included. Unguarded: a value computed from a
        store read should go through :meth:`begin` / :meth:`set_if_current` instead.
        """
        if ttl_s is None:
            ttl_s = self._ttl_s
        else:
            _check_ttl(ttl_s)
        if key in self._entries:
            self._drop(key)
        entry = _Entry(value, now + ttl_s, tuple(dict.fromkeys(tags)))
        self._entries[key] = entry
        for tag in entry.tags:
            self._by_tag.setdefault(tag, set()).add(key)
        while len(self._entries) > self._max:
            oldest, lru = next(iter(self._entries.items()))
            self._drop(oldest)
            if lru.expires_at <= now:
                self._expirations += 1
            else:
                self._evictions += 1

    def begin(self, key: K) -> CacheToken:
        """A token to take *before* reading the store for ``key`` (see the module docstring).

        Tokens are cheap and need no release; an unused one costs nothing.
        """
        return CacheToken(self._epoch)

    def set_if_current(
        self,
        key: K,
        token: CacheToken,
        value: V,
        now: float,
        *,
        ttl_s: float | None = None,
        tags: Iterable[str] = (),
    ) -> bool:
        """Store ``value`` unless ``key`` or one of ``tags`` was invalidated since ``token``.

        Returns whether it was stored. A refused value may still be returned to the caller
        who computed it (it was current when read); it just must not be served to others.
        """
        tags = tuple(tags)
        epoch = token.epoch
        stale = (
            epoch < self._floor
            or self._key_marks.get(key, -1) >= epoch
            or any(self._tag_marks.get(tag, -1) >= epoch for tag in tags)
        )
        if stale:
            self._refused += 1
            return False
        self.set(key, value, now, ttl_s=ttl_s, tags=tags)
        return True

    def invalidate(self, key: K) -> bool:
        """Drop ``key`` and refuse guarded writes to it begun before now; True if it was cached."""
        self._key_marks[key] = self._mark()
        self._invalidations += 1
        return self._drop(key)

    def invalidate_tag(self, tag: str) -> int:
        """Drop every entry tagged ``tag`` (and refuse guarded writes carrying it begun before
        now); returns how many entries were dropped."""
        self._tag_marks[tag] = self._mark()
        self._invalidations += 1
        keys = self._by_tag.pop(tag, set())
        for key in keys:
            self._drop(key)
        return len(keys)

    def clear(self) -> None:
        """Drop everything and refuse every guarded write begun before now."""
        self._fold()
        self._entries.clear()
        self._by_tag.clear()

    def _mark(self) -> int:
        if len(self._key_marks) + len(self._tag_marks) >= self._max_marks:
            self._fold()
        mark = self._epoch
        self._epoch += 1
        return mark

    def _fold(self) -> None:
        # Replace every per-key/per-tag mark by one floor: tokens older than now are refused.
        self._epoch += 1
        self._floor = self._epoch
        self._key_marks.clear()
        self._tag_marks.clear()

    def _drop(self, key: K) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]
        return True

    def __len__(self) -> int:
        """Entries held, expired ones not yet noticed included."""
        return len(self._entries)

    def statistics(self) -> CacheStatistics:
        """Counters since construction and the current size."""
        return CacheStatistics(
            size=len(self._entries),
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
            invalidations=self._invalidations,
            refused_stale_writes=self._refused,
        )
