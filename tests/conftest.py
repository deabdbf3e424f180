"""Shared fixtures. Kafka tests read the broker address from ``KAFKA_BOOTSTRAP`` (``make test``
starts a real broker and sets it). Without a reachable broker they skip locally and *fail*
under ``CI=true``: a green CI must mean the Kafka suite really ran."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable

import pytest

_HOW = "start one with `deploy/kafka/broker.sh start` and set KAFKA_BOOTSTRAP=127.0.0.1:19092"


def _broker_answers(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    quiet = logging.getLogger("tests.kafka-probe")
    quiet.addHandler(logging.NullHandler())
    quiet.propagate = False
    admin = AdminClient({"bootstrap.servers": bootstrap, "logger": quiet})
    try:
        return bool(admin.list_topics(timeout=5).brokers)
    except Exception:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """The bootstrap address of the real Kafka broker the suite runs against."""
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP", "")
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    problem = (
        "KAFKA_BOOTSTRAP is not set"
        if not bootstrap
        else None
        if _broker_answers(bootstrap)
        else f"no Kafka broker answers at {bootstrap}"
    )
    if problem:
        if in_ci:
            pytest.fail(f"{problem} (CI=true: Kafka tests must run); {_HOW}", pytrace=False)
        pytest.skip(f"{problem}; {_HOW}")
    return bootstrap


@pytest.fixture
def unique() -> Callable[[str], str]:
    """``unique("orders")`` -> ``"orders-<hex>"``: topic and group names no other test uses."""
    suffix = uuid.uuid4().hex[:10]
    return lambda base: f"{base}-{suffix}"
