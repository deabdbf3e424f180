"""``python -m gateway`` (also ``huleedu gateway``): run the API gateway.

Configured by environment (``HULEEDU_GATEWAY_*``). Prints one JSON line with the bound
addresses once ready. SIGTERM or SIGINT: readiness false, in-flight requests finish, exit 0.
"""

from __future__ import annotations

import sys
from functools import partial

from common.service import run_service, service_main
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
    return service_main("gateway", GatewaySettings, _run)


if __name__ == "__main__":
    sys.exit(main())
