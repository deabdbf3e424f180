"""The ops face every service has on its own plain-HTTP listener: ``/livez``, ``/readyz``
(200 or 503 with the named checks) and ``/metrics`` (Prometheus text from one collector)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from quart import Response
from quart_trio import QuartTrio

__all__ = ["create_ops_app"]


def create_ops_app(
    service: str, ready: Callable[[], tuple[bool, dict[str, bool]]], collector: Collector
) -> QuartTrio:
    app = QuartTrio(f"{service}-ops")
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)

    @app.route("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.route("/readyz")
    async def readyz() -> tuple[dict[str, object], int]:
        is_ready, checks = ready()
        return {"ready": is_ready, "checks": checks}, 200 if is_ready else 503

    @app.route("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), content_type="text/plain; version=0.0.4")

    return app
