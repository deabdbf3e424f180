"""The gateway's backend calls: one channel, breaker and retry budget per backend.

Every call the gateway makes to ``BatchService``, ``FileService`` or ``ResultService`` goes
through :class:`Backend`:

* **deadline**: the call runs under the caller's Trio deadline (the route's remaining budget,
  see :func:`route_budget`), which :mod:`common.rpc` sends as ``grpc-timeout``; it never waits
  past it;
* **circuit breaker** per backend: unavailable, deadline exceeded and other dependency-class
  failures count; client-class answers (NOT_FOUND, INVALID_ARGUMENT, ...) prove the backend
  is healthy and count as successes; a call cut by the route's deadline counts as a timeout,
  a call cancelled for another reason (the client went away) does not count. An open breaker
  answers :class:`~common.errors.CircuitOpenError` (503 with ``Retry-After``) at once;
* **retries** with jittered exponential backoff, only for idempotent reads, only for
  transient failures (unavailable), only while the deadline leaves room for the pause and the
  backend's retry budget allows it.

:func:`public_error` is the one table from a backend's error (already mapped from its gRPC
status by :mod:`common.rpc`) to what the HTTP client sees: the status class is kept, the
backend's own text never is, so no backend message can reveal another user's data.
"""

from __future__ import annotations

import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pydantic
import trio

from common.backoff import BackoffPolicy, RetryBudget, retry
from common.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from common.clock import Clock, TrioClock
from common.errors import (
    AuthenticationError,
    CircuitOpenError,
    ClientError,
    ConflictError,
    DeadlineExceededError,
    DependencyError,
    HuleEduError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitedError,
    UnavailableError,
    ValidationError,
)
from common.logs import get_logger
from common.rpc import StreamCall

__all__ = [
    "Backend",
    "BackendSettings",
    "Caller",
    "public_error",
    "route_budget",
]

log = get_logger("gateway.backends")

Resp = TypeVar("Resp")


class BackendSettings(pydantic.BaseModel):
    """One backend: where it is and how the gateway protects itself from it."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    #: ``host:port`` of the backend's gRPC server.
    target: str
    #: Seconds a call may take when no route budget applies.
    default_timeout_s: float = pydantic.Field(default=5.0, gt=0, le=300)
    #: Breaker: failure ratio over ``breaker_window_s`` (with at least ``breaker_minimum_calls``
    #: calls) that opens it; ``breaker_open_for_s`` until a probe is let through.
    breaker_failure_ratio: float = pydantic.Field(default=0.5, gt=0, le=1)
    breaker_minimum_calls: int = pydantic.Field(default=10, ge=1, le=10_000)
    breaker_window_s: float = pydantic.Field(default=10.0, gt=0, le=3600)
    breaker_open_for_s: float = pydantic.Field(default=5.0, gt=0, le=3600)
    #: Attempts of an idempotent read in all (1 = no retry), and the backoff between them.
    retry_attempts: int = pydantic.Field(default=3, ge=1, le=10)
    retry_initial_s: float = pydantic.Field(default=0.025, gt=0, le=10)
    retry_max_s: float = pydantic.Field(default=0.25, gt=0, le=60)
    #: Retries allowed per first attempt over the budget's window (plus 1 retry/s always).
    retry_budget_ratio: float = pydantic.Field(default=0.2, ge=0, le=1)

    def breaker_policy(self) -> BreakerPolicy:
        return BreakerPolicy(
            failure_ratio=self.breaker_failure_ratio,
            minimum_calls=self.breaker_minimum_calls,
            window_s=self.breaker_window_s,
            open_for_s=self.breaker_open_for_s,
        )

    def backoff_policy(self) -> BackoffPolicy:
        return BackoffPolicy(
            initial_s=self.retry_initial_s,
            max_s=max(self.retry_max_s, self.retry_initial_s),
            max_attempts=self.retry_attempts,
        )


class Caller(Protocol):
    """What :class:`Backend` needs of a channel (:class:`common.rpc.RpcChannel` has it)."""

    service: str

    def call(
        self, method: Callable[..., Awaitable[Resp]], request: Any, *, idempotent: bool = ...
    ) -> Awaitable[Resp]: ...


def _counts_as_failure(exc: Exception) -> bool:
    return isinstance(exc, DependencyError) and not isinstance(exc, CircuitOpenError)


def _transient(exc: Exception) -> bool:
    return isinstance(exc, UnavailableError) and not isinstance(exc, CircuitOpenError)


class Backend:
    """Calls to one backend through its breaker (and, for reads, its retry budget)."""

    def __init__(
        self,
        name: str,
        channel: Caller,
        settings: BackendSettings,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.channel = channel
        self.settings = settings
        self.breaker = CircuitBreaker(name, settings.breaker_policy())
        self.budget = RetryBudget(ratio=settings.retry_budget_ratio)
        self._backoff = settings.backoff_policy()
        self._clock = clock or TrioClock()
        self._rng = rng

    def state(self) -> BreakerState:
        return self.breaker.state(self._clock.now())

    async def call(
        self,
        method: Callable[..., Awaitable[Resp]],
        request: Any,
        *,
        idempotent: bool = False,
    ) -> Resp:
        """``method(request)`` on this backend; raises errors of our tree only.

        A refused call raises :class:`CircuitOpenError`; a call the caller's deadline cut
        raises :class:`DeadlineExceededError` (never ``Cancelled`` for that reason).
        """

        async def once() -> Resp:
            return await self._guarded(
                lambda: self.channel.call(method, request, idempotent=idempotent)
            )

        if not idempotent:
            return await once()
        return await retry(
            once,
            retry_on=_transient,
            policy=self._backoff,
            budget=self.budget,
            clock=self._clock,
            rng=self._rng,
        )

    @asynccontextmanager
    async def stream(self, open_call: Callable[[], Any]) -> AsyncIterator[StreamCall[Any, Any]]:
        """A client-streaming call through the breaker (never retried): ``open_call()`` must
        return the channel's ``stream_unary(...)`` context manager."""
        with self._admitted():
            async with open_call() as call:
                yield call

    async def _guarded(self, attempt: Callable[[], Awaitable[Resp]]) -> Resp:
        try:
            with self._admitted():
                return await attempt()
        except CircuitOpenError:
            await trio.lowlevel.checkpoint()  # a refusal is still a checkpoint
            raise

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """Take a breaker permit (raises :class:`CircuitOpenError` when refused) and record
        how the block ended: a dependency failure, a success (client-class answers too), a
        cut by the caller's deadline (a failure: too slow), or another cancellation or
        interruption (says nothing about the backend: the permit is just released)."""
        permit = self.breaker.before_call(self._clock.now())
        deadline = trio.current_effective_deadline()
        try:
            yield
        except trio.Cancelled:
            if not math.isinf(deadline) and trio.current_time() >= deadline:
                self.breaker.record_failure(self._clock.now(), permit)
            else:
                self.breaker.release(permit)
            raise
        except Exception as exc:
            if _counts_as_failure(exc):
                self.breaker.record_failure(self._clock.now(), permit)
            else:
                self.breaker.record_success(self._clock.now(), permit)
            raise
        except BaseException:
            self.breaker.release(permit)
            raise
        self.breaker.record_success(self._clock.now(), permit)


@contextmanager
def route_budget(seconds: float, *, service: str = "gateway") -> Iterator[trio.CancelScope]:
    """Run the block under a deadline ``seconds`` from now; if the deadline cuts it, raise
    :class:`DeadlineExceededError` (504) instead of leaving silently."""
    with trio.move_on_after(seconds) as scope:
        yield scope
    if scope.cancelled_caught:
        raise DeadlineExceededError(
            f"no answer within the route's budget of {seconds:g} s", service=service
        )


@dataclass(frozen=True, slots=True)
class _Public:
    error: type[HuleEduError]
    detail: str
    keep_field: bool = False


#: A backend's error (by class, most specific first) -> what the HTTP client gets. The
#: backend's message goes to the log only; ``{what}`` is the resource the route names.
_PUBLIC: tuple[tuple[type[HuleEduError], _Public], ...] = (
    (NotFoundError, _Public(NotFoundError, "{what} not found")),
    (PermissionDeniedError, _Public(NotFoundError, "{what} not found")),
    (PayloadTooLargeError, _Public(PayloadTooLargeError, "over a backend limit", True)),
    (RateLimitedError, _Public(UnavailableError, "the backend is over capacity; retry later")),
    (ValidationError, _Public(ValidationError, "the backend refused a value", True)),
    (ConflictError, _Public(ConflictError, "{what} is not in a state that allows this")),
    (AuthenticationError, _Public(UnavailableError, "the backend refused the gateway")),
    (CircuitOpenError, _Public(CircuitOpenError, "the backend is unavailable; retry later")),
    (UnavailableError, _Public(UnavailableError, "the backend is unavailable")),
    (DeadlineExceededError, _Public(DeadlineExceededError, "the backend did not answer in time")),
    (ClientError, _Public(ValidationError, "the backend refused the request")),
    (HuleEduError, _Public(DependencyError, "the backend failed")),
)


def public_error(exc: HuleEduError, what: str) -> HuleEduError:
    """The client-facing error for a backend's ``exc`` (see ``_PUBLIC``). PERMISSION_DENIED
    answers 404 like NOT_FOUND: another user's resource must look like no resource."""
    public = next(public for source, public in _PUBLIC if isinstance(exc, source))
    detail = public.detail.format(what=what)
    log.info(
        "backend error",
        backend=exc.service,
        code=exc.code,
        reason=exc.message,
        answered=public.error.code,
    )
    return public.error(
        detail,
        field=exc.field if public.keep_field else None,
        retry_after=exc.retry_after,
        service=exc.service,
    )
