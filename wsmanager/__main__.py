"""``python -m wsmanager`` (also ``huleedu wsmanager``): run the WebSocket manager.

Configured by environment (``HULEEDU_WSMANAGER_*``). Prints one JSON line with the bound
addresses once ready. SIGTERM or SIGINT: readiness false, every socket closed with 1001,
exit 0.
"""

from __future__ import annotations

import sys
from functools import partial

from common.service import run_service, service_main
from wsmanager.serve import serve_wsmanager
from wsmanager.settings import WsManagerSettings


async def _run(settings: WsManagerSettings) -> None:
    await run_service(
        "wsmanager",
        partial(serve_wsmanager, settings),
        lambda addresses: {
            "url": addresses.url,
            "ops_url": addresses.ops_url,
            "ca_file": addresses.ca_file,
        },
    )


def main() -> int:
    return service_main("wsmanager", WsManagerSettings, _run)


if __name__ == "__main__":
    sys.exit(main())
