"""gRPC from Trio: the only package that knows grpclib runs on asyncio (trio-asyncio).

::

    async with open_rpc_loop():
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_grpc, [MyResultService()]))
            async with open_channel(f"127.0.0.1:{port}", service="results") as channel:
                stub = channel.stub(results_v1.ResultServiceStub)
                with trio.fail_after(2):
                    reply = await channel.call(stub.get_batch, request, idempotent=True)
"""

from __future__ import annotations

from common.rpc._client import ClientStatistics, RpcChannel, StreamCall, open_channel
from common.rpc._loop import open_rpc_loop
from common.rpc._server import serve_grpc

__all__ = [
    "ClientStatistics",
    "RpcChannel",
    "StreamCall",
    "open_channel",
    "open_rpc_loop",
    "serve_grpc",
]
