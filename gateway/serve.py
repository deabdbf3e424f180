"""``serve_gateway``: the whole gateway in one nursery.

HTTPS listener (Hypercorn, HTTP/1.1 and HTTP/2 over TLS) + ops listener + the revocation
consumer (its own consumer group: every instance reads every ``session.revoked``) + the
IdentityService channel. Shutdown (``shutdown`` set, e.g. by SIGTERM): readiness goes false,
both listeners stop accepting and let in-flight requests finish (``shutdown_grace_s``), then the
consumer is cancelled and the session store closed.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio
from opentelemetry.trace import TracerProvider

from common.bus import EventBus, Headers, Subscription, open_service_bus
from common.contracts.huleedu.batches import v1 as batches_v1
from common.contracts.huleedu.files import v1 as files_v1
from common.contracts.huleedu.identity import v1 as identity_v1
from common.contracts.huleedu.results import v1 as results_v1
from common.errors import DeadlineExceededError, StorageError
from common.events import Topic
from common.httpserver import listener_config, refuse_h2c_upgrade, serve_listener
from common.logs import get_logger
from common.revocations import run_revocation_consumer, trio_wall_clock
from common.rpc import RpcChannel, open_channel, open_rpc_loop
from common.tls import TlsSettings, ensure_dev_certificates
from common.tracing import inject_kafka_headers
from gateway.assemble import assemble
from gateway.auth import rebuild_revocations
from gateway.backends import Backend, BackendSettings
from gateway.batches import BatchBackends
from gateway.keys import load_signing_keys
from gateway.ops import OpsState, create_ops_app
from gateway.sessions import open_sqlite_session_store
from gateway.settings import GatewaySettings

__all__ = ["GatewayAddresses", "open_backend_channels", "serve_gateway"]

log = get_logger("gateway")

#: Bytes of request head the HTTP server buffers at most (HTTP/1.1 and HTTP/2 alike).
TRANSPORT_HEADER_LIMIT = 65_536


@dataclass(frozen=True, slots=True)
class GatewayAddresses:
    url: str
    ops_url: str
    #: The CA that signed the server certificate when dev certificates are in use.
    ca_file: str | None
    instance_id: str


def _identity_client(channel: RpcChannel, timeout_s: float):  # type: ignore[no-untyped-def]
    stub = channel.stub(identity_v1.IdentityServiceStub)

    async def authenticate(email: str, password: str) -> identity_v1.User:
        with trio.move_on_after(timeout_s) as scope:
            reply = await channel.call(
                stub.authenticate, identity_v1.AuthenticateRequest(email=email, password=password)
            )
            if reply.user is None:
                raise DeadlineExceededError("identity: empty reply", service="identity")
            return reply.user
        assert scope.cancelled_caught
        raise DeadlineExceededError("identity: no answer in time", service="identity")

    return authenticate


def _tls(settings: GatewaySettings) -> tuple[TlsSettings, str | None]:
    if settings.tls.certfile is not None:
        return settings.tls, None
    dev = ensure_dev_certificates(settings.state_dir)
    return dev.tls_settings(), str(dev.ca_cert)


@contextlib.asynccontextmanager
async def open_backend_channels(
    settings: GatewaySettings, tracer_provider: TracerProvider | None
) -> AsyncIterator[BatchBackends]:
    """One channel (and breaker, retry budget) per backend of the batch routes."""

    def channel(name: str, backend: BackendSettings) -> Any:
        return open_channel(
            backend.target,
            service=name,
            default_timeout_s=backend.default_timeout_s,
            tracer_provider=tracer_provider,
        )

    async with (
        channel("batches", settings.batch_backend) as batches,
        channel("files", settings.file_backend) as files,
        channel("results", settings.result_backend) as results,
    ):
        yield BatchBackends(
            batches=Backend("batches", batches, settings.batch_backend),
            batch_stub=batches.stub(batches_v1.BatchServiceStub),
            files=Backend("files", files, settings.file_backend),
            file_stub=files.stub(files_v1.FileServiceStub),
            file_channel=files,
            results=Backend("results", results, settings.result_backend),
            result_stub=results.stub(results_v1.ResultServiceStub),
        )


async def serve_gateway(
    settings: GatewaySettings,
    *,
    shutdown: trio.Event,
    bus: EventBus | None = None,
    wall: Callable[[], float] | None = None,
    tracer_provider: TracerProvider | None = None,
    task_status: trio.TaskStatus[GatewayAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until ``shutdown`` is set; see the module docstring.

    ``bus``: share an open event bus (else one is opened from settings); ``wall``: the
    wall-clock function for token times (tests pin it; default follows the Trio clock).
    """
    refuse_h2c_upgrade()
    tls, ca_file = _tls(settings)
    keys = load_signing_keys(settings.under_state(settings.keys_dir))
    wall = wall or trio_wall_clock()
    store = await open_sqlite_session_store(settings.under_state(settings.db_path))
    instance_id = uuid.uuid4().hex[:12]
    horizon = settings.access_ttl_s + settings.token_leeway_s
    stop_servers = trio.Event()
    try:
        async with (
            open_rpc_loop(),
            open_service_bus(settings.kafka, bus) as the_bus,
            open_channel(
                settings.identity_target,
                service="identity",
                default_timeout_s=settings.identity_timeout_s,
                tracer_provider=tracer_provider,
            ) as identity,
            open_backend_channels(settings, tracer_provider) as backends,
        ):

            async def publish(topic: str, key: bytes, value: bytes, headers: Headers) -> object:
                traced = inject_kafka_headers(list(headers))
                return await the_bus.publish(topic, value, key=key, headers=traced)

            parts = assemble(
                settings,
                keys=keys,
                store=store,
                authenticate=_identity_client(identity, settings.identity_timeout_s),
                publish=publish,
                wall=wall,
                tracer_provider=tracer_provider,
                backends=backends,
            )
            gateway, revocations = parts.http, parts.revocations
            await rebuild_revocations(store, revocations, wall=wall, horizon_s=horizon)
            ops = OpsState(
                edge=gateway.stats,
                limiters=parts.limits.all(),
                bus_healthy=lambda: the_bus.statistics().healthy,
                revoked_sessions=lambda: len(revocations),
                backends=(backends.batches, backends.files, backends.results),
            )

            def subscribe() -> contextlib.AbstractAsyncContextManager[Subscription]:
                return the_bus.subscribe(
                    [Topic.SESSION_REVOKED], f"{settings.service_name}-revocations-{instance_id}"
                )

            await the_bus.ensure_topics([Topic.SESSION_REVOKED])
            async with trio.open_nursery() as workers:
                await workers.start(
                    partial(
                        run_revocation_consumer,
                        subscribe,
                        revocations,
                        wall=wall,
                        fallback_ttl_s=horizon,
                    )
                )
                ops.revocations_consuming = True

                async def purge() -> None:
                    while True:
                        try:
                            forgotten = await store.purge(wall())
                        except StorageError as exc:  # try again next round
                            log.warning("session purge failed", reason=exc.message)
                        else:
                            if forgotten:
                                log.info("expired sessions forgotten", count=forgotten)
                        await trio.sleep(settings.purge_interval_s)

                workers.start_soon(purge)
                async with trio.open_nursery() as servers:
                    grace = settings.shutdown_grace_s
                    config = listener_config(settings.host, settings.port, grace_s=grace, tls=tls)
                    config.keep_alive_timeout = settings.keep_alive_timeout_s
                    # The transport's ceiling for a request head, the same for HTTP/1.1 and
                    # HTTP/2 (h2's header-list limit); the edge enforces max_header_bytes
                    # below it with a problem document, and treats an oversized
                    # Authorization value as an invalid token (401).
                    config.h11_max_incomplete_size = TRANSPORT_HEADER_LIMIT
                    config.h2_max_header_list_size = TRANSPORT_HEADER_LIMIT
                    config.h2_max_concurrent_streams = 100
                    config.include_server_header = False
                    ops_config = listener_config(
                        settings.ops_host, settings.ops_port, grace_s=grace
                    )
                    url: str = await servers.start(
                        partial(
                            serve_listener, gateway.app, config, shutdown_trigger=stop_servers.wait
                        )
                    )
                    ops_url: str = await servers.start(
                        partial(
                            serve_listener,
                            create_ops_app(ops),
                            ops_config,
                            shutdown_trigger=stop_servers.wait,
                        )
                    )
                    ops.serving = True
                    addresses = GatewayAddresses(url, ops_url, ca_file, instance_id)
                    log.info("gateway ready", url=addresses.url, ops_url=addresses.ops_url)
                    task_status.started(addresses)
                    await shutdown.wait()
                    ops.draining = True
                    log.info("draining", delay_s=settings.drain_delay_s)
                    await trio.sleep(settings.drain_delay_s)
                    stop_servers.set()
                workers.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.close()
