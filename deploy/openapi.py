"""Export the gateway's OpenAPI 3.1 document to ``gateway/openapi.json`` (``make openapi``).

``python -m deploy.openapi`` writes the file; ``--check`` exits 1 when the committed file
differs from what the app generates (the test suite runs the same comparison). The app is
assembled exactly as ``serve_gateway`` does it, with no listener and no backend connection.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from common.contracts.huleedu.identity import v1 as identity_v1
from common.errors import UnavailableError
from common.rpc import open_rpc_loop
from gateway.assemble import assemble
from gateway.keys import load_signing_keys
from gateway.openapi import openapi_document
from gateway.serve import open_backend_channels
from gateway.sessions import open_sqlite_session_store
from gateway.settings import GatewaySettings

__all__ = ["SPEC_PATH", "gateway_document", "main", "render"]

SPEC_PATH = Path(__file__).resolve().parents[1] / "gateway" / "openapi.json"


async def _no_identity(email: str, password: str) -> identity_v1.User:
    raise UnavailableError("not serving", service="identity")


async def _no_bus(topic: str, key: bytes, value: bytes, headers: Any) -> None:
    raise UnavailableError("not serving", service="bus")


async def gateway_document() -> dict[str, Any]:
    """The document of the gateway as ``serve_gateway`` assembles it."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = GatewaySettings(state_dir=Path(tmp))
        store = await open_sqlite_session_store(":memory:")
        try:
            async with open_rpc_loop(), open_backend_channels(settings, None) as backends:
                parts = assemble(
                    settings,
                    keys=load_signing_keys(Path(tmp) / "keys"),
                    store=store,
                    authenticate=_no_identity,
                    publish=_no_bus,
                    wall=lambda: 0.0,
                    backends=backends,
                )
                return openapi_document(parts.http.app)
        finally:
            await store.close()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.openapi", description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render(trio.run(gateway_document))
    if args.check:
        current = SPEC_PATH.read_text() if SPEC_PATH.exists() else ""
        if current != text:
            print(f"{SPEC_PATH} is stale: run `make openapi`", file=sys.stderr)
            return 1
        return 0
    SPEC_PATH.write_text(text)
    print(f"wrote {SPEC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
