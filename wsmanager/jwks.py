"""The gateway's JWKS, kept fresh for the WebSocket manager's :class:`~common.tokens.TokenVerifier`.

:class:`JwksCache` owns a :class:`LiveKeySet`: a :class:`~common.tokens.KeySet` whose contents
are replaced as a whole on every good fetch. Build the verifier once with
``TokenVerifier(policy, cache.keys)``; it keeps that reference, so it sees every rotation at
once and nothing has to know which verifiers exist.

:meth:`JwksCache.run` (``serve_*`` style, never returns) fetches the document, reports
readiness only after the first good fetch, then refreshes every ``refresh_interval_s``
(shortened, never lengthened, by a ``Cache-Control: max-age``). A failed fetch -- transport
error, timeout, bad status, wrong media type, too large, not JSON, or a document with no usable
Ed25519 signing key -- is logged and **keeps the last good keys** (the set is never emptied);
the next try follows jittered exponential backoff. At start, ``start_attempts`` failed tries in
a row end ``run`` with :class:`~common.errors.UnavailableError` (or
:class:`~common.errors.ConfigurationError` if the source answered every time but never with a
usable key set), naming the URL.

:meth:`JwksCache.on_unknown_kid` is for the caller that got
:class:`~common.tokens.UnknownKeyError`: it refreshes immediately, but at most once per
``min_refetch_interval_s`` **whatever the kid** (a stream of tokens with random kids costs the
gateway one request per interval, not one per token), and concurrent callers share the fetch
in flight. Fetches run in ``run``'s nursery, so a caller that gives up (cancelled, timed out)
never cancels the fetch others are waiting for.

Every timer reads the Trio clock (deadlines and scopes, no wall clock), so tests drive it on
``autojump_clock``; the fetch function is injected (:class:`HttpJwksFetcher` is the real one).
The refresher sleeps in a ``move_on_at`` scope and is woken when a failure brings the next
try forward.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.backoff import BackoffPolicy, delays
from common.errors import (
    ConfigurationError,
    DependencyError,
    UnavailableError,
)
from common.logs import get_logger
from common.tls import client_context
from common.tokens import KeySet

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_FETCH_TIMEOUT_S",
    "DEFAULT_MIN_REFETCH_INTERVAL_S",
    "DEFAULT_REFRESH_INTERVAL_S",
    "DEFAULT_START_ATTEMPTS",
    "MAX_JWKS_BYTES",
    "FetchedJwks",
    "HttpJwksFetcher",
    "JwksCache",
    "JwksFetcher",
    "JwksStatistics",
    "LiveKeySet",
]

log = get_logger("wsmanager.jwks")

DEFAULT_REFRESH_INTERVAL_S = 300.0
DEFAULT_MIN_REFETCH_INTERVAL_S = 30.0
#: Bound on one whole fetch (connect, TLS, headers and body), enforced by the cache.
DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_START_ATTEMPTS = 5
#: A JWKS of a handful of Ed25519 keys is well under 2 KiB; anything past this is refused.
MAX_JWKS_BYTES = 64 * 1024
#: 1 s, 2 s, 4 s ... capped at 60 s, each drawn from [d/2, d) (a floor, and no lock-step herd).
#: ``max_attempts`` is ignored: the refresher never gives up (see ``start_attempts``).
DEFAULT_BACKOFF = BackoffPolicy(initial_s=1.0, multiplier=2.0, max_s=60.0, jitter="equal")

_SERVICE = "gateway-jwks"
_MEDIA_TYPES = frozenset({"application/json", "application/jwk-set+json"})
_MAX_AGE = re.compile(r'(?:^|[,\s])max-age\s*=\s*"?(\d{1,10})"?', re.IGNORECASE)


class LiveKeySet(KeySet):
    """A :class:`KeySet` whose whole contents :meth:`replace` swaps in one step.

    Hand it to any number of verifiers; each lookup reads the current set, so a rotation is
    visible everywhere at once and a lookup never sees half an update.
    """

    def __init__(self, keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        super().__init__()
        self._current = KeySet(keys)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        return self._current.get(kid)

    def kids(self) -> list[str]:
        return self._current.kids()

    def to_jwks(self) -> dict[str, Any]:
        return self._current.to_jwks()

    def replace(self, keys: KeySet) -> None:
        """Make ``keys`` the current set (the old one is dropped)."""
        self._current = keys


@dataclass(frozen=True, slots=True)
class FetchedJwks:
    """What a fetch returns: the parsed JSON, and the ``Cache-Control`` max-age if any."""

    document: Any
    max_age_s: float | None = None


#: ``await fetch()`` -> the document (or a :class:`FetchedJwks`); raises on any failure.
JwksFetcher = Callable[[], Awaitable[FetchedJwks | Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class JwksStatistics:
    """A snapshot of a :class:`JwksCache` (times are on its clock, monotonic seconds)."""

    key_count: int
    kids: tuple[str, ...]
    fetches_ok: int
    #: Every failed fetch, rejected documents included.
    fetches_failed: int
    #: Fetches that returned something that is not a usable JWKS.
    documents_rejected: int
    #: Refreshes started by :meth:`JwksCache.on_unknown_kid`.
    unknown_kid_refreshes: int
    #: Unknown-kid calls answered from the cache because the last such refresh was too recent.
    unknown_kid_refused: int
    consecutive_failures: int
    last_success_at: float | None
    last_error: str | None
    next_refresh_at: float | None


def _max_age(cache_control: str | None) -> float | None:
    if not cache_control:
        return None
    match = _MAX_AGE.search(cache_control)
    return float(match.group(1)) if match else None


class HttpJwksFetcher:
    """``GET`` the JWKS over HTTPS with httpx, verifying the server against ``ca_file``.

    One short-lived client per fetch (a fresh TLS context each time, see
    :func:`common.tls.client_context`; a refresh every few minutes does not need a pool).
    Refused, as :class:`~common.errors.DependencyError`: a status other than 200 (redirects
    are not followed), a media type other than ``application/json`` or
    ``application/jwk-set+json``, a content encoding (``identity`` is asked for, so the size
    limit counts real bytes), a body over ``max_bytes``, a body that is not JSON. Transport
    errors become :class:`~common.errors.UnavailableError`. Proxy and CA settings from the
    environment are ignored (``trust_env=False``): configuration comes from settings only.
    The whole fetch is bounded by the cache's ``fetch_timeout_s``; ``timeout_s`` bounds each
    network operation. ``transport`` replaces the network (tests: ``httpx.MockTransport``).
    """

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path | str | None = None,
        timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        max_bytes: int = MAX_JWKS_BYTES,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL:
            raise ConfigurationError(f"jwks_url {url!r} is not a URL", field="jwks_url") from None
        if parsed.scheme != "https" or not parsed.host:
            raise ConfigurationError(f"jwks_url {url!r} must be an https URL", field="jwks_url")
        if ca_file is not None and not Path(ca_file).is_file():
            raise ConfigurationError(
                f"jwks_ca_file {ca_file} is missing or not a file", field="jwks_ca_file"
            )
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes!r}")
        self.url = url
        self._ca_file = ca_file
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._transport = transport

    def _refuse(self, why: str) -> DependencyError:
        return DependencyError(f"JWKS {self.url}: {why}", service=_SERVICE)

    async def __call__(self) -> FetchedJwks:
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        try:
            async with (
                httpx.AsyncClient(
                    verify=client_context(self._ca_file),
                    timeout=self._timeout_s,
                    follow_redirects=False,
                    trust_env=False,
                    transport=self._transport,
                ) as client,
                client.stream("GET", self.url, headers=headers) as response,
            ):
                if response.status_code != 200:
                    raise self._refuse(f"status {response.status_code}")
                media = response.headers.get("content-type", "").partition(";")[0].strip()
                if media.lower() not in _MEDIA_TYPES:
                    raise self._refuse(f"content-type {media[:60]!r} is not JSON")
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                if encoding != "identity":
                    raise self._refuse(f"content-encoding {encoding[:30]!r} not accepted")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self._max_bytes:
                    raise self._refuse(f"body of {declared} bytes > {self._max_bytes}")
                # Past the limit the rest is drained and dropped, not stored: httpx nests
                # async generators, and leaving them early leaves them to the garbage
                # collector (ResourceWarning). The drain is bounded by fetch_timeout_s.
                body = bytearray()
                received = 0
                async for chunk in response.aiter_bytes():  # identity: same as raw
                    received += len(chunk)
                    if received <= self._max_bytes:
                        body += chunk
                if received > self._max_bytes:
                    raise self._refuse(f"body larger than {self._max_bytes} bytes")
                max_age = _max_age(response.headers.get("cache-control"))
        except httpx.HTTPError as exc:
            raise UnavailableError(
                f"JWKS {self.url}: {type(exc).__name__}: {exc}", service=_SERVICE
            ) from exc
        try:
            document = json.loads(bytes(body))
        except (ValueError, UnicodeDecodeError):
            raise self._refuse("body is not JSON") from None
        return FetchedJwks(document, max_age)


class _Fetch:
    """One fetch in flight; everyone who asked for a refresh meanwhile waits on ``done``."""

    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.ok = False


class JwksCache:
    """The current keys of one JWKS source, refreshed by :meth:`run`; see the module docstring.

    ``source`` names the document in logs and errors (its URL). Raises :class:`ValueError`
    naming a bad argument. ``on_withdrawn(kids)`` is called after a refresh that dropped keys
    (e.g. ``lambda _: verifier.forget()``, so tokens cached by a verifier stop verifying).
    """

    def __init__(
        self,
        fetch: JwksFetcher,
        *,
        source: str,
        refresh_interval_s: float = DEFAULT_REFRESH_INTERVAL_S,
        min_refetch_interval_s: float = DEFAULT_MIN_REFETCH_INTERVAL_S,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        start_attempts: int = DEFAULT_START_ATTEMPTS,
        backoff: BackoffPolicy = DEFAULT_BACKOFF,
        rng: random.Random | None = None,
        on_withdrawn: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        for name, value in (
            ("refresh_interval_s", refresh_interval_s),
            ("min_refetch_interval_s", min_refetch_interval_s),
            ("fetch_timeout_s", fetch_timeout_s),
        ):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if min_refetch_interval_s > refresh_interval_s:
            raise ValueError(
                f"min_refetch_interval_s ({min_refetch_interval_s}) must not exceed "
                f"refresh_interval_s ({refresh_interval_s})"
            )
        if isinstance(start_attempts, bool) or not isinstance(start_attempts, int):
            raise ValueError(f"start_attempts must be an integer, got {start_attempts!r}")
        if start_attempts < 1:
            raise ValueError(f"start_attempts must be >= 1, got {start_attempts!r}")
        self.source = source
        #: Give this to the verifier; it always holds the last good keys.
        self.keys = LiveKeySet()
        self._fetch = fetch
        self._refresh_interval_s = refresh_interval_s
        self._min_refetch_interval_s = min_refetch_interval_s
        self._fetch_timeout_s = fetch_timeout_s
        self._start_attempts = start_attempts
        # The refresher never gives up, so the policy's own attempt limit does not apply.
        self._backoff = dataclasses.replace(backoff, max_attempts=sys.maxsize)
        self._rng = rng
        self._pauses = delays(self._backoff, rng)
        self._on_withdrawn = on_withdrawn
        self._started = False
        self._nursery: trio.Nursery | None = None
        self._inflight: _Fetch | None = None
        self._next_refresh_at = -math.inf
        #: Set when the schedule changes, so the refresher re-reads ``_next_refresh_at``.
        self._rescheduled = trio.Event()
        self._last_unknown_kid_refresh_at = -math.inf
        self._ok = 0
        self._failed = 0
        self._rejected = 0
        self._failures_in_a_row = 0
        self._unknown_kid_refreshes = 0
        self._unknown_kid_refused = 0
        self._last_success_at: float | None = None
        self._last_error: str | None = None

    @classmethod
    def over_https(
        cls,
        url: str,
        *,
        ca_file: Path | str | None = None,
        max_bytes: int = MAX_JWKS_BYTES,
        fetch_timeout_s: float = DEFAULT_FETCH_TIMEOUT_S,
        **kwargs: Any,
    ) -> JwksCache:
        """A cache fed by :class:`HttpJwksFetcher` (raises ConfigurationError on a bad URL/CA)."""
        fetcher = HttpJwksFetcher(
            url, ca_file=ca_file, timeout_s=fetch_timeout_s, max_bytes=max_bytes
        )
        return cls(fetcher, source=url, fetch_timeout_s=fetch_timeout_s, **kwargs)

    # -- the background task ------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch, report started, then keep the keys fresh until cancelled (never returns).

        Raises :class:`UnavailableError` (or :class:`ConfigurationError` if every answer was a
        rejected document) after ``start_attempts`` failed fetches in a row at start, before
        reporting started. May run once per cache.
        """
        if self._started:
            raise RuntimeError("JwksCache.run may only be called once")
        self._started = True
        rejected_at_start = self._rejected
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                if await self._start_up():
                    task_status.started()
                    await self._refresh_forever()  # returns only by cancellation
            finally:
                self._nursery = None
        # Start-up failed. Raised out here, not in the nursery, so that callers get this
        # error and not an ExceptionGroup (no fetch task is left: each ended before we did).
        what = (
            f"JWKS {self.source} unavailable: {self._start_attempts} fetches failed "
            f"at start, last: {self._last_error}"
        )
        if self._rejected - rejected_at_start == self._start_attempts:
            raise ConfigurationError(what, field="jwks_url")
        raise UnavailableError(what, service=_SERVICE)

    async def _start_up(self) -> bool:
        for attempt in range(1, self._start_attempts + 1):
            fetch = self._begin_fetch()
            await fetch.done.wait()
            if fetch.ok:
                return True
            if attempt < self._start_attempts:
                await trio.sleep_until(self._next_refresh_at)
        return False

    async def _refresh_forever(self) -> None:
        while True:
            self._rescheduled = trio.Event()
            with trio.move_on_at(self._next_refresh_at):
                await self._rescheduled.wait()
            if trio.current_time() < self._next_refresh_at:
                continue  # an unknown-kid refresh moved the schedule: wait for the new time
            fetch = self._begin_fetch()
            await fetch.done.wait()

    def _schedule(self, at: float) -> None:
        self._next_refresh_at = at
        self._rescheduled.set()

    # -- on demand ----------------------------------------------------------------------------

    async def on_unknown_kid(self, kid: str) -> bool:
        """Refresh now if allowed, and say whether ``kid`` is known afterwards.

        Joins the fetch in flight if there is one; otherwise starts one unless the last
        unknown-kid refresh began less than ``min_refetch_interval_s`` ago (then it answers
        from the current keys at once). Cancelling the caller does not cancel the fetch. When
        :meth:`run` is not running it answers from the current keys without fetching. Never
        raises for a failed fetch (the answer is then ``False`` unless the kid was known).
        """
        if self.keys.get(kid) is not None:
            return True
        if self._nursery is None:
            return False
        fetch = self._inflight
        if fetch is None:
            now = trio.current_time()
            if now < self._last_unknown_kid_refresh_at + self._min_refetch_interval_s:
                self._unknown_kid_refused += 1
                return False
            self._last_unknown_kid_refresh_at = now
            self._unknown_kid_refreshes += 1
            fetch = self._begin_fetch()
        await fetch.done.wait()
        return self.keys.get(kid) is not None

    # -- one fetch ----------------------------------------------------------------------------

    def _begin_fetch(self) -> _Fetch:
        if self._inflight is None:
            assert self._nursery is not None, "fetches run only inside run()"
            self._inflight = _Fetch()
            self._nursery.start_soon(self._fetch_task, self._inflight)
        return self._inflight

    async def _fetch_task(self, fetch: _Fetch) -> None:
        try:
            fetch.ok = await self._attempt()
        finally:
            self._inflight = None
            fetch.done.set()

    async def _attempt(self) -> bool:
        try:
            with trio.fail_after(self._fetch_timeout_s):
                result = await self._fetch()
        except trio.TooSlowError:
            error = f"no answer within fetch_timeout_s={self._fetch_timeout_s}"
        except Exception as exc:  # any failure of the source keeps the last good keys
            error = f"{type(exc).__name__}: {exc}"
        else:
            keys, max_age, problem = self._parse(result)
            if keys is not None:
                self._accept(keys, max_age)
                return True
            self._rejected += 1
            error = f"document rejected: {problem}"
        self._fail(error)
        return False

    @staticmethod
    def _parse(
        result: FetchedJwks | Mapping[str, Any],
    ) -> tuple[KeySet | None, float | None, str]:
        if isinstance(result, FetchedJwks):
            document, max_age = result.document, result.max_age_s
        else:
            document, max_age = result, None
        if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
            return None, None, "not a JWKS (no 'keys' list)"
        keys = KeySet.from_jwks(document)
        if not keys.kids():
            return None, None, "no usable Ed25519 signing key"
        return keys, max_age, ""

    def _accept(self, keys: KeySet, max_age: float | None) -> None:
        now = trio.current_time()
        before, after = set(self.keys.kids()), set(keys.kids())
        self.keys.replace(keys)
        interval = self._refresh_interval_s
        if max_age is not None:
            # An upper bound only, and never below the unknown-kid floor (max-age=0 must not
            # turn the refresher into a busy loop).
            interval = min(interval, max(max_age, self._min_refetch_interval_s))
        self._schedule(now + interval)
        self._ok += 1
        self._failures_in_a_row = 0
        self._pauses = delays(self._backoff, self._rng)
        self._last_success_at = now
        if before != after:
            log.info(
                "jwks keys changed",
                source=self.source,
                kids=sorted(after),
                added=sorted(after - before),
                removed=sorted(before - after),
            )
        withdrawn = frozenset(before - after)
        if withdrawn and self._on_withdrawn is not None:
            self._on_withdrawn(withdrawn)

    def _fail(self, error: str) -> None:
        now = trio.current_time()
        self._failed += 1
        self._failures_in_a_row += 1
        self._last_error = error
        pause = next(self._pauses)
        # A failure never postpones a refresh that is already due sooner.
        if self._next_refresh_at <= now or now + pause < self._next_refresh_at:
            self._schedule(now + pause)
        log.warning(
            "jwks fetch failed; keeping the last good keys",
            source=self.source,
            error=error,
            kept_keys=len(self.keys.kids()),
            failures_in_a_row=self._failures_in_a_row,
            retry_in_s=round(self._next_refresh_at - now, 3),
        )

    def statistics(self) -> JwksStatistics:
        kids = tuple(self.keys.kids())
        return JwksStatistics(
            key_count=len(kids),
            kids=kids,
            fetches_ok=self._ok,
            fetches_failed=self._failed,
            documents_rejected=self._rejected,
            unknown_kid_refreshes=self._unknown_kid_refreshes,
            unknown_kid_refused=self._unknown_kid_refused,
            consecutive_failures=self._failures_in_a_row,
            last_success_at=self._last_success_at,
            last_error=self._last_error,
            next_refresh_at=self._next_refresh_at if self._nursery is not None else None,
        )
