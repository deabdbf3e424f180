"""``python -m aggregator`` (also ``huleedu aggregator``): run the result aggregator.

Configured by environment (``HULEEDU_AGGREGATOR_*``). Prints one JSON line with the bound
addresses once ready. SIGTERM or SIGINT: drain and exit 0.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

from aggregator.serve import serve_aggregator
from aggregator.settings import AggregatorSettings
from common.errors import ConfigurationError
from common.logs import configure_logging, get_logger
from common.service import run_service
from common.settings import load_settings, redacted


async def _run(settings: AggregatorSettings) -> None:
    await run_service(
        "aggregator",
        partial(serve_aggregator, settings),
        lambda addresses: {"grpc_port": addresses.grpc_port, "ops_url": addresses.ops_url},
    )


def main() -> int:
    try:
        settings = load_settings(AggregatorSettings)
    except ConfigurationError as exc:
        print(f"aggregator: {exc}", file=sys.stderr)
        return 2
    configure_logging(service="aggregator", level=settings.log_level, json=settings.log_json)
    get_logger("aggregator").info("config", settings=redacted(settings))
    trio.run(_run, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
