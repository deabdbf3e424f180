"""Hypercorn in a Trio nursery serving HTTPS with the dev certificates, HTTP/2 and HTTP/1.1."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import httpx
import hypercorn.trio
import pytest
import trio
from hypercorn.config import Config
from quart import request
from quart_trio import QuartTrio

from common.tls import client_context, configure_hypercorn, ensure_dev_certificates

pytestmark = pytest.mark.slow


def _app() -> QuartTrio:
    app = QuartTrio(__name__)

    @app.route("/version")
    async def version() -> dict[str, str]:
        return {"http_version": request.http_version}

    return app


@pytest.mark.parametrize(("http2", "expected"), [(True, "HTTP/2"), (False, "HTTP/1.1")])
async def test_https_with_dev_certificates(tmp_path: Path, http2: bool, expected: str) -> None:
    certs = ensure_dev_certificates(tmp_path)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 2
    configure_hypercorn(certs.tls_settings(), config)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn.trio.serve, _app(), config, shutdown_trigger=stop.wait)
        )
        url = binds[0].replace("0.0.0.0", "127.0.0.1")
        assert url.startswith("https://")
        async with httpx.AsyncClient(verify=client_context(certs.ca_cert), http2=http2) as client:
            with trio.fail_after(10):
                response = await client.get(f"{url}/version")
        stop.set()
    assert response.status_code == 200
    assert response.http_version == expected
    assert response.json()["http_version"] == expected.removeprefix("HTTP/")
