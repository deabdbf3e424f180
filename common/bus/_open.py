"""The bus a service runs on: a shared one, Kafka when configured, else the memory bus."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from common.bus._kafka import open_kafka_bus
from common.bus._memory import open_memory_bus
from common.bus._types import EventBus
from common.settings import KafkaSettings

__all__ = ["open_service_bus"]


@contextlib.asynccontextmanager
async def open_service_bus(
    kafka: KafkaSettings, shared: EventBus | None = None
) -> AsyncIterator[EventBus]:
    """``shared`` if given (left open); else Kafka when ``kafka.bootstrap_servers`` is set,
    else an in-process memory bus (both closed on exit)."""
    if shared is not None:
        yield shared
    elif kafka.bootstrap_servers:
        async with open_kafka_bus(kafka) as bus:
            yield bus
    else:
        async with open_memory_bus() as bus:
            yield bus
