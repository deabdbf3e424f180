"""``python -m aggregator`` (also ``huleedu aggregator``): run the result aggregator.

Configured by environment (``HULEEDU_AGGREGATOR_*``). Prints one JSON line with the bound
addresses once ready. SIGTERM or SIGINT: drain and exit 0.
"""

from __future__ import annotations

import sys
from functools import partial

from aggregator.serve import serve_aggregator
from aggregator.settings import AggregatorSettings
from common.service import run_service, service_main


async def _run(settings: AggregatorSettings) -> None:
    await run_service(
        "aggregator",
        partial(serve_aggregator, settings),
        lambda addresses: {"grpc_port": addresses.grpc_port, "ops_url": addresses.ops_url},
    )


def main() -> int:
    return service_main("aggregator", AggregatorSettings, _run)


if __name__ == "__main__":
    sys.exit(main())
