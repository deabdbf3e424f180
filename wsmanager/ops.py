"""The WebSocket manager's ops face (its own plain-HTTP listener): ``/livez``, ``/readyz``,
``/metrics``. Labels are close codes and fixed names, never user ids."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from quart_trio import QuartTrio

from common.opsapp import create_ops_app as create_common_ops_app
from wsmanager.app import WsStatistics
from wsmanager.consumer import ConsumerStatistics
from wsmanager.hub import HubStatistics

__all__ = ["OpsState", "create_ops_app"]


@dataclass
class OpsState:
    hub: HubStatistics
    consumer: ConsumerStatistics
    sockets: WsStatistics
    bus_healthy: Callable[[], bool]
    keys_loaded: Callable[[], bool]
    serving: bool = False
    draining: bool = False

    def ready(self) -> tuple[bool, dict[str, bool]]:
        checks = {
            "serving": self.serving,
            "caught_up": self.consumer.caught_up,
            "keys_loaded": self.keys_loaded(),
            "bus_healthy": self.bus_healthy(),
            "not_draining": not self.draining,
        }
        return all(checks.values()), checks


class _Collector(Collector):
    def __init__(self, state: OpsState) -> None:
        self._state = state

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        hub, consumer, sockets = self._state.hub, self._state.consumer, self._state.sockets
        gauges = {
            "huleedu_wsmanager_connections": ("Open authenticated connections", hub.connections),
            "huleedu_wsmanager_users_connected": ("Users with a connection", hub.users_connected),
        }
        for name, (text, value) in gauges.items():
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], value)
            yield gauge
        counters = {
            "huleedu_wsmanager_events_dispatched": (
                "Events taken from Kafka",
                hub.events_dispatched,
            ),
            "huleedu_wsmanager_frames_queued": (
                "Event frames queued to connections",
                hub.frames_queued,
            ),
            "huleedu_wsmanager_slow_consumers": (
                "Connections closed as slow consumers",
                hub.slow_consumers,
            ),
            "huleedu_wsmanager_refused_user_cap": (
                "Connections refused: per-user cap",
                hub.refused_user_cap,
            ),
            "huleedu_wsmanager_refused_global_cap": (
                "Connections refused: global cap",
                hub.refused_global_cap,
            ),
            "huleedu_wsmanager_resumes_recovered": (
                "Resumes that replayed the gap",
                hub.resumes_recovered,
            ),
            "huleedu_wsmanager_resumes_not_recovered": (
                "Resumes told recovered:false",
                hub.resumes_not_recovered,
            ),
            "huleedu_wsmanager_records_unreadable": (
                "Notification records skipped",
                consumer.unreadable,
            ),
            "huleedu_wsmanager_handshakes": ("WebSocket handshakes", sockets.handshakes),
            "huleedu_wsmanager_refused_origin": (
                "Handshakes refused for their Origin",
                sockets.refused_origin,
            ),
            "huleedu_wsmanager_auth_failures": (
                "Sockets closed for failed authentication",
                sockets.auth_failures,
            ),
        }
        for name, (text, value) in counters.items():
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            yield counter
        closes = CounterMetricFamily(
            "huleedu_wsmanager_closes", "Connections closed, by close code", labels=["code"]
        )
        for code, count in sorted(sockets.closed.items()):
            closes.add_metric([str(code)], count)
        yield closes


def create_ops_app(state: OpsState) -> QuartTrio:
    return create_common_ops_app("wsmanager", state.ready, _Collector(state))
