"""WebSocket manager settings (environment prefix ``HULEEDU_WSMANAGER_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from common.settings import KafkaSettings, ServiceSettings, check_origins
from common.tls import TlsSettings

__all__ = ["WsManagerSettings"]


class WsManagerSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HULEEDU_WSMANAGER_", extra="forbid", frozen=True, env_nested_delimiter="__"
    )

    service_name: str = "wsmanager"
    host: str = "127.0.0.1"
    #: 0 picks a free port (reported on start-up).
    port: int = Field(default=8444, ge=0, le=65535)
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=9102, ge=0, le=65535)
    #: Certificate and key of the WSS listener. Unset: dev certificates under ``state_dir``.
    tls: TlsSettings = TlsSettings()
    state_dir: Path = Path(".state")
    kafka: KafkaSettings = KafkaSettings(client_id="wsmanager")

    #: Browser origins allowed to open a socket (exact ``scheme://host[:port]``).
    allowed_origins: tuple[str, ...] = ("https://localhost:5173", "https://127.0.0.1:5173")
    #: Whether a handshake without an ``Origin`` header (not a browser: CLIs, services) is
    #: allowed. Browsers always send one, so this cannot be used to bypass the allow-list.
    allow_missing_origin: bool = True

    #: The gateway's JWKS (tokens and tickets are verified against it) and its CA file.
    jwks_url: str = "https://127.0.0.1:8443/.well-known/jwks.json"
    jwks_ca_file: Path | None = None
    issuer: str = "https://gateway.huleedu.local"
    audience: str = "huleedu"
    token_leeway_s: float = Field(default=30.0, ge=0, le=120)

    #: Seconds a new socket has to authenticate (first frame or ticket).
    auth_timeout_s: float = Field(default=10.0, gt=0, le=120)
    #: Largest inbound frame (UTF-8 bytes); larger closes with 1009.
    max_frame_bytes: int = Field(default=64 * 1024, ge=1024, le=1 << 20)
    #: Inbound frames per connection: sustained rate and burst (more closes with 4029).
    inbound_rate_per_s: float = Field(default=10.0, gt=0, le=10_000)
    inbound_burst: int = Field(default=30, ge=1, le=100_000)
    #: Frames queued for one connection before it counts as a slow consumer (4009).
    send_queue_frames: int = Field(default=256, ge=1, le=100_000)
    max_connections_per_user: int = Field(default=5, ge=1, le=1000)
    max_connections: int = Field(default=20_000, ge=1, le=1_000_000)
    #: Server heartbeat: a ``ping`` frame this often; no ``pong`` within the timeout closes.
    ping_interval_s: float = Field(default=25.0, gt=0, le=600)
    pong_timeout_s: float = Field(default=10.0, gt=0, le=600)
    #: Events kept per user for resume after a reconnect.
    replay_events_per_user: int = Field(default=500, ge=0, le=100_000)
    #: Users with a replay buffer (least recently active forgotten first).
    replay_users: int = Field(default=100_000, ge=1, le=10_000_000)
    shutdown_grace_s: float = Field(default=5.0, ge=0, le=300)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_origins(value)

    def under_state(self, path: Path) -> Path:
        return path if path.is_absolute() else self.state_dir / path
