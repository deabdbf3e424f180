"""``python -m wsmanager`` (also ``huleedu wsmanager``): run the WebSocket manager.

Configured by environment (``HULEEDU_WSMANAGER_*``). Prints one JSON line with the bound
addresses once ready. SIGTERM or SIGINT: readiness false, every socket closed with 1001,
exit 0.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

from common.errors import ConfigurationError, UnavailableError
from common.logs import configure_logging, get_logger
from common.service import run_service
from common.settings import load_settings, redacted
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
    try:
        settings = load_settings(WsManagerSettings)
    except ConfigurationError as exc:
        print(f"wsmanager: {exc}", file=sys.stderr)
        return 2
    configure_logging(service="wsmanager", level=settings.log_level, json=settings.log_json)
    get_logger("wsmanager").info("config", settings=redacted(settings))
    try:
        trio.run(_run, settings)
    except (ConfigurationError, UnavailableError) as exc:
        print(f"wsmanager: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
