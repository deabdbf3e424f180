"""The ``ResultService`` gRPC servicer (Trio code, served through ``common/rpc``).

Every request names the acting user; a batch owned by someone else answers NOT_FOUND, exactly
as a batch that does not exist. Invalid arguments answer INVALID_ARGUMENT naming the field.
Answers are cached per query (:class:`~common.ttlcache.TtlCache`, tagged ``batch:<id>`` and
``user:<id>``); the consumer invalidates those tags inside each store transaction, and values
read before an invalidation are refused by the cache's stale-write guard, so a query issued
after an event was applied never sees the view from before it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import trio

from aggregator.projection import to_batch_summary, to_batch_view
from aggregator.store import ResultStore
from common.contracts.huleedu.common import v1 as common_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import NotFoundError, ValidationError
from common.ttlcache import TtlCache

__all__ = ["ResultQueries"]

T = TypeVar("T")
DEFAULT_PAGE = 20
MAX_PAGE = 100
DEFAULT_RECENT = 10
MAX_RECENT = 50
MAX_ID = 128


def _actor(actor: common_v1.Actor | None) -> str:
    if actor is None or not actor.user_id:
        raise ValidationError("actor.user_id is required", field="actor.user_id")
    return actor.user_id


def _token(created_at: str, batch_id: str, filter_key: str) -> str:
    raw = json.dumps([created_at, batch_id, filter_key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _untoken(token: str, filter_key: str) -> tuple[str, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created_at, batch_id, key = json.loads(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValidationError("page_token is not valid", field="page.page_token") from exc
    if not (isinstance(created_at, str) and isinstance(batch_id, str)) or key != filter_key:
        raise ValidationError("page_token does not belong to this query", field="page.page_token")
    return created_at, batch_id


class ResultQueries(results_v1.ResultServiceBase):
    def __init__(self, store: ResultStore, cache: TtlCache[Any, Any]) -> None:
        self._store = store
        self._cache = cache

    def invalidate(self, changed: Mapping[str, str]) -> None:
        """Drop every cached answer that ``{batch_id: owner}`` changes can affect."""
        for batch_id, owner in changed.items():
            self._cache.invalidate_tag(f"batch:{batch_id}")
            if owner:
                self._cache.invalidate_tag(f"user:{owner}")

    async def _cached(
        self, key: Any, tags: tuple[str, ...], compute: Callable[[], Awaitable[T]]
    ) -> T:
        now = trio.current_time()
        hit = self._cache.get(key, now)
        if hit is not None:
            value: T = hit
            return value
        token = self._cache.begin(key)
        value = await compute()
        self._cache.set_if_current(key, token, value, trio.current_time(), tags=tags)
        return value

    async def get_batch(self, message: results_v1.GetBatchRequest) -> results_v1.GetBatchResponse:
        user = _actor(message.actor)
        if not message.batch_id or len(message.batch_id) > MAX_ID:
            raise ValidationError(f"batch_id must be 1..{MAX_ID} characters", field="batch_id")

        async def compute() -> tuple[str, results_v1.GetBatchResponse] | tuple[str, None]:
            state = await self._store.load(message.batch_id)
            if state is None or not state.registered:
                return "", None
            view = to_batch_view(state, include_essays=message.include_essays)
            return state.owner_user_id, results_v1.GetBatchResponse(batch=view)

        owner, response = await self._cached(
            ("batch", message.batch_id, message.include_essays),
            (f"batch:{message.batch_id}",),
            compute,
        )
        if response is None or owner != user:
            raise NotFoundError(f"batch {message.batch_id} not found")
        return response

    async def list_batches(
        self, message: results_v1.ListBatchesRequest
    ) -> results_v1.ListBatchesResponse:
        user = _actor(message.actor)
        page = message.page or common_v1.PageRequest()
        if not 0 <= page.page_size <= MAX_PAGE:
            raise ValidationError(f"page_size must be 0..{MAX_PAGE}", field="page.page_size")
        size = page.page_size or DEFAULT_PAGE
        statuses = sorted({int(s) for s in message.status_filter})
        if any(s <= 0 or s > max(int(v) for v in results_v1.BatchStatus) for s in statuses):
            raise ValidationError("status_filter has an unknown status", field="status_filter")
        filter_key = hashlib.sha256(f"{user}|{statuses}|{size}".encode()).hexdigest()[:16]
        after = _untoken(page.page_token, filter_key) if page.page_token else None

        async def compute() -> results_v1.ListBatchesResponse:
            states = await self._store.list_for_owner(
                user, limit=size + 1, after=after, statuses=statuses
            )
            more = len(states) > size
            states = states[:size]
            last = states[-1] if states else None
            return results_v1.ListBatchesResponse(
                batches=[to_batch_summary(s) for s in states],
                next_page_token=_token(last.created_at, last.batch_id, filter_key)
                if more and last
                else "",
            )

        return await self._cached(
            ("list", user, size, page.page_token, tuple(statuses)), (f"user:{user}",), compute
        )

    async def get_dashboard(
        self, message: results_v1.GetDashboardRequest
    ) -> results_v1.GetDashboardResponse:
        user = _actor(message.actor)
        if not 0 <= message.recent_limit <= MAX_RECENT:
            raise ValidationError(f"recent_limit must be 0..{MAX_RECENT}", field="recent_limit")
        limit = message.recent_limit or DEFAULT_RECENT

        async def compute() -> results_v1.GetDashboardResponse:
            counts, processed = await self._store.dashboard(user)
            recent = await self._store.list_for_owner(user, limit=limit, after=None, statuses=())
            return results_v1.GetDashboardResponse(
                counts=[
                    results_v1.StatusCount(status=results_v1.BatchStatus(s), count=c)
                    for s, c in sorted(counts.items())
                ],
                recent=[to_batch_summary(s) for s in recent],
                total_batches=sum(counts.values()),
                essays_processed=processed,
            )

        return await self._cached(("dash", user, limit), (f"user:{user}",), compute)
