from __future__ import annotations

import pytest
import trio
import trio.testing

from common.ttlcache import TtlCache


async def test_entries_expire_exactly_at_their_ttl(autojump_clock: trio.testing.MockClock) -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=5.0)
    t0 = trio.current_time()
    cache.set("a", 1, t0)
    await trio.sleep_until(t0 + 5.0 - 1e-6)
    assert cache.get("a", trio.current_time()) == 1, "expired before its TTL"
    await trio.sleep_until(t0 + 5.0)
    assert cache.get("a", trio.current_time()) is None, "still served at set time + TTL"
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.expirations, stats.size) == (1, 1, 1, 0), stats


async def test_per_entry_ttl_overrides_the_default(autojump_clock: trio.testing.MockClock) -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=5.0)
    t0 = trio.current_time()
    cache.set("short", 1, t0, ttl_s=1.0)
    cache.set("default", 2, t0)
    await trio.sleep_until(t0 + 1.0)
    assert cache.get("short", trio.current_time()) is None
    assert cache.get("default", trio.current_time()) == 2
    with pytest.raises(ValueError, match="ttl_s"):
        cache.set("bad", 3, t0, ttl_s=0)


async def test_setting_again_restarts_the_ttl_and_replaces_the_tags(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=2.0)
    t0 = trio.current_time()
    cache.set("k", "v1", t0, tags=["old"])
    await trio.sleep_until(t0 + 1.5)
    cache.set("k", "v2", trio.current_time(), tags=["new"])
    assert cache.invalidate_tag("old") == 0, "the replaced entry must not keep its old tags"
    await trio.sleep_until(t0 + 3.0)
    assert cache.get("k", trio.current_time()) == "v2", "TTL counts from the latest set"
    await trio.sleep_until(t0 + 3.5)
    assert cache.get("k", trio.current_time()) is None


def test_lru_eviction_keeps_the_recently_used() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60, max_entries=2)
    cache.set("a", 1, 0)
    cache.set("b", 2, 0)
    assert cache.get("a", 1) == 1  # a is now the most recently used
    cache.set("c", 3, 2)
    assert cache.get("b", 3) is None, "b was least recently used and should be gone"
    assert (cache.get("a", 3), cache.get("c", 3)) == (1, 3)
    stats = cache.statistics()
    assert (stats.size, stats.evictions, stats.expirations) == (2, 1, 0), stats


def test_an_expired_entry_pushed_out_counts_as_an_expiration_not_an_eviction() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=1, max_entries=1)
    cache.set("a", 1, 0)
    cache.set("b", 2, 5)
    stats = cache.statistics()
    assert (stats.evictions, stats.expirations) == (0, 1), stats


def test_invalidate_tag_drops_every_tagged_entry_and_nothing_else() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=60)
    cache.set("batch:b1", "view", 0, tags=["batch:b1", "user:u1"])
    cache.set("list:u1", "page", 0, tags=["user:u1"])
    cache.set("list:u2", "page", 0, tags=["user:u2"])
    assert cache.invalidate_tag("user:u1") == 2
    assert cache.get("batch:b1", 1) is None and cache.get("list:u1", 1) is None
    assert cache.get("list:u2", 1) == "page", "an entry without the tag was dropped"
    assert cache.invalidate_tag("batch:b1") == 0, "dropped entries must leave the tag index"


def test_invalidate_and_clear() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60)
    cache.set("a", 1, 0, tags=["t"])
    cache.set("b", 2, 0)
    assert cache.invalidate("a") is True
    assert cache.invalidate("a") is False
    assert cache.get("a", 1) is None and cache.get("b", 1) == 2
    assert cache.invalidate_tag("t") == 0
    cache.clear()
    assert len(cache) == 0 and cache.get("b", 1) is None
    assert cache.statistics().invalidations == 3


def test_a_value_computed_before_an_invalidation_is_not_stored_after_it() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=60)
    token = cache.begin("batch:b1")  # the query starts reading the store
    cache.invalidate_tag("batch:b1")  # an event is applied meanwhile
    stored = cache.set_if_current("batch:b1", token, "stale view", 1, tags=["batch:b1"])
    assert stored is False and cache.get("batch:b1", 1) is None, "stale answer was cached"
    fresh = cache.begin("batch:b1")
    assert cache.set_if_current("batch:b1", fresh, "new view", 2, tags=["batch:b1"])
    assert cache.get("batch:b1", 2) == "new view"
    assert cache.statistics().refused_stale_writes == 1


def test_the_guard_covers_the_key_and_clear_but_not_unrelated_invalidations() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60)
    token = cache.begin("k")
    cache.invalidate("other")
    cache.invalidate_tag("user:someone-else")
    assert cache.set_if_current("k", token, 1, 0, tags=["user:me"]), "refused for no reason"
    token = cache.begin("k")
    cache.invalidate("k")
    assert not cache.set_if_current("k", token, 2, 0), "write after invalidate(key) accepted"
    token = cache.begin("k")
    cache.clear()
    assert not cache.set_if_current("k", token, 3, 0), "write begun before clear() accepted"


def test_the_guard_stays_bounded_and_stays_safe_when_it_forgets() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60, max_invalidation_marks=100)
    token = cache.begin("k")
    cache.invalidate_tag("t")
    for i in range(1000):
        cache.invalidate(f"noise{i}")  # folds the marks several times
    assert not cache.set_if_current("k", token, 1, 0, tags=["t"]), "forgot an invalidation"
    assert len(cache._key_marks) + len(cache._tag_marks) <= 100, "marks are unbounded"
    assert cache.set_if_current("k", cache.begin("k"), 2, 0, tags=["t"])


async def _race(cache: TtlCache[str, int], *, guarded: bool) -> int:
    """A query and an event stream interleave on virtual time; returns stale reads served."""
    store = {"version": 0}
    stale_served = 0

    async def query() -> None:
        for _ in range(200):
            token = cache.begin("k")
            seen = store["version"]
            await trio.sleep(0.001)  # the store read takes time; an event may land meanwhile
            if guarded:
                cache.set_if_current("k", token, seen, trio.current_time(), tags=["t"])
            else:
                cache.set("k", seen, trio.current_time(), tags=["t"])

    async def apply_events() -> None:
        nonlocal stale_served
        for _ in range(150):
            await trio.sleep(0.0013)
            store["version"] += 1
            cache.invalidate_tag("t")
            await trio.sleep(0.0004)
            cached = cache.get("k", trio.current_time())
            if cached is not None and cached != store["version"]:
                stale_served += 1

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query)
        nursery.start_soon(apply_events)
    return stale_served


async def test_racing_queries_and_invalidations_never_serve_a_stale_view(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert await _race(TtlCache(ttl_s=60), guarded=False) > 0, "the race never happened"
    guarded = TtlCache[str, int](ttl_s=60)
    assert await _race(guarded, guarded=True) == 0, "a stale view was served"
    assert guarded.statistics().refused_stale_writes > 0


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        TtlCache(ttl_s=0)
    with pytest.raises(ValueError, match="max_entries"):
        TtlCache(ttl_s=1, max_entries=0)
    with pytest.raises(ValueError, match="max_invalidation_marks"):
        TtlCache(ttl_s=1, max_invalidation_marks=0)
