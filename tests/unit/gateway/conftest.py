"""The gateway assembled in process over the real session store and sandbox identity
servicer, for tests on Trio's virtual clock (``autojump_clock``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from common.contracts.huleedu.identity import v1 as identity_v1
from common.revocations import trio_wall_clock
from deploy.sandbox.identity import DEMO_USERS, SandboxIdentity, ScryptParams
from gateway.assemble import Assembled, assemble
from gateway.keys import load_signing_keys
from gateway.sessions import open_sqlite_session_store
from gateway.settings import GatewaySettings

IDENTITY = SandboxIdentity(DEMO_USERS, scrypt=ScryptParams(n=2**4, r=1))


async def _authenticate(email: str, password: str) -> identity_v1.User:
    reply = await IDENTITY.authenticate(
        identity_v1.AuthenticateRequest(email=email, password=password)
    )
    assert reply.user is not None
    return reply.user


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[Any]:
    """``await make_gateway(backends=..., **settings)`` -> :class:`Assembled`, with
    ``.published`` events; ``backends``: a :class:`gateway.batches.BatchBackends` (none: the
    batch routes are not served)."""
    stores = []

    async def make(*, backends: Any = None, **over: Any) -> Assembled:
        settings = GatewaySettings(state_dir=tmp_path, **over)
        store = await open_sqlite_session_store(":memory:")
        stores.append(store)
        published: list[tuple[str, bytes]] = []

        async def publish(topic: str, key: bytes, value: bytes, headers: object) -> None:
            published.append((topic, key))

        parts = assemble(
            settings,
            keys=load_signing_keys(tmp_path / "keys"),
            store=store,
            authenticate=_authenticate,
            publish=publish,
            wall=trio_wall_clock(),
            backends=backends,
        )
        parts.http.app.config["published"] = published
        return parts

    yield make
    for store in stores:
        await store.close()
