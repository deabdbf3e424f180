"""A bounded TTL + LRU cache with tag invalidation and a stale-write guard, sans-IO.

Entries expire ``ttl_s`` after they were set (times are the caller's ``now``) and the least
recently used entry is evicted beyond ``max_entries``. Entries carry tags (e.g.
``batch:<id>``, ``user:<id>``); :meth:`TtlCache.invalidate_tag` drops every entry with a tag.

The race this closes: a query reads the store, an event is applied and invalidates the
answer, then the query stores its now-stale answer in the cache. Call :meth:`TtlCache.begin`
*before* reading the store and :meth:`TtlCache.set_if_current` with its token afterwards: the
write is refused if the key or any of its tags was invalidated in between.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["CacheStatistics", "CacheToken", "TtlCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Invalidation marks remembered for the stale-write guard before they are folded into one
#: floor (after which writes begun earlier are refused: safe, merely a missed fill).
_MAX_MARKS = 10_000


@dataclass(frozen=True, slots=True)
class CacheToken:
    epoch: int


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    size: int
    hits: int
    misses: int
    evictions: int
    expirations: int
    invalidations: int
    refused_stale_writes: int


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires_at: float
    tags: tuple[str, ...]


class TtlCache(Generic[K, V]):
    """See the module docstring. Not thread-safe (use from one Trio run)."""

    def __init__(self, *, ttl_s: float, max_entries: int = 10_000) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._ttl_s = ttl_s
        self._max = max_entries
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._by_tag: dict[str, set[K]] = {}
        self._epoch = 0
        self._floor = 0
        self._key_marks: dict[K, int] = {}
        self._tag_marks: dict[str, int] = {}
        self._hits = self._misses = self._evictions = self._expirations = 0
        self._invalidations = self._refused = 0

    def get(self, key: K, now: float) -> V | None:
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
        if key in self._entries:
            self._drop(key)
        entry = _Entry(value, now + (ttl_s if ttl_s is not None else self._ttl_s), tuple(tags))
        self._entries[key] = entry
        for tag in entry.tags:
            self._by_tag.setdefault(tag, set()).add(key)
        while len(self._entries) > self._max:
            oldest = next(iter(self._entries))
            self._drop(oldest)
            self._evictions += 1

    def begin(self, key: K) -> CacheToken:
        """Take a token before computing the value for ``key`` (see the module docstring)."""
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
        """Store ``value`` unless ``key`` or one of ``tags`` was invalidated since ``token``."""
        tags = tuple(tags)
        stale = (
            token.epoch < self._floor
            or self._key_marks.get(key, -1) >= token.epoch
            or any(self._tag_marks.get(tag, -1) >= token.epoch for tag in tags)
        )
        if stale:
            self._refused += 1
            return False
        self.set(key, value, now, ttl_s=ttl_s, tags=tags)
        return True

    def _mark(self) -> int:
        mark = self._epoch
        self._epoch += 1
        if len(self._key_marks) + len(self._tag_marks) > _MAX_MARKS:
            self._key_marks.clear()
            self._tag_marks.clear()
            self._floor = self._epoch
        return mark

    def invalidate(self, key: K) -> None:
        self._key_marks[key] = self._mark()
        self._invalidations += 1
        if key in self._entries:
            self._drop(key)

    def invalidate_tag(self, tag: str) -> int:
        """Drop every entry tagged ``tag``; returns how many were dropped."""
        self._tag_marks[tag] = self._mark()
        self._invalidations += 1
        keys = self._by_tag.pop(tag, set())
        for key in keys:
            self._drop(key)
        return len(keys)

    def clear(self) -> None:
        self._floor = self._epoch = self._epoch + 1
        self._key_marks.clear()
        self._tag_marks.clear()
        self._entries.clear()
        self._by_tag.clear()

    def _drop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        for tag in entry.tags:
            keys = self._by_tag.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_tag[tag]

    def __len__(self) -> int:
        return len(self._entries)

    def statistics(self) -> CacheStatistics:
        return CacheStatistics(
            size=len(self._entries),
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
            expirations=self._expirations,
            invalidations=self._invalidations,
            refused_stale_writes=self._refused,
        )
