"""The gateway's ops HTTP face (its own listener): ``/livez``, ``/readyz``, ``/metrics``.

Metrics carry route templates (``/v1/batches/<id>``), methods and status codes as labels; never
raw paths, user ids or addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector
from quart_trio import QuartTrio

from common.breaker import BreakerState
from common.opsapp import create_ops_app as create_common_ops_app
from common.ratelimit import GcraLimiter
from gateway.backends import Backend
from gateway.edge import EdgeStatistics

__all__ = ["OpsState", "create_ops_app"]


@dataclass
class OpsState:
    edge: EdgeStatistics
    limiters: dict[str, GcraLimiter]
    bus_healthy: Callable[[], bool]
    revoked_sessions: Callable[[], int]
    #: The backends behind the batch routes (their breakers and retry budgets).
    backends: tuple[Backend, ...] = ()
    revocations_consuming: bool = False
    serving: bool = False
    draining: bool = False

    def ready(self) -> tuple[bool, dict[str, bool]]:
        checks = {
            "serving": self.serving,
            "revocations_consuming": self.revocations_consuming,
            "bus_healthy": self.bus_healthy(),
            "not_draining": not self.draining,
        }
        return all(checks.values()), checks


class _Collector(Collector):
    def __init__(self, state: OpsState) -> None:
        self._state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        edge = self._state.edge
        labels = ["method", "route", "status"]
        requests = CounterMetricFamily(
            "huleedu_gateway_http_requests", "HTTP requests by route template", labels=labels
        )
        duration = HistogramMetricFamily(
            "huleedu_gateway_http_request_duration_seconds",
            "HTTP request duration by route template",
            labels=labels,
        )
        for key in sorted(edge.requests):
            method, route, status = key
            values = [method, route, str(status)]
            requests.add_metric(values, edge.requests[key])
            cumulative, buckets = 0, []
            for bound, count in zip(edge.BOUNDS, edge.buckets[key], strict=True):
                cumulative += count
                buckets.append((repr(bound), cumulative))
            buckets.append(("+Inf", edge.requests[key]))
            duration.add_metric(values, buckets, edge.seconds[key])
        yield requests
        yield duration
        in_flight = GaugeMetricFamily("huleedu_gateway_http_in_flight", "Requests in progress")
        in_flight.add_metric([], edge.in_flight)
        yield in_flight
        cut = CounterMetricFamily(
            "huleedu_gateway_http_bodies_cut", "Request bodies cut at the body-read deadline"
        )
        cut.add_metric([], edge.bodies_cut)
        yield cut
        decisions = CounterMetricFamily(
            "huleedu_gateway_ratelimit_decisions",
            "Rate-limit decisions by policy",
            labels=["policy", "result"],
        )
        for name, limiter in sorted(self._state.limiters.items()):
            stats = limiter.statistics()
            decisions.add_metric([name, "allowed"], stats.allowed)
            decisions.add_metric([name, "denied"], stats.denied)
        yield decisions
        revoked = GaugeMetricFamily(
            "huleedu_gateway_revoked_sessions", "Revoked sessions whose access tokens may live"
        )
        revoked.add_metric([], self._state.revoked_sessions())
        yield revoked
        state = GaugeMetricFamily(
            "huleedu_gateway_backend_breaker_state",
            "Circuit breaker state per backend (1 for the current state)",
            labels=["backend", "state"],
        )
        opened = CounterMetricFamily(
            "huleedu_gateway_backend_breaker_opened",
            "Times a backend's breaker opened",
            labels=["backend"],
        )
        calls = CounterMetricFamily(
            "huleedu_gateway_backend_calls", "Calls per backend", labels=["backend"]
        )
        for backend in self._state.backends:
            breaker = backend.breaker.statistics()
            for candidate in BreakerState:
                state.add_metric(
                    [backend.name, candidate.name.lower()],
                    1.0 if breaker.state is candidate else 0.0,
                )
            opened.add_metric([backend.name], breaker.times_opened)
            channel_stats = getattr(backend.channel, "statistics", None)
            if callable(channel_stats):
                calls.add_metric([backend.name], channel_stats().calls)
        yield state
        yield opened
        yield calls


def create_ops_app(state: OpsState) -> QuartTrio:
    return create_common_ops_app("gateway", state.ready, _Collector(state))
