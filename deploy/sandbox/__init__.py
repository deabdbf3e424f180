"""Sandbox backends: in-memory stand-ins for the real backends, served over real gRPC, for
development (the dev stack) and tests. Not for production: their users and data are fixed.

::

    async with open_rpc_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(serve_sandbox_identity)
        ...  # point the gateway's identity_target at f"127.0.0.1:{port}"
        sandbox = await nursery.start(partial(serve_sandbox_backends, bus=bus))
        ...  # BatchService and FileService on sandbox.port; the pipeline simulator runs there
"""

from __future__ import annotations

from deploy.sandbox.identity import (
    DEFAULT_SCRYPT,
    DEMO_USERS,
    MAX_CONCURRENT_HASHES,
    MAX_EMAIL_CHARS,
    MAX_PASSWORD_CHARS,
    DemoUser,
    IdentityStatistics,
    SandboxIdentity,
    ScryptParams,
    serve_sandbox_identity,
)
from deploy.sandbox.serve import SandboxBackends, SandboxSettings, serve_sandbox_backends

__all__ = [
    "DEFAULT_SCRYPT",
    "DEMO_USERS",
    "MAX_CONCURRENT_HASHES",
    "MAX_EMAIL_CHARS",
    "MAX_PASSWORD_CHARS",
    "DemoUser",
    "IdentityStatistics",
    "SandboxBackends",
    "SandboxIdentity",
    "SandboxSettings",
    "ScryptParams",
    "serve_sandbox_backends",
    "serve_sandbox_identity",
]
