"""JwksCache on virtual time with a scripted source, and HttpJwksFetcher on httpx.MockTransport."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.backoff import BackoffPolicy
from common.errors import (
    AuthenticationError,
    ConfigurationError,
    DependencyError,
    UnavailableError,
)
from common.tokens import KeySet, TokenSigner, TokenVerifier, UnknownKeyError, VerifierPolicy
from wsmanager.jwks import (
    DEFAULT_BACKOFF,
    FetchedJwks,
    HttpJwksFetcher,
    JwksCache,
    LiveKeySet,
)

URL = "https://gateway.test/.well-known/jwks.json"
ISSUER, AUDIENCE = "https://gateway.test", "huleedu"
#: Pauses of 1, 2, 4, 8 ... s exactly, so failure times are exact.
PLAIN_BACKOFF = BackoffPolicy(initial_s=1.0, multiplier=2.0, max_s=60.0, jitter="none")


def _signer(kid: str) -> TokenSigner:
    return TokenSigner(Ed25519PrivateKey.generate(), kid, issuer=ISSUER, audience=AUDIENCE)


def _jwks(*signers: TokenSigner) -> dict[str, Any]:
    return KeySet({s.kid: s.public_key() for s in signers}).to_jwks()


K1, K2, K3 = _signer("k1"), _signer("k2"), _signer("k3")
DOC1 = _jwks(K1)
DOC12 = _jwks(K1, K2)

Step = Any  # a document / FetchedJwks to return, an Exception to raise, or "hang"


class Source:
    """A scripted JWKS source: each fetch takes ``latency_s`` and plays the next step.

    The last step repeats forever. Records the (Trio clock) time each fetch began.
    """

    def __init__(self, *steps: Step, latency_s: float = 0.0) -> None:
        self.steps = list(steps)
        self.latency_s = latency_s
        self.calls: list[float] = []

    def then(self, *steps: Step) -> None:
        """Replace what is left of the script."""
        self.steps = list(steps)

    async def __call__(self) -> Any:
        self.calls.append(trio.current_time())
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if self.latency_s:
            await trio.sleep(self.latency_s)
        if step == "hang":
            await trio.sleep_forever()
        if isinstance(step, Exception):
            raise step
        return step

    def since(self, t0: float) -> list[float]:
        return [round(t - t0, 6) for t in self.calls]


def _cache(source: Source, **kwargs: Any) -> JwksCache:
    kwargs.setdefault("backoff", PLAIN_BACKOFF)
    return JwksCache(source, source=URL, **kwargs)


async def _started(nursery: trio.Nursery, cache: JwksCache) -> float:
    await nursery.start(cache.run)
    return trio.current_time()


def _policy() -> VerifierPolicy:
    return VerifierPolicy(issuer=ISSUER, audience=AUDIENCE)


def _token(signer: TokenSigner, now: float = 1_000_000.0) -> str:
    return signer.issue(sub="u-1", org="o-1", roles=["teacher"], sid="s-1", now=now)


# -- periodic refresh ---------------------------------------------------------------------


async def test_refreshes_every_interval_at_exact_virtual_times(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1)
    t0 = trio.current_time()
    cache = _cache(source)
    await nursery.start(cache.run)
    assert cache.keys.kids() == ["k1"], "started() must come after the first good fetch"
    await trio.sleep_until(t0 + 1000)
    assert source.since(t0) == [0, 300, 600, 900]
    stats = cache.statistics()
    assert (stats.fetches_ok, stats.fetches_failed, stats.key_count) == (4, 0, 1)
    assert stats.last_success_at == pytest.approx(t0 + 900)
    assert stats.next_refresh_at == pytest.approx(t0 + 1200)


async def test_custom_interval(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1)
    t0 = trio.current_time()
    await nursery.start(_cache(source, refresh_interval_s=45, min_refetch_interval_s=5).run)
    await trio.sleep_until(t0 + 100)
    assert source.since(t0) == [0, 45, 90]


@pytest.mark.parametrize(
    ("max_age", "expected"),
    [(60.0, [0, 60, 120]), (0.0, [0, 30, 60, 90, 120]), (10_000.0, [0]), (None, [0])],
)
async def test_cache_control_max_age_only_shortens_the_interval(
    nursery: trio.Nursery,
    autojump_clock: trio.testing.MockClock,
    max_age: float | None,
    expected: list[float],
) -> None:
    source = Source(FetchedJwks(DOC1, max_age_s=max_age))
    t0 = trio.current_time()
    await nursery.start(_cache(source).run)
    await trio.sleep_until(t0 + 150)
    assert source.since(t0) == expected, "max-age is an upper bound, floored at 30 s"


# -- start-up -----------------------------------------------------------------------------


async def test_start_retries_with_backoff_then_reports_started(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(OSError("refused"), OSError("refused"), DOC1)
    t0 = trio.current_time()
    started_at = await _started(nursery, _cache(source))
    assert started_at - t0 == pytest.approx(3), "started only after the third (first good) try"
    await trio.sleep_until(t0 + 400)
    assert source.since(t0) == [0, 1, 3, 303]


async def test_start_gives_up_after_bounded_attempts_naming_the_url(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = Source(OSError("connection refused"))
    cache = _cache(source, start_attempts=5)
    t0 = trio.current_time()
    with pytest.raises(UnavailableError) as caught:
        await cache.run()
    assert URL in caught.value.message and "connection refused" in caught.value.message
    assert source.since(t0) == [0, 1, 3, 7, 15]
    assert cache.keys.kids() == []
    # Nothing is left running: on_unknown_kid does not fetch any more.
    assert await cache.on_unknown_kid("k1") is False
    assert len(source.calls) == 5


async def test_start_with_only_unusable_documents_is_a_configuration_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = Source({"keys": []})
    with pytest.raises(ConfigurationError) as caught:
        await _cache(source, start_attempts=3).run()
    assert caught.value.field == "jwks_url" and URL in caught.value.message
    assert "no usable Ed25519" in caught.value.message


async def test_start_failure_is_not_an_exception_group_through_nursery_start(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with pytest.raises(UnavailableError):
        await nursery.start(_cache(Source(OSError("down")), start_attempts=2).run)


async def test_run_twice_is_refused(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    cache = _cache(Source(DOC1))
    await nursery.start(cache.run)
    with pytest.raises(RuntimeError, match="once"):
        await cache.run()


# -- failures keep the last good keys ---------------------------------------------------


async def test_failures_keep_last_good_keys_and_back_off_until_recovery(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    boom = OSError("gateway down")
    source = Source(DOC1, boom, boom, boom, boom, DOC12)
    t0 = trio.current_time()
    cache = _cache(source)
    verifier = TokenVerifier(_policy(), cache.keys)
    await nursery.start(cache.run)
    await trio.sleep_until(t0 + 310)
    assert cache.keys.kids() == ["k1"], "a failed refresh must never empty the key set"
    assert verifier.verify(_token(K1), now=1_000_010).sub == "u-1"
    stats = cache.statistics()
    assert (stats.fetches_failed, stats.consecutive_failures) == (4, 4)
    assert stats.last_error is not None and "gateway down" in stats.last_error
    await trio.sleep_until(t0 + 700)
    # ok at 0; fail at 300, 301, 303, 307; ok at 315; then the normal interval again.
    assert source.since(t0) == [0, 300, 301, 303, 307, 315, 615]
    assert cache.keys.kids() == ["k1", "k2"]
    assert cache.statistics().consecutive_failures == 0


async def test_default_backoff_is_jittered_within_bounds(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1, OSError("down"))
    t0 = trio.current_time()
    cache = JwksCache(source, source=URL, rng=random.Random(7))
    assert cache  # default backoff: equal jitter, pauses in [d/2, d)
    await nursery.start(cache.run)
    await trio.sleep_until(t0 + 300 + 600)
    gaps = [b - a for a, b in zip(source.calls[1:], source.calls[2:], strict=False)]
    assert len(gaps) >= 10
    for k, gap in enumerate(gaps):
        d = min(DEFAULT_BACKOFF.initial_s * DEFAULT_BACKOFF.multiplier**k, DEFAULT_BACKOFF.max_s)
        assert d / 2 <= gap < d, f"pause {k} was {gap} s, expected in [{d / 2}, {d})"
    assert len(set(gaps[-3:])) == 3, "capped pauses are still jittered"


GARBAGE = [
    pytest.param({}, id="no-keys"),
    pytest.param({"keys": []}, id="empty-keys"),
    pytest.param({"keys": "k1"}, id="keys-not-a-list"),
    pytest.param([DOC1], id="a-list"),
    pytest.param("not json", id="a-string"),
    pytest.param(None, id="null"),
    pytest.param({"keys": [{"kty": "RSA", "kid": "r1", "n": "AQAB", "e": "AQAB"}]}, id="rsa"),
    pytest.param({"keys": [{**DOC1["keys"][0], "crv": "Ed448"}]}, id="ed448"),
    pytest.param({"keys": [{**DOC1["keys"][0], "use": "enc"}]}, id="encryption-key"),
    pytest.param({"keys": [{**DOC1["keys"][0], "x": "!!!"}]}, id="bad-x"),
    pytest.param({"keys": [{**DOC1["keys"][0], "x": "AAAA"}]}, id="short-x"),
    pytest.param({"keys": [{**DOC1["keys"][0], "kid": 7}]}, id="kid-not-a-string"),
    pytest.param({"keys": ["k1", 3, None]}, id="entries-not-objects"),
    pytest.param(FetchedJwks({"keys": []}, max_age_s=60), id="empty-with-max-age"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
async def test_unusable_documents_are_rejected_and_keep_the_old_keys(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock, garbage: Any
) -> None:
    source = Source(DOC1, garbage, DOC1)
    t0 = trio.current_time()
    cache = _cache(source)
    await nursery.start(cache.run)
    await trio.sleep_until(t0 + 300.5)
    assert cache.keys.kids() == ["k1"]
    stats = cache.statistics()
    assert (stats.documents_rejected, stats.fetches_failed) == (1, 1)
    assert stats.last_error is not None and "rejected" in stats.last_error
    await trio.sleep_until(t0 + 302)
    assert source.since(t0) == [0, 300, 301], "a rejected document is retried with backoff"


async def test_hanging_fetch_times_out_and_keeps_keys(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1, "hang", DOC12)
    t0 = trio.current_time()
    cache = _cache(source, fetch_timeout_s=10)
    await nursery.start(cache.run)
    await trio.sleep_until(t0 + 309.9)
    assert cache.statistics().fetches_failed == 0, "still waiting for the hung fetch"
    await trio.sleep_until(t0 + 310.5)
    assert cache.keys.kids() == ["k1"]
    assert cache.statistics().last_error == "no answer within fetch_timeout_s=10"
    await trio.sleep_until(t0 + 312)
    # The hung fetch began at 300, timed out at 310, and was retried 1 s later.
    assert source.since(t0) == [0, 300, 311]
    assert cache.keys.kids() == ["k1", "k2"]


async def test_withdrawn_keys_are_reported(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    withdrawn: list[frozenset[str]] = []
    source = Source(DOC12, _jwks(K2))
    cache = _cache(source, on_withdrawn=withdrawn.append)
    verifier = TokenVerifier(_policy(), cache.keys)
    await nursery.start(cache.run)
    token = _token(K1)
    verifier.verify(token, now=1_000_010)
    await trio.sleep(301)
    assert withdrawn == [frozenset({"k1"})]
    assert cache.keys.kids() == ["k2"]
    verifier.forget()  # what the service's on_withdrawn does
    with pytest.raises(UnknownKeyError):
        verifier.verify(token, now=1_000_020)


# -- unknown kid --------------------------------------------------------------------------


async def test_rotation_becomes_visible_to_the_verifier_after_on_unknown_kid(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1)
    cache = _cache(source)
    verifier = TokenVerifier(_policy(), cache.keys)
    await nursery.start(cache.run)
    old, new = _token(K1), _token(K2)
    with pytest.raises(UnknownKeyError):
        verifier.verify(new, now=1_000_010)
    source.then(DOC12)  # the gateway rotated: k2 signs, k1 still published
    await trio.sleep(5)
    assert await cache.on_unknown_kid("k2") is True
    assert verifier.verify(new, now=1_000_010).sub == "u-1"
    assert verifier.verify(old, now=1_000_010).sub == "u-1"
    assert len(source.calls) == 2


async def test_unknown_kid_refresh_is_shared_and_rate_limited_by_time(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1, latency_s=1.0)
    cache = _cache(source)
    await nursery.start(cache.run)
    t0 = trio.current_time()
    source.then(DOC12)
    answers: list[bool] = []

    async def ask(kid: str) -> None:
        answers.append(await cache.on_unknown_kid(kid))

    async with trio.open_nursery() as wave:
        for _ in range(100):
            wave.start_soon(ask, "k2")
    assert answers == [True] * 100
    # The start-up fetch began at -1 (it takes 1 s); then one fetch for all 100 callers.
    assert source.since(t0) == [-1, 0], "100 concurrent callers share one fetch"
    assert trio.current_time() - t0 == pytest.approx(1.0)

    # Random kids now: within 30 s of that refresh nobody fetches, whatever the kid.
    answers.clear()
    async with trio.open_nursery() as wave:
        for i in range(100):
            wave.start_soon(ask, f"random-{i}")
    for i in range(1000):
        answers.append(await cache.on_unknown_kid(f"again-{i}"))
        await trio.sleep(0.028)  # 1000 calls over 28 s
    assert not any(answers)
    assert source.since(t0) == [-1, 0]
    assert cache.statistics().unknown_kid_refused == 1100

    # 30 s after the last unknown-kid refresh began, one more fetch, again shared by all.
    await trio.sleep_until(t0 + 30)
    answers.clear()
    async with trio.open_nursery() as wave:
        for i in range(100):
            wave.start_soon(ask, f"random-{i}")
    assert not any(answers)
    assert source.since(t0) == [-1, 0, 30]
    stats = cache.statistics()
    assert (stats.unknown_kid_refreshes, stats.fetches_ok) == (2, 3)


async def test_sixty_seconds_of_random_kids_cost_at_most_two_fetches(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1)
    cache = _cache(source, refresh_interval_s=300)
    await nursery.start(cache.run)
    t0 = trio.current_time()
    rng = random.Random(1)
    while trio.current_time() < t0 + 59.9:
        assert await cache.on_unknown_kid(f"x{rng.getrandbits(64):x}") is False
        await trio.sleep(0.01)
    # After the start-up fetch: one at 0 (the first unknown kid) and one at 30.
    assert source.since(t0)[1:] == [0, 30]


async def test_known_kid_answers_without_fetching(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1)
    cache = _cache(source)
    await nursery.start(cache.run)
    assert await cache.on_unknown_kid("k1") is True
    assert len(source.calls) == 1


async def test_unknown_kid_joins_a_periodic_fetch_in_flight(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1, DOC12, latency_s=2.0)
    t0 = trio.current_time()
    cache = _cache(source)
    await nursery.start(cache.run)
    await trio.sleep_until(t0 + 2 + 300 + 1)  # the periodic fetch began at 302
    assert await cache.on_unknown_kid("k2") is True
    assert trio.current_time() == pytest.approx(t0 + 304)
    assert source.since(t0) == [0, 302]
    assert cache.statistics().unknown_kid_refreshes == 0


async def test_cancelled_caller_does_not_cancel_the_shared_fetch(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1, DOC12, latency_s=2.0)
    cache = _cache(source)
    await nursery.start(cache.run)
    results: list[bool] = []

    async def patient() -> None:
        await trio.sleep(0.5)
        results.append(await cache.on_unknown_kid("k2"))

    async with trio.open_nursery() as inner:
        inner.start_soon(patient)
        with trio.move_on_after(0.1) as impatient:
            await cache.on_unknown_kid("k2")
    assert impatient.cancelled_caught
    assert results == [True]
    assert len(source.calls) == 2


async def test_unknown_kid_success_moves_the_periodic_schedule(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1, DOC12)
    t0 = trio.current_time()
    cache = _cache(source)
    await nursery.start(cache.run)
    await trio.sleep_until(t0 + 100)
    assert await cache.on_unknown_kid("k2") is True
    await trio.sleep_until(t0 + 450)
    assert source.since(t0) == [0, 100, 400]


async def test_failed_unknown_kid_refresh_answers_false_and_keeps_keys(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    source = Source(DOC1, DependencyError("502 from gateway"), DOC12)
    t0 = trio.current_time()
    cache = _cache(source)
    await nursery.start(cache.run)
    await trio.sleep_until(t0 + 50)
    assert await cache.on_unknown_kid("k2") is False
    assert cache.keys.kids() == ["k1"]
    await trio.sleep_until(t0 + 52)
    # The failure schedules a retry with backoff (1 s), sooner than the periodic one.
    assert source.since(t0) == [0, 50, 51]
    assert await cache.on_unknown_kid("k2") is True


async def test_on_unknown_kid_without_run_does_not_fetch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    source = Source(DOC12)
    cache = _cache(source)
    assert await cache.on_unknown_kid("k2") is False
    assert source.calls == []


# -- the key set the verifier holds ---------------------------------------------------------


def test_live_key_set_is_a_key_set_and_swaps_whole() -> None:
    live = LiveKeySet()
    verifier = TokenVerifier(_policy(), live)
    assert isinstance(live, KeySet) and live.kids() == []
    with pytest.raises(UnknownKeyError):
        verifier.verify(_token(K3), now=1_000_010)
    live.replace(KeySet.from_jwks(_jwks(K3)))
    assert verifier.verify(_token(K3), now=1_000_010).sub == "u-1"
    assert live.to_jwks() == _jwks(K3)
    assert LiveKeySet.from_jwks(DOC12).kids() == ["k1", "k2"]


def test_a_token_signed_by_another_key_with_a_known_kid_still_fails() -> None:
    live = LiveKeySet()
    live.replace(KeySet.from_jwks(DOC1))
    impostor = TokenSigner(Ed25519PrivateKey.generate(), "k1", issuer=ISSUER, audience=AUDIENCE)
    with pytest.raises(AuthenticationError, match="InvalidSignature"):
        TokenVerifier(_policy(), live).verify(_token(impostor), now=1_000_010)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"refresh_interval_s": 0}, "refresh_interval_s"),
        ({"refresh_interval_s": float("inf")}, "refresh_interval_s"),
        ({"min_refetch_interval_s": -1}, "min_refetch_interval_s"),
        ({"fetch_timeout_s": float("nan")}, "fetch_timeout_s"),
        ({"min_refetch_interval_s": 400}, "min_refetch_interval_s"),
        ({"start_attempts": 0}, "start_attempts"),
        ({"start_attempts": True}, "start_attempts"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        JwksCache(Source(DOC1), source=URL, **kwargs)


# -- HttpJwksFetcher (no network: httpx.MockTransport) ------------------------------------

Handler = Callable[[httpx.Request], httpx.Response]


def _fetcher(handler: Handler, **kwargs: Any) -> HttpJwksFetcher:
    return HttpJwksFetcher(URL, transport=httpx.MockTransport(handler), **kwargs)


def _ok(body: bytes, **headers: str) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, content=body, headers={"content-type": "application/json", **headers}
        )

    return handle


async def test_http_fetcher_returns_the_document_and_max_age() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200,
            json=DOC12,
            headers={"Cache-Control": "public, max-age=120"},
        )

    result = await _fetcher(handle)()
    assert result == FetchedJwks(DOC12, 120.0)
    assert seen[0].method == "GET" and str(seen[0].url) == URL
    assert seen[0].headers["accept"] == "application/json"
    assert seen[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    ("cache_control", "max_age"),
    [
        (None, None),
        ("no-cache", None),
        ("max-age=0", 0.0),
        ('public, max-age="90"', 90.0),
        ("s-maxage=10, MAX-AGE=20", 20.0),
    ],
)
async def test_http_fetcher_reads_max_age(cache_control: str | None, max_age: float | None) -> None:
    headers = {} if cache_control is None else {"cache-control": cache_control}
    result = await _fetcher(_ok(json.dumps(DOC1).encode(), **headers))()
    assert result.max_age_s == max_age


class _Chunks(httpx.AsyncByteStream):
    """A body of ``total`` bytes in 1 KiB chunks, with no Content-Length (not a generator,
    so stopping early leaves nothing for the garbage collector to finalise)."""

    def __init__(self, total: int) -> None:
        self.left = total
        self.closed = False

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self.left <= 0:
            raise StopAsyncIteration
        self.left -= 1024
        return b" " * 1024

    async def aclose(self) -> None:
        self.closed = True


REFUSED = [
    pytest.param(lambda r: httpx.Response(500, json=DOC1), "status 500", id="500"),
    pytest.param(
        lambda r: httpx.Response(302, headers={"location": "https://evil.test/jwks"}),
        "status 302",
        id="redirect-not-followed",
    ),
    pytest.param(
        _ok(json.dumps(DOC1).encode(), **{"content-type": "text/html"}),
        "content-type 'text/html'",
        id="html",
    ),
    pytest.param(
        lambda r: httpx.Response(200, content=json.dumps(DOC1).encode()),
        "content-type ''",
        id="no-content-type",
    ),
    pytest.param(_ok(b"{not json"), "not JSON", id="not-json"),
    pytest.param(_ok(b"\xff\xfe{}"), "not JSON", id="not-utf8"),
    pytest.param(_ok(b" " * (64 * 1024 + 1)), "65537 bytes > 65536", id="declared-too-large"),
    pytest.param(
        lambda r: httpx.Response(
            200, stream=_Chunks(128 * 1024), headers={"content-type": "application/json"}
        ),
        "larger than 65536",
        id="streamed-too-large",
    ),
    pytest.param(
        _ok(gzip.compress(json.dumps(DOC1).encode()), **{"content-encoding": "gzip"}),
        "content-encoding 'gzip'",
        id="gzip",
    ),
]


@pytest.mark.parametrize(("handler", "why"), REFUSED)
async def test_http_fetcher_refuses(handler: Handler, why: str) -> None:
    with pytest.raises(DependencyError) as caught:
        await _fetcher(handler)()
    assert URL in caught.value.message and why in caught.value.message


async def test_http_fetcher_accepts_jwk_set_media_type_and_exact_limit() -> None:
    body = json.dumps(DOC1).encode()
    padded = body + b" " * (1024 - len(body))
    result = await _fetcher(
        _ok(padded, **{"content-type": "application/jwk-set+json; charset=utf-8"}),
        max_bytes=1024,
    )()
    assert result.document == DOC1


async def test_http_fetcher_transport_error_is_unavailable() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(UnavailableError) as caught:
        await _fetcher(handle)()
    assert URL in caught.value.message and "ConnectError" in caught.value.message


async def test_cache_over_a_refusing_fetcher_keeps_its_keys(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    bodies = [json.dumps(DOC1).encode(), b" " * (64 * 1024 + 10)]

    def handle(request: httpx.Request) -> httpx.Response:
        body = bodies.pop(0) if len(bodies) > 1 else bodies[0]
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    cache = JwksCache(_fetcher(handle), source=URL)
    await nursery.start(cache.run)
    await trio.sleep(301)
    stats = cache.statistics()
    assert stats.key_count == 1 and stats.fetches_failed >= 1
    assert stats.last_error is not None and "65546 bytes" in stats.last_error


@pytest.mark.parametrize(
    ("url", "ca_file", "field"),
    [
        ("http://gateway.test/.well-known/jwks.json", None, "jwks_url"),
        ("gateway.test/jwks", None, "jwks_url"),
        ("https:///jwks", None, "jwks_url"),
        ("not a url at all", None, "jwks_url"),
        (URL, Path("/nonexistent/ca.pem"), "jwks_ca_file"),
    ],
)
def test_http_fetcher_configuration_errors_name_the_setting(
    url: str, ca_file: Path | None, field: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        JwksCache.over_https(url, ca_file=ca_file)
    assert caught.value.field == field
