"""``serve_aggregator``: the whole service in one nursery.

consumer (Kafka or the memory bus -> store) + outbox relay + gRPC ``ResultService`` + ops
HTTP. Shutdown (``shutdown`` set, e.g. by SIGTERM): readiness goes false, the gRPC and HTTP
servers stop accepting and let in-flight requests finish (``shutdown_grace_s``), then the
consumer and relay are cancelled (both are safe to cancel: the store transaction is atomic and
unsent outbox rows are sent after restart).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

from aggregator.consumer import ConsumerStatistics, run_consumer
from aggregator.ops import OpsState, create_ops_app
from aggregator.outbox import run_outbox_relay
from aggregator.queries import ResultQueries
from aggregator.settings import AggregatorSettings
from aggregator.store import open_sqlite_store
from common.bus import EventBus, open_service_bus
from common.httpserver import listener_config, serve_listener
from common.rpc import open_rpc_loop, serve_grpc
from common.ttlcache import TtlCache

__all__ = ["AggregatorAddresses", "serve_aggregator"]

#: Seconds between outbox-backlog samples for /metrics.
SAMPLE_S = 1.0


@dataclass(frozen=True, slots=True)
class AggregatorAddresses:
    grpc_port: int
    ops_url: str


async def serve_aggregator(
    settings: AggregatorSettings,
    *,
    shutdown: trio.Event,
    bus: EventBus | None = None,
    task_status: trio.TaskStatus[AggregatorAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the aggregator until ``shutdown`` is set; see the module docstring."""
    store = await open_sqlite_store(settings.db_path)
    cache: TtlCache[Any, Any] = TtlCache(
        ttl_s=settings.cache_ttl_s, max_entries=settings.cache_max_entries
    )
    queries = ResultQueries(store, cache)
    stats = ConsumerStatistics()
    stop_servers = trio.Event()

    def invalidate(changed: Mapping[str, str]) -> None:
        trio.from_thread.run_sync(queries.invalidate, changed)

    async with open_rpc_loop(), open_service_bus(settings.kafka, bus) as the_bus:
        ops = OpsState(
            consumer=stats,
            cache=cache.statistics,
            bus_healthy=lambda: the_bus.statistics().healthy,
        )

        async def sample() -> None:
            while True:
                ops.outbox_backlog = await store.outbox_backlog()
                await trio.sleep(SAMPLE_S)

        async with trio.open_nursery() as workers:
            await workers.start(
                partial(run_consumer, the_bus, store, invalidate=invalidate, stats=stats)
            )
            await workers.start(run_outbox_relay, store, the_bus)
            workers.start_soon(sample)
            async with trio.open_nursery() as servers:
                grpc_port = await servers.start(
                    partial(
                        serve_grpc,
                        [queries],
                        host=settings.grpc_host,
                        port=settings.grpc_port,
                        shutdown_trigger=stop_servers.wait,
                        grace_s=settings.shutdown_grace_s,
                    )
                )
                ops_url: str = await servers.start(
                    partial(
                        serve_listener,
                        create_ops_app(ops),
                        listener_config(
                            settings.ops_host, settings.ops_port, grace_s=settings.shutdown_grace_s
                        ),
                        shutdown_trigger=stop_servers.wait,
                    )
                )
                task_status.started(AggregatorAddresses(grpc_port, ops_url))
                await shutdown.wait()
                ops.draining = True
                stop_servers.set()
            workers.cancel_scope.cancel()
    await store.close()
