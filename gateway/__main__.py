"""``python -m gateway`` (also ``huleedu gateway``): run the API gateway.

Configured by environment (``HULEEDU_GATEWAY_*``). Prints one JSON line with the bound
addresses once ready. SIGTERM or SIGINT: readiness false, in-flight requests finish, exit 0.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

from common.errors import ConfigurationError
from common.logs import configure_logging, get_logger
from common.service import run_service
from common.settings import load_settings, redacted
from common.tracing import setup_tracing
from gateway.serve import serve_gateway
from gateway.settings import GatewaySettings


async def _run(settings: GatewaySettings) -> None:
    provider = setup_tracing(
        settings.service_name, settings.otel_exporter_otlp_endpoint, set_global=True
    )
    await run_service(
        "gateway",
        partial(serve_gateway, settings, tracer_provider=provider),
        lambda addresses: {
            "url": addresses.url,
            "ops_url": addresses.ops_url,
            "ca_file": addresses.ca_file,
        },
    )


def main() -> int:
    try:
        settings = load_settings(GatewaySettings)
    except ConfigurationError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    configure_logging(service="gateway", level=settings.log_level, json=settings.log_json)
    get_logger("gateway").info("config", settings=redacted(settings))
    try:
        trio.run(_run, settings)
    except ConfigurationError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
