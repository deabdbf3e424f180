"""Gateway settings (environment prefix ``HULEEDU_GATEWAY_``).

Rate limits are per gateway instance (in-process GCRA): with N instances behind a load
balancer a client may get up to N times a limit. They are sized so that this stays harmless.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.ratelimit import RatePolicy
from common.settings import KafkaSettings, ServiceSettings, check_origins
from common.tls import TlsSettings
from gateway.backends import BackendSettings
from gateway.sniff import ALLOWED_TYPES

__all__ = ["DEFAULT_ROUTE_BUDGETS_S", "GatewaySettings", "LimitSettings"]


class LimitSettings(BaseModel):
    """One rate policy: ``limit`` requests per ``period_s`` seconds, bursts up to ``burst``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    limit: int = Field(ge=1, le=1_000_000)
    period_s: float = Field(gt=0, le=86_400)
    burst: int | None = Field(default=None, ge=1, le=1_000_000)

    def policy(self, name: str) -> RatePolicy:
        return RatePolicy(name, self.limit, self.period_s, self.burst)


#: Route id -> seconds the route may take, backend calls included.
DEFAULT_ROUTE_BUDGETS_S: dict[str, float] = {
    "register_batch": 5.0,
    "list_batches": 2.0,
    "get_batch": 2.0,
    "request_pipeline": 5.0,
    "list_files": 2.0,
    "batch_overview": 2.0,
    "dashboard": 2.0,
    "upload_files": 900.0,
}


class GatewaySettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HULEEDU_GATEWAY_", extra="forbid", frozen=True, env_nested_delimiter="__"
    )

    service_name: str = "gateway"
    host: str = "127.0.0.1"
    #: 0 picks a free port (reported on start-up).
    port: int = Field(default=8443, ge=0, le=65535)
    #: Seconds between readiness going false and the listeners closing on SIGTERM, so a load
    #: balancer stops sending new requests first (0 = close at once; in-flight ones finish).
    drain_delay_s: float = Field(default=0.0, ge=0, le=120)
    #: The ops listener (plain HTTP, keep it off the public network): /livez /readyz /metrics.
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=9100, ge=0, le=65535)
    #: Certificate and key of the HTTPS listener. Unset: dev certificates under ``state_dir``.
    tls: TlsSettings = TlsSettings()
    state_dir: Path = Path(".state")
    #: The session store (SQLite); relative paths are under ``state_dir``.
    db_path: Path = Path("gateway-sessions.db")
    #: Ed25519 signing keys (PEM, one per file, file stem = ``kid``); the newest file signs,
    #: the others stay in the JWKS so tokens they signed verify until they expire.
    #: Relative paths are under ``state_dir``; an empty folder gets a generated key.
    keys_dir: Path = Path("gateway-keys")
    #: ``host:port`` of the IdentityService.
    identity_target: str = "127.0.0.1:50051"
    identity_timeout_s: float = Field(default=3.0, gt=0, le=60)
    kafka: KafkaSettings = KafkaSettings(client_id="gateway")
    #: The backends behind the batch routes (``HULEEDU_GATEWAY_BATCH_BACKEND__TARGET`` etc.).
    batch_backend: BackendSettings = BackendSettings(target="127.0.0.1:50052")
    file_backend: BackendSettings = BackendSettings(target="127.0.0.1:50053")
    result_backend: BackendSettings = BackendSettings(target="127.0.0.1:50061")
    #: Seconds each route may take in all (the deadline of its backend calls), by route id;
    #: ids not given keep their defaults (:data:`DEFAULT_ROUTE_BUDGETS_S`).
    route_budgets_s: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_ROUTE_BUDGETS_S))

    issuer: str = "https://gateway.huleedu.local"
    audience: str = "huleedu"
    access_ttl_s: int = Field(default=900, ge=30, le=900)
    #: A refresh token unused this long expires (each refresh issues a new one).
    refresh_idle_s: int = Field(default=7 * 86_400, ge=60, le=90 * 86_400)
    #: No refresh extends a session past this age; the user logs in again.
    session_lifetime_s: int = Field(default=30 * 86_400, ge=300, le=365 * 86_400)
    #: Seconds between sweeps that forget sessions past their absolute lifetime.
    purge_interval_s: float = Field(default=3600.0, gt=0, le=86_400)
    ws_ticket_ttl_s: int = Field(default=30, ge=5, le=120)
    token_leeway_s: float = Field(default=30.0, ge=0, le=120)
    max_token_bytes: int = Field(default=4096, ge=512, le=16_384)

    #: Browser origins allowed by CORS (exact ``scheme://host[:port]``); empty = no CORS.
    cors_origins: tuple[str, ...] = ()
    #: Proxies (addresses or CIDR networks) whose ``X-Forwarded-For`` is believed.
    trusted_proxies: tuple[str, ...] = ()
    #: Largest request body accepted on JSON routes.
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=1 << 30)
    #: Seconds from the first body byte wait to the last; a slower body is cut (408).
    body_timeout_s: float = Field(default=10.0, gt=0, le=600)
    #: Largest total size of the request headers (names + values).
    max_header_bytes: int = Field(default=16_384, ge=1024, le=65_536)
    #: Seconds an idle keep-alive connection stays open; also cuts a trickle of headers.
    keep_alive_timeout_s: float = Field(default=5.0, gt=0, le=300)

    #: Uploads (``POST /v1/batches/{id}/files``): per file, per request, files per request.
    upload_max_file_bytes: int = Field(default=50 << 20, ge=1024, le=8 << 30)
    upload_max_total_bytes: int = Field(default=512 << 20, ge=1024, le=16 << 30)
    upload_max_files: int = Field(default=100, ge=1, le=1000)
    #: Media types accepted (each also checked against the file's first bytes).
    upload_allowed_types: tuple[str, ...] = (
        "text/plain",
        "application/pdf",
        "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    )
    #: Seconds an upload may send no byte before it is cut (408).
    upload_idle_timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: Bytes per chunk message forwarded to the file backend (its limit is 1 MiB).
    upload_chunk_bytes: int = Field(default=256 << 10, ge=4096, le=1 << 20)

    limit_user: LimitSettings = LimitSettings(limit=600, period_s=60, burst=100)
    limit_address: LimitSettings = LimitSettings(limit=300, period_s=60, burst=60)
    limit_login_address: LimitSettings = LimitSettings(limit=10, period_s=60, burst=5)
    limit_login_account: LimitSettings = LimitSettings(limit=5, period_s=300, burst=5)
    limit_refresh: LimitSettings = LimitSettings(limit=30, period_s=60, burst=10)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_origins(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for entry in value:
            ipaddress.ip_network(entry, strict=False)  # ValueError names the entry
        return value

    @field_validator("upload_allowed_types")
    @classmethod
    def _types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in value if t not in ALLOWED_TYPES]
        if unknown:
            known = ", ".join(sorted(ALLOWED_TYPES))
            raise ValueError(f"no content check for {unknown[0]!r}; types with one: {known}")
        if not value:
            raise ValueError("at least one type must be allowed")
        return value

    @field_validator("route_budgets_s")
    @classmethod
    def _budgets(cls, value: dict[str, float]) -> dict[str, float]:
        for route, seconds in value.items():
            if route not in DEFAULT_ROUTE_BUDGETS_S:
                known = ", ".join(sorted(DEFAULT_ROUTE_BUDGETS_S))
                raise ValueError(f"unknown route {route!r}; known: {known}")
            if not 0 < seconds <= 3600:
                raise ValueError(f"{route}: budget must be in (0, 3600] seconds, got {seconds}")
        return {**DEFAULT_ROUTE_BUDGETS_S, **value}

    def budget(self, route: str) -> float:
        return self.route_budgets_s[route]

    def under_state(self, path: Path) -> Path:
        return path if path.is_absolute() else self.state_dir / path
