from __future__ import annotations

import pytest
import trio

from common.ttlcache import TtlCache


async def test_entries_expire_exactly_at_their_ttl(autojump_clock: trio.testing.MockClock) -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=5.0)
    t0 = trio.current_time()
    cache.set("a", 1, t0)
    await trio.sleep(5.0 - 1e-6)
    assert cache.get("a", trio.current_time()) == 1
    await trio.sleep(1e-6)
    assert trio.current_time() - t0 == pytest.approx(5.0)
    assert cache.get("a", trio.current_time()) is None
    assert cache.statistics().expirations == 1


def test_per_entry_ttl_overrides_the_default() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=5.0)
    cache.set("short", 1, 0.0, ttl_s=1.0)
    assert cache.get("short", 0.999) == 1
    assert cache.get("short", 1.0) is None


def test_lru_eviction_keeps_recently_used() -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60, max_entries=2)
    cache.set("a", 1, 0)
    cache.set("b", 2, 0)
    assert cache.get("a", 1) == 1  # a is now most recent
    cache.set("c", 3, 2)
    assert cache.get("b", 3) is None
    assert (cache.get("a", 3), cache.get("c", 3)) == (1, 3)
    assert cache.statistics().evictions == 1


def test_invalidate_tag_drops_every_tagged_entry_and_nothing_else() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=60)
    cache.set("batch:b1", "view", 0, tags=["batch:b1", "user:u1"])
    cache.set("list:u1", "page", 0, tags=["user:u1"])
    cache.set("list:u2", "page", 0, tags=["user:u2"])
    assert cache.invalidate_tag("user:u1") == 2
    assert cache.get("batch:b1", 1) is None and cache.get("list:u1", 1) is None
    assert cache.get("list:u2", 1) == "page"


def test_a_value_computed_before_an_invalidation_is_not_stored_after_it() -> None:
    cache: TtlCache[str, str] = TtlCache(ttl_s=60)
    token = cache.begin("batch:b1")  # query starts reading the store
    cache.invalidate_tag("batch:b1")  # an event is applied meanwhile
    stored = cache.set_if_current("batch:b1", token, "stale view", 1, tags=["batch:b1"])
    assert stored is False
    assert cache.get("batch:b1", 1) is None
    fresh = cache.begin("batch:b1")
    assert cache.set_if_current("batch:b1", fresh, "new view", 2, tags=["batch:b1"])
    assert cache.get("batch:b1", 2) == "new view"
    assert cache.statistics().refused_stale_writes == 1


async def test_racing_queries_and_invalidations_never_leave_a_stale_entry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cache: TtlCache[str, int] = TtlCache(ttl_s=60)
    store = {"version": 0}

    async def query() -> None:
        for _ in range(200):
            token = cache.begin("k")
            seen = store["version"]
            await trio.sleep(0.001)  # the store read takes time; events may land meanwhile
            cache.set_if_current("k", token, seen, trio.current_time(), tags=["t"])

    async def apply_events() -> None:
        for _ in range(150):
            await trio.sleep(0.0013)
            store["version"] += 1
            cache.invalidate_tag("t")
            cached = cache.get("k", trio.current_time())
            assert cached is None or cached == store["version"], "stale view served"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query)
        nursery.start_soon(apply_events)
    cached = cache.get("k", trio.current_time())
    assert cached is None or cached == store["version"]


def test_invalid_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        TtlCache(ttl_s=0)
    with pytest.raises(ValueError, match="max_entries"):
        TtlCache(ttl_s=1, max_entries=0)
