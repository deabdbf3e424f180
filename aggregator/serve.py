"""``serve_aggregator``: the whole service in one nursery.

consumer (Kafka or the memory bus -> store) + outbox relay + gRPC ``ResultService`` + ops
HTTP. Shutdown (``shutdown`` set, e.g. by SIGTERM): readiness goes false, the gRPC and HTTP
servers stop accepting and let in-flight requests finish (``shutdown_grace_s``), then the
consumer and relay are cancelled (both are safe to cancel: the store transaction is atomic and
unsent outbox rows are sent after restart).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config

from aggregator.consumer import ConsumerStatistics, run_consumer
from aggregator.ops import OpsState, create_ops_app
from aggregator.outbox import run_outbox_relay
from aggregator.queries import ResultQueries
from aggregator.settings import AggregatorSettings
from aggregator.store import open_sqlite_store
from common.bus import EventBus, open_kafka_bus, open_memory_bus
from common.rpc import open_rpc_loop, serve_grpc
from common.ttlcache import TtlCache

__all__ = ["AggregatorAddresses", "serve_aggregator"]

#: Seconds between outbox-backlog samples for /metrics.
SAMPLE_S = 1.0


@dataclass(frozen=True, slots=True)
class AggregatorAddresses:
    grpc_port: int
    ops_url: str


@contextlib.asynccontextmanager
async def _bus(settings: AggregatorSettings, bus: EventBus | None) -> AsyncIterator[EventBus]:
    if bus is not None:
        yield bus
    elif settings.kafka.bootstrap_servers:
        async with open_kafka_bus(settings.kafka) as kafka:
            yield kafka
    else:
        async with open_memory_bus() as memory:
            yield memory


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

    async with open_rpc_loop(), _bus(settings, bus) as the_bus:
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
                config = Config()
                config.bind = [f"{settings.ops_host}:{settings.ops_port}"]
                config.accesslog = None
                config.graceful_timeout = settings.shutdown_grace_s
                binds = await servers.start(
                    partial(
                        hypercorn.trio.serve,
                        create_ops_app(ops),
                        config,
                        shutdown_trigger=stop_servers.wait,
                    )
                )
                task_status.started(AggregatorAddresses(grpc_port, binds[0]))
                await shutdown.wait()
                ops.draining = True
                stop_servers.set()
            workers.cancel_scope.cancel()
    await store.close()
