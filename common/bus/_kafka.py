"""KafkaBus: the event bus on a real Kafka cluster (confluent-kafka driven from Trio).

Producer: idempotent, ``acks=all``, Java-compatible ``murmur2_random`` partitioner (so keys
land where the memory bus and Java producers put them). ``produce()`` is called from Trio
directly (it never blocks); one background task serves delivery reports with
``to_thread.run_sync(producer.poll, 0.1)`` and hands each result back to the waiting publisher.

Consumer: one confluent-kafka consumer per subscription, owned by the task that calls
``get_batch``/``commit``; every call into it goes through ``to_thread.run_sync`` one at a time
(never abandoned on cancel, so no thread can be left holding records). We do not add a Trio
channel in front of it: librdkafka already prefetches into its own bounded queue
(``queued.max.messages.kbytes``), and a second buffer would only add a hop and a window in
which records of revoked partitions could be handed out. Cancellation is bounded by
``consume_timeout_s``. Rebalance callbacks run inside ``consume()`` on the worker thread and
reach the async ``on_assign``/``on_revoke`` through ``trio.from_thread.run``. Offsets are
committed only explicitly, synchronously, and never backwards.

librdkafka's own log lines are routed into Python logging (logger ``rdkafka``); broker
failures reported through ``error_cb`` mark the bus unhealthy in :meth:`KafkaBus.statistics`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka import TopicPartition as KafkaTopicPartition
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from common.bus._types import (
    BusStatistics,
    Headers,
    OnAssign,
    OnRevoke,
    Record,
    RecordMetadata,
    TopicPartition,
    commit_positions,
)
from common.errors import BusError, PublishError, ValidationError
from common.settings import KafkaSettings

__all__ = ["KafkaBus", "open_kafka_bus"]

_rdkafka_log = logging.getLogger("rdkafka")
log = logging.getLogger(__name__)

#: Seconds the producer's poll task blocks per hop; bounds how late a delivery report is seen.
PRODUCER_POLL_S = 0.1
#: Seconds close() may spend flushing undelivered records before giving up.
FLUSH_TIMEOUT_S = 10.0
#: Seconds one admin request may take.
ADMIN_TIMEOUT_S = 15.0
#: Seconds between consumer-lag samples (taken on the consumer's thread, from its cache).
LAG_SAMPLE_S = 1.0
#: Back-off when librdkafka's local queue is full (``BufferError``).
QUEUE_FULL_BACKOFF_S = 0.01


def _common_config(settings: KafkaSettings) -> dict[str, Any]:
    if not settings.bootstrap_servers:
        raise ValidationError("KafkaBus needs bootstrap_servers", field="kafka.bootstrap_servers")
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "client.id": settings.client_id,
        "security.protocol": settings.security_protocol,
        "logger": _rdkafka_log,
    }
    if settings.sasl_mechanism:
        config["sasl.mechanism"] = settings.sasl_mechanism
        config["sasl.username"] = settings.sasl_username
        config["sasl.password"] = settings.sasl_password.get_secret_value()
    return config


class _Delivery:
    __slots__ = ("done", "error", "metadata")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.metadata: RecordMetadata | None = None
        self.error: str | None = None


class KafkaBus:
    """:class:`~common.bus.EventBus` on Kafka. Create with :func:`open_kafka_bus`."""

    def __init__(self, settings: KafkaSettings, token: trio.lowlevel.TrioToken) -> None:
        self._settings = settings
        self._token = token
        self._config = _common_config(settings)
        self._producer = Producer(
            {
                **self._config,
                "enable.idempotence": True,
                "acks": "all",
                "delivery.timeout.ms": settings.delivery_timeout_ms,
                "linger.ms": settings.linger_ms,
                "partitioner": "murmur2_random",
                "error_cb": self._error_from_thread,
            }
        )
        self._admin = AdminClient(dict(self._config))
        self._published = 0
        self._publish_failures = 0
        self._consumed = 0
        self._committed = 0
        self._healthy = True
        self._last_error: str | None = None

    # -- health -----------------------------------------------------------------------------

    def _in_trio(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the Trio thread, from whatever thread librdkafka called us on."""
        if trio.lowlevel.in_trio_run():
            fn()
        else:
            # After the run ended there is nobody left to tell.
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(fn, trio_token=self._token)

    def _error_from_thread(self, err: KafkaError) -> None:
        text = f"{err.name()}: {err.str()}"
        fatal = err.fatal() or err.code() in (
            KafkaError._ALL_BROKERS_DOWN,
            KafkaError._TRANSPORT,
            KafkaError._AUTHENTICATION,
        )

        def record() -> None:
            self._last_error = text
            if fatal:
                self._healthy = False

        self._in_trio(record)

    def _mark_healthy(self) -> None:
        self._healthy = True

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            published=self._published,
            publish_failures=self._publish_failures,
            consumed=self._consumed,
            committed=self._committed,
            healthy=self._healthy,
            last_error=self._last_error,
        )

    # -- producing --------------------------------------------------------------------------

    async def serve_delivery_reports(self) -> None:
        """Poll the producer forever; run in the bus's nursery (done by open_kafka_bus)."""
        while True:
            await trio.to_thread.run_sync(self._producer.poll, PRODUCER_POLL_S)

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: Headers) -> _Delivery:
        delivery = _Delivery()

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            def settle() -> None:
                if err is not None:
                    delivery.error = f"{err.name()}: {err.str()}"
                    self._publish_failures += 1
                else:
                    delivery.metadata = RecordMetadata(
                        msg.topic() or topic, msg.partition() or 0, msg.offset() or 0
                    )
                    self._published += 1
                    self._healthy = True
                delivery.done.set()

            self._in_trio(settle)

        self._producer.produce(
            topic, value=value, key=key, headers=list(headers), on_delivery=on_delivery
        )
        return delivery

    async def _produce_with_backoff(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers
    ) -> _Delivery:
        give_up = trio.current_time() + self._settings.delivery_timeout_ms / 1000
        while True:
            try:
                return self._produce(topic, key, value, headers)
            except BufferError:
                if trio.current_time() >= give_up:
                    self._publish_failures += 1
                    raise PublishError(
                        f"{topic}: local producer queue stayed full", service="kafka"
                    ) from None
                await trio.sleep(QUEUE_FULL_BACKOFF_S)
            except KafkaException as exc:
                self._publish_failures += 1
                raise PublishError(f"{topic}: {exc}", service="kafka") from None

    @staticmethod
    async def _settled(topic: str, delivery: _Delivery) -> RecordMetadata:
        await delivery.done.wait()
        if delivery.metadata is None:
            raise PublishError(f"{topic}: not acknowledged: {delivery.error}", service="kafka")
        return delivery.metadata

    async def publish(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> RecordMetadata:
        delivery = await self._produce_with_backoff(topic, key, value, headers)
        return await self._settled(topic, delivery)

    async def publish_many(
        self, records: Sequence[tuple[str, bytes | None, bytes, Headers]]
    ) -> list[RecordMetadata]:
        pending = [
            (topic, await self._produce_with_backoff(topic, key, value, headers))
            for topic, key, value, headers in records
        ]
        return [await self._settled(topic, delivery) for topic, delivery in pending]

    async def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> int:
        """Wait for outstanding deliveries; returns how many are still undelivered."""
        left: int = await trio.to_thread.run_sync(self._producer.flush, timeout_s)
        return left

    # -- admin ------------------------------------------------------------------------------

    async def ensure_topics(self, names: Sequence[str], partitions: int = 3) -> None:
        """Create missing topics (replication factor 1 per broker count is the caller's
        cluster concern; here -1 = the broker default) and wait until they exist."""
        futures = self._admin.create_topics(
            [NewTopic(name, num_partitions=partitions) for name in names],
            request_timeout=ADMIN_TIMEOUT_S,
        )
        for name, future in futures.items():
            try:
                await trio.to_thread.run_sync(future.result, ADMIN_TIMEOUT_S)
            except KafkaException as exc:
                err = exc.args[0]
                if err.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise BusError(f"creating topic {name}: {err.str()}", service="kafka") from None

    # -- consuming --------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self,
        topics: Sequence[str],
        group: str,
        *,
        on_assign: OnAssign | None = None,
        on_revoke: OnRevoke | None = None,
    ) -> AsyncIterator[_KafkaSubscription]:
        if not topics:
            raise ValidationError("subscribe needs at least one topic", field="topics")
        consumer = Consumer(
            {
                **self._config,
                "group.id": group,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "session.timeout.ms": self._settings.session_timeout_ms,
                "heartbeat.interval.ms": max(500, self._settings.session_timeout_ms // 6),
                "partition.assignment.strategy": "range",
                "error_cb": self._error_from_thread,
            }
        )
        sub = _KafkaSubscription(self, consumer, on_assign, on_revoke)
        try:
            await trio.to_thread.run_sync(sub.subscribe_blocking, list(topics))
            yield sub
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIMEOUT_S):
                await trio.to_thread.run_sync(consumer.close)


def _headers(msg: Message) -> tuple[tuple[str, bytes], ...]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return tuple(
        (k, v.encode() if isinstance(v, str) else (v if v is not None else b"")) for k, v in pairs
    )


class _KafkaSubscription:
    def __init__(
        self,
        bus: KafkaBus,
        consumer: Consumer,
        on_assign: OnAssign | None,
        on_revoke: OnRevoke | None,
    ) -> None:
        self._bus = bus
        self._consumer = consumer
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._assigned: set[TopicPartition] = set()
        self._committed: dict[TopicPartition, int] = {}
        self._lock = trio.Lock()  # one call into the consumer at a time
        self._lag: dict[TopicPartition, int] = {}
        self._lag_at = -math.inf

    def assignment(self) -> frozenset[TopicPartition]:
        return frozenset(self._assigned)

    def lag(self) -> dict[TopicPartition, int]:
        return dict(self._lag)

    def _sample_lag(self) -> None:
        """On the consumer's thread: end-of-log minus position, from librdkafka's cache."""
        parts = [KafkaTopicPartition(tp.topic, tp.partition) for tp in self._assigned]
        lag: dict[TopicPartition, int] = {}
        for p in self._consumer.position(parts) if parts else []:
            _, high = self._consumer.get_watermark_offsets(p, cached=True)
            if high >= 0 and p.offset >= 0:
                lag[TopicPartition(p.topic, p.partition)] = max(0, high - p.offset)
        self._lag = lag

    # These run on the worker thread inside consume(), where librdkafka calls them.

    def subscribe_blocking(self, topics: list[str]) -> None:
        self._consumer.subscribe(topics, on_assign=self._assign_cb, on_revoke=self._revoke_cb)

    def _assign_cb(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        starts = None
        if self._on_assign is not None:
            starts = trio.from_thread.run(self._on_assign, tps, trio_token=self._bus._token)
        if starts:
            for p in partitions:
                tp = TopicPartition(p.topic, p.partition)
                if tp in starts:
                    p.offset = starts[tp]
        consumer.assign(partitions)
        self._assigned.update(tps)

    def _revoke_cb(self, consumer: Consumer, partitions: list[KafkaTopicPartition]) -> None:
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        if self._on_revoke is not None:
            trio.from_thread.run(self._on_revoke, tps, trio_token=self._bus._token)
        self._assigned.difference_update(tps)
        for tp in tps:
            self._committed.pop(tp, None)
        consumer.unassign()

    def _to_record(self, msg: Message) -> Record | None:
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return None
            if err.fatal() or err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                raise BusError(f"consume: {err.name()}: {err.str()}", service="kafka")
            log.warning("kafka consume error: %s: %s", err.name(), err.str())
            return None
        _, ts = msg.timestamp()
        return Record(
            topic=msg.topic() or "",
            partition=msg.partition() or 0,
            offset=msg.offset() or 0,
            key=msg.key(),
            value=msg.value() or b"",
            headers=_headers(msg),
            timestamp_ms=ts,
        )

    def _fetch(self, max_records: int, wait: float, now: float) -> list[Message]:
        """One thread hop: what is queued now, else the first arrival plus what follows it.

        ``consume(n, t)`` alone waits until it has ``n`` messages or ``t`` passed, which under
        a light stream adds up to ``t`` of latency to every record.
        """
        # ``now`` is the Trio clock, read by the caller (this runs on the worker thread).
        if now - self._lag_at >= LAG_SAMPLE_S:
            self._lag_at = now
            self._sample_lag()
        messages = self._consumer.consume(max_records, 0)
        if messages or wait <= 0:
            return messages
        first = self._consumer.consume(1, wait)
        if not first or max_records == 1:
            return first
        return first + self._consumer.consume(max_records - 1, 0)

    async def get_batch(self, max_records: int = 500, timeout_s: float = 1.0) -> list[Record]:
        if max_records < 1:
            raise ValidationError("max_records must be >= 1", field="max_records")
        step = self._bus._settings.consume_timeout_s
        deadline = trio.current_time() + timeout_s
        async with self._lock:
            while True:
                remaining = deadline - trio.current_time()
                wait = max(0.0, min(step, remaining))
                try:
                    messages = await trio.to_thread.run_sync(
                        self._fetch, max_records, wait, trio.current_time()
                    )
                except KafkaException as exc:
                    raise BusError(f"consume: {exc}", service="kafka") from None
                records = [r for r in map(self._to_record, messages) if r is not None]
                # Drop anything of a partition revoked during this very call.
                records = [r for r in records if r.topic_partition in self._assigned]
                if records:
                    self._bus._consumed += len(records)
                    self._bus._mark_healthy()
                    return records
                if remaining <= 0 or math.isclose(remaining, 0.0, abs_tol=1e-9):
                    return []

    async def commit(self, records: Iterable[Record]) -> None:
        offsets = [
            KafkaTopicPartition(tp.topic, tp.partition, offset)
            for tp, offset in sorted(commit_positions(records).items())
            if tp in self._assigned and offset > self._committed.get(tp, -1)
        ]
        if not offsets:
            await trio.lowlevel.checkpoint()
            return
        async with self._lock:
            try:
                await trio.to_thread.run_sync(
                    lambda: self._consumer.commit(offsets=offsets, asynchronous=False)
                )
            except KafkaException as exc:
                raise BusError(f"commit: {exc}", service="kafka") from None
        for tp in offsets:
            self._committed[TopicPartition(tp.topic, tp.partition)] = tp.offset
        self._bus._committed += len(offsets)


@asynccontextmanager
async def open_kafka_bus(settings: KafkaSettings) -> AsyncIterator[KafkaBus]:
    """A :class:`KafkaBus` with its delivery-report task; flushes (bounded) on exit."""
    bus = KafkaBus(settings, trio.lowlevel.current_trio_token())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(bus.serve_delivery_reports)
        try:
            yield bus
        finally:
            with trio.CancelScope(shield=True):
                left = await bus.flush()
                if left:
                    log.warning("kafka: %d records undelivered at close", left)
            nursery.cancel_scope.cancel()
