"""Running the WebSocket manager: ``serve_wsmanager(settings, shutdown=...)``.

In one nursery: the gateway's JWKS (fetched before anything is served), the session.revoked
consumer (revoked sessions' sockets close with 4003 at once), the notification consumer (the
instance's own group, from the earliest record), the WSS listener and the ops listener.

Shutdown (``shutdown`` set, e.g. by SIGTERM): readiness goes false, every socket is closed
with 1001 (going away), the listeners stop and drain within ``shutdown_grace_s``, then the
consumers are cancelled.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio

from common import coalesce
from common.bus import EventBus, open_service_bus
from common.errors import WsCloseCode
from common.events import Topic
from common.httpserver import listener_config, serve_listener
from common.logs import get_logger
from common.revocations import Revocations, run_revocation_consumer, trio_wall_clock
from common.tls import TlsSettings, ensure_dev_certificates
from common.tokens import TokenVerifier, VerifierPolicy
from wsmanager.app import WsApp
from wsmanager.consumer import ConsumerStatistics, run_notification_consumer
from wsmanager.hub import Hub
from wsmanager.jwks import JwksCache
from wsmanager.ops import OpsState, create_ops_app
from wsmanager.settings import WsManagerSettings

__all__ = ["WsManagerAddresses", "serve_wsmanager"]

log = get_logger("wsmanager")
#: Longest a ticket may live (the gateway issues 30 s ones).
TICKET_MAX_LIFETIME_S = 120.0
#: Longest an access token lives (the gateway's limit).
ACCESS_MAX_LIFETIME_S = 900.0


@dataclass(frozen=True, slots=True)
class WsManagerAddresses:
    url: str  # wss://host:port
    ops_url: str
    ca_file: str | None
    instance_id: str


def _tls(settings: WsManagerSettings) -> tuple[TlsSettings, str | None]:
    if settings.tls.certfile is not None:
        return settings.tls, None
    dev = ensure_dev_certificates(settings.state_dir)
    return dev.tls_settings(), str(dev.ca_cert)


async def serve_wsmanager(
    settings: WsManagerSettings,
    *,
    shutdown: trio.Event,
    bus: EventBus | None = None,
    wall: Callable[[], float] | None = None,
    jwks: JwksCache | None = None,
    caught_up: trio.Event | None = None,
    task_status: trio.TaskStatus[WsManagerAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the WebSocket manager until ``shutdown`` is set; see the module docstring.

    ``bus``: share an open event bus; ``wall``: wall-clock seconds for token times (tests pin
    it); ``jwks``: a key source (default: the gateway's JWKS over HTTPS from settings);
    ``caught_up``: set once the notification topic has been read to its end (from then on the
    instance is ready and accepts sockets).
    """
    tls, ca_file = _tls(settings)
    wall = wall or trio_wall_clock()
    instance_id = uuid.uuid4().hex[:12]
    verifiers: list[TokenVerifier] = []

    def withdrawn(kids: frozenset[str]) -> None:
        # Cached verifications of tokens signed by a withdrawn key must not outlive it.
        log.warning("signing keys withdrawn", kids=sorted(kids))
        for verifier in verifiers:
            verifier.forget()

    keys = jwks or JwksCache.over_https(
        settings.jwks_url, ca_file=settings.jwks_ca_file, on_withdrawn=withdrawn
    )
    hub = Hub(
        max_connections=settings.max_connections,
        max_connections_per_user=settings.max_connections_per_user,
        replay_events_per_user=settings.replay_events_per_user,
        replay_users=settings.replay_users,
    )
    revocations = Revocations(wall)

    def verifier_for(typ: str, max_lifetime_s: float) -> TokenVerifier:
        policy = VerifierPolicy(
            issuer=settings.issuer,
            audience=settings.audience,
            leeway_s=settings.token_leeway_s,
            max_lifetime_s=max_lifetime_s,
            expected_typ=typ,
        )
        return TokenVerifier(policy, keys.keys, is_revoked=revocations.__contains__)

    verifier = verifier_for("access", ACCESS_MAX_LIFETIME_S)
    ticket_verifier = verifier_for("ws_ticket", TICKET_MAX_LIFETIME_S)
    verifiers += [verifier, ticket_verifier]
    consumer_stats = ConsumerStatistics()
    caught_up = trio.Event() if caught_up is None else caught_up
    going_away = trio.Event()
    stop_servers = trio.Event()

    async with open_service_bus(settings.kafka, bus) as the_bus, trio.open_nursery() as workers:
        await workers.start(keys.run)
        app = WsApp(
            settings,
            hub,
            verifier=verifier,
            ticket_verifier=ticket_verifier,
            refresh_keys=keys.on_unknown_kid,
            wall=wall,
            going_away=going_away,
            ready=caught_up.is_set,
        )
        ops = OpsState(
            hub=hub.stats,
            consumer=consumer_stats,
            sockets=app.stats,
            bus_healthy=lambda: the_bus.statistics().healthy,
            keys_loaded=lambda: bool(keys.keys.kids()),
        )

        def revoked(session_id: str) -> None:
            hub.close_session(session_id, WsCloseCode.SESSION_REVOKED, "session revoked")

        await the_bus.ensure_topics([Topic.SESSION_REVOKED, Topic.TEACHER_NOTIFICATION])
        await workers.start(
            partial(
                run_revocation_consumer,
                lambda: the_bus.subscribe(
                    [Topic.SESSION_REVOKED], f"{settings.service_name}-revocations-{instance_id}"
                ),
                revocations,
                wall=wall,
                fallback_ttl_s=ACCESS_MAX_LIFETIME_S + settings.token_leeway_s,
                on_revoked=revoked,
            )
        )
        await workers.start(
            partial(
                run_notification_consumer,
                the_bus,
                hub,
                group=f"{settings.service_name}-{instance_id}",
                stats=consumer_stats,
                caught_up=caught_up,
            )
        )
        async with trio.open_nursery() as servers:
            grace = settings.shutdown_grace_s
            config = listener_config(settings.host, settings.port, grace_s=grace, tls=tls)
            config.alpn_protocols = ["http/1.1"]  # WebSocket over HTTP/1.1 upgrade
            config.websocket_max_message_size = settings.max_frame_bytes
            config.include_server_header = False
            # Frames queued for a socket at one writer wakeup leave in one TLS write.
            coalesce.enable(config)
            https_url: str = await servers.start(
                partial(serve_listener, app, config, shutdown_trigger=stop_servers.wait)
            )
            ops_url: str = await servers.start(
                partial(
                    serve_listener,
                    create_ops_app(ops),
                    listener_config(settings.ops_host, settings.ops_port, grace_s=grace),
                    shutdown_trigger=stop_servers.wait,
                )
            )
            ops.serving = True
            url = https_url.replace("https://", "wss://")
            addresses = WsManagerAddresses(url, ops_url, ca_file, instance_id)
            log.info("wsmanager ready", url=url, ops_url=addresses.ops_url)
            task_status.started(addresses)
            await shutdown.wait()
            ops.draining = True
            going_away.set()
            hub.close_all(WsCloseCode.GOING_AWAY, "server shutting down")
            stop_servers.set()
        workers.cancel_scope.cancel()
