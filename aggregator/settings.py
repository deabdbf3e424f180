"""Aggregator settings (environment prefix ``HULEEDU_AGGREGATOR_``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import KafkaSettings, ServiceSettings

__all__ = ["AggregatorSettings"]


class AggregatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="HULEEDU_AGGREGATOR_", extra="forbid", frozen=True, env_nested_delimiter="__"
    )

    service_name: str = "aggregator"
    grpc_host: str = "127.0.0.1"
    #: 0 picks a free port (reported on start-up).
    grpc_port: int = Field(default=50061, ge=0, le=65535)
    ops_host: str = "127.0.0.1"
    ops_port: int = Field(default=9101, ge=0, le=65535)
    db_path: Path = Path(".state/aggregator.db")
    #: Empty bootstrap servers = the embedded in-memory bus (single process).
    kafka: KafkaSettings = KafkaSettings(client_id="aggregator")
    cache_ttl_s: float = Field(default=30.0, gt=0, le=3600)
    cache_max_entries: int = Field(default=10_000, ge=1, le=1_000_000)
