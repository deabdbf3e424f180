"""Typed settings shared by every service.

Each service subclasses :class:`ServiceSettings` with its own env prefix
(``HULEEDU_GATEWAY_``, ``HULEEDU_WSMANAGER_``, ``HULEEDU_AGGREGATOR_``). Secrets are
``SecretStr``; durations carry their unit in the name (``_s``, ``_ms``). Settings are built
once at start-up with :func:`load_settings` (which turns pydantic's error into a
:class:`~common.errors.ConfigurationError` naming the variable) and passed explicitly.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import pydantic
from pydantic import Field, SecretBytes, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.errors import ConfigurationError

__all__ = ["KafkaSettings", "ServiceSettings", "check_origins", "load_settings", "redacted"]

S = TypeVar("S", bound=BaseSettings)


class ServiceSettings(BaseSettings):
    """Fields every service has. Subclasses set ``model_config`` with their ``env_prefix``."""

    model_config = SettingsConfigDict(
        env_prefix="HULEEDU_",
        extra="forbid",
        frozen=True,
        env_nested_delimiter="__",
    )

    service_name: str = Field(default="huleedu", min_length=1)
    environment: Literal["dev", "test", "prod"] = "dev"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = True
    #: OTLP/HTTP traces endpoint, e.g. ``http://127.0.0.1:4318/v1/traces``; empty = no export.
    otel_exporter_otlp_endpoint: str = ""
    #: Seconds in-flight work may take to finish after SIGTERM before it is cancelled.
    shutdown_grace_s: float = Field(default=10.0, gt=0, le=300)


class KafkaSettings(pydantic.BaseModel):
    """Connection to a Kafka cluster (``bootstrap_servers`` empty = use the in-memory bus)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    bootstrap_servers: str = ""
    client_id: str = "huleedu"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    #: Milliseconds the producer keeps retrying one record before it reports failure.
    delivery_timeout_ms: int = Field(default=30_000, ge=1_000, le=600_000)
    #: Records per consume() hop into Trio; bounds one hop's memory (N x max record size).
    consume_batch_max: int = Field(default=500, ge=1, le=10_000)
    #: Milliseconds the producer waits to batch records (latency vs. throughput).
    linger_ms: int = Field(default=1, ge=0, le=1_000)
    #: Milliseconds without heartbeats before the group declares a consumer dead.
    session_timeout_ms: int = Field(default=10_000, ge=3_000, le=300_000)
    #: Seconds one consume() hop may block; also bounds how long cancellation takes.
    consume_timeout_s: float = Field(default=0.2, gt=0, le=5)


def load_settings(cls: type[S], **overrides: Any) -> S:
    """Build settings from the environment (plus ``overrides``), naming any bad variable."""
    try:
        return cls(**overrides)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        prefix = str(cls.model_config.get("env_prefix", ""))
        env_name = (prefix + loc.replace(".", "__")).upper()
        raise ConfigurationError(
            f"invalid setting {loc} (environment variable {env_name}): {first['msg']}",
            field=loc,
        ) from None


def redacted(settings: pydantic.BaseModel) -> dict[str, Any]:
    """A loggable dump of ``settings``: secrets replaced with ``'**********'``."""

    def walk(value: Any) -> Any:
        if isinstance(value, SecretStr | SecretBytes):
            return "**********" if value.get_secret_value() else ""
        if isinstance(value, pydantic.BaseModel):
            return {k: walk(getattr(value, k)) for k in type(value).model_fields}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [walk(v) for v in value]
        return value

    result: dict[str, Any] = walk(settings)
    return result


def check_origins(value: tuple[str, ...]) -> tuple[str, ...]:
    """Validate browser origins (exact ``scheme://host[:port]``, http or https, no path)."""
    for origin in value:
        scheme, sep, rest = origin.partition("://")
        if scheme not in ("https", "http") or not sep or not rest or "/" in rest:
            raise ValueError(f"not an origin (scheme://host[:port]): {origin!r}")
    return value
