"""The aggregator's ops HTTP face: ``/livez``, ``/readyz``, ``/metrics`` (Prometheus)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from quart_trio import QuartTrio

from aggregator.consumer import ConsumerStatistics
from common.opsapp import create_ops_app as create_common_ops_app
from common.ttlcache import CacheStatistics

__all__ = ["OpsState", "create_ops_app"]


@dataclass
class OpsState:
    consumer: ConsumerStatistics
    cache: Callable[[], CacheStatistics]
    bus_healthy: Callable[[], bool]
    #: Refreshed by the service's sampler task (reading it needs the store thread).
    outbox_backlog: int = 0
    store_open: bool = True
    draining: bool = False

    def ready(self) -> tuple[bool, dict[str, bool]]:
        checks = {
            "store_open": self.store_open,
            "consumer_started": self.consumer.ready,
            "bus_healthy": self.bus_healthy(),
            "not_draining": not self.draining,
        }
        return all(checks.values()), checks


class _Collector(Collector):
    def __init__(self, state: OpsState) -> None:
        self._state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        records = CounterMetricFamily(
            "huleedu_aggregator_records",
            "Records consumed, by topic and result",
            labels=["topic", "result"],
        )
        for (topic, result), count in sorted(self._state.consumer.by_topic.items()):
            records.add_metric([topic, result], count)
        yield records
        dlq = CounterMetricFamily("huleedu_aggregator_dlq_records", "Records sent to the DLQ")
        dlq.add_metric(
            [], sum(c for (_, r), c in self._state.consumer.by_topic.items() if r == "poison")
        )
        yield dlq
        cache = self._state.cache()
        hits = CounterMetricFamily("huleedu_aggregator_cache_hits", "Query cache hits")
        hits.add_metric([], cache.hits)
        yield hits
        misses = CounterMetricFamily("huleedu_aggregator_cache_misses", "Query cache misses")
        misses.add_metric([], cache.misses)
        yield misses
        backlog = GaugeMetricFamily(
            "huleedu_aggregator_outbox_backlog", "Outbox rows not yet published"
        )
        backlog.add_metric([], self._state.outbox_backlog)
        yield backlog
        lag = GaugeMetricFamily(
            "huleedu_aggregator_consumer_lag_records",
            "Records behind the end of the log, by topic",
            labels=["topic"],
        )
        by_topic: dict[str, int] = {}
        for tp, behind in self._state.consumer.lag.items():
            by_topic[tp.topic] = by_topic.get(tp.topic, 0) + behind
        for topic, behind in sorted(by_topic.items()):
            lag.add_metric([topic], behind)
        yield lag
        assigned = GaugeMetricFamily(
            "huleedu_aggregator_assigned_partitions", "Partitions this consumer holds"
        )
        assigned.add_metric([], len(self._state.consumer.assigned))
        yield assigned


def create_ops_app(state: OpsState) -> QuartTrio:
    return create_common_ops_app("aggregator", state.ready, _Collector(state))
