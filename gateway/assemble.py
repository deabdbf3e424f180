"""Wiring the gateway's parts from settings (no I/O): what :func:`gateway.serve.serve_gateway`
runs, and what virtual-time tests drive in process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import trio
from opentelemetry.trace import TracerProvider

from common.revocations import Revocations
from common.tokens import TokenSigner, TokenVerifier, VerifierPolicy
from gateway.app import GatewayApp, RouteSet, create_app
from gateway.auth import Authenticator, AuthService, Publisher
from gateway.batches import BatchBackends, register_batch_routes
from gateway.edge import EdgeConfig
from gateway.keys import SigningKeys
from gateway.limits import ClientAddress, RateLimits
from gateway.sessions import SessionStore
from gateway.settings import GatewaySettings
from gateway.uploads import UploadLimits, is_upload, register_upload_routes

__all__ = ["Assembled", "assemble"]


@dataclass(frozen=True, slots=True)
class Assembled:
    http: GatewayApp
    auth: AuthService
    limits: RateLimits
    revocations: Revocations


def assemble(
    settings: GatewaySettings,
    *,
    keys: SigningKeys,
    store: SessionStore,
    authenticate: Authenticator,
    publish: Publisher,
    wall: Callable[[], float],
    now: Callable[[], float] = trio.current_time,
    tracer_provider: TracerProvider | None = None,
    backends: BatchBackends | None = None,
) -> Assembled:
    """``wall``: wall-clock seconds (token times); ``now``: monotonic seconds (rate limits);
    ``backends``: serve the batch routes against them (None: the auth routes only)."""
    policy = VerifierPolicy(
        issuer=settings.issuer,
        audience=settings.audience,
        leeway_s=settings.token_leeway_s,
        max_token_bytes=settings.max_token_bytes,
        max_lifetime_s=float(settings.access_ttl_s),
    )
    revocations = Revocations(wall)
    verifier = TokenVerifier(policy, keys.public, is_revoked=revocations.__contains__)

    def signer(ttl_s: int) -> TokenSigner:
        return TokenSigner(
            keys.private,
            keys.kid,
            issuer=settings.issuer,
            audience=settings.audience,
            ttl_s=ttl_s,
        )

    auth = AuthService(
        signer=signer(settings.access_ttl_s),
        ticket_signer=signer(settings.ws_ticket_ttl_s),
        verifier=verifier,
        store=store,
        authenticate=authenticate,
        publish=publish,
        revocations=revocations,
        wall=wall,
        access_ttl_s=settings.access_ttl_s,
        refresh_idle_s=settings.refresh_idle_s,
        session_lifetime_s=settings.session_lifetime_s,
        ticket_ttl_s=settings.ws_ticket_ttl_s,
    )
    limits = RateLimits(settings, now)
    edge = EdgeConfig(
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_credential_bytes=settings.max_token_bytes + len("Bearer "),
        cors_origins=frozenset(settings.cors_origins),
        client_address=ClientAddress(settings.trusted_proxies),
        streaming=lambda method, path: (
            (settings.upload_max_total_bytes, settings.upload_idle_timeout_s)
            if is_upload(method, path)
            else None
        ),
    )
    routes: list[RouteSet] = []
    if backends is not None:
        routes.append(partial(register_batch_routes, backends=backends, budget=settings.budget))
        routes.append(
            partial(
                register_upload_routes,
                backends=backends,
                budget=settings.budget,
                limits=UploadLimits(
                    max_file_bytes=settings.upload_max_file_bytes,
                    max_files=settings.upload_max_files,
                    max_total_bytes=settings.upload_max_total_bytes,
                    allowed_types=frozenset(settings.upload_allowed_types),
                    chunk_bytes=settings.upload_chunk_bytes,
                ),
            )
        )
    http = create_app(
        auth,
        limits,
        edge,
        jwks=keys.public.to_jwks,
        tracer_provider=tracer_provider,
        routes=routes,
    )
    return Assembled(http=http, auth=auth, limits=limits, revocations=revocations)
