"""The one asyncio loop (trio-asyncio) that grpclib runs on inside a Trio program."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio_asyncio

__all__ = ["open_rpc_loop"]


@asynccontextmanager
async def open_rpc_loop() -> AsyncIterator[None]:
    """Run the block with an asyncio loop for gRPC; reuses one that is already open.

    Open it once near the top of a service (around everything that serves or calls gRPC).
    Note: importing trio_asyncio replaces asyncio's loop policy for the whole process; code
    that wants a private asyncio loop must build ``asyncio.SelectorEventLoop()`` itself.
    """
    if trio_asyncio.current_loop.get(None) is not None:
        yield
        return
    async with trio_asyncio.open_loop():
        yield
