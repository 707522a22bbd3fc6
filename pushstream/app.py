"""The Faust application of one pushstream worker: topics, tables and agents.

:class:`Pipeline` builds the Faust app from :class:`~pushstream.config.Settings`
and holds what every agent shares: the topics (values are raw bytes, decoded
and validated by the agent that reads them, so a bad event becomes a dead
letter instead of a crash), the tables, and the helpers that publish events
and dead letters. Each part of the pipeline (registry, router, senders, retry)
attaches its agents with an ``attach(pipeline)`` function.

Every agent runs with concurrency 1: faust-streaming can commit past an
unfinished message when an agent's concurrency is above 1, which would lose
it on a crash. Parallelism comes from partitions, workers, and from batching
inside the sender agents.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn, cast

import faust
from aiokafka import AIOKafkaProducer
from faust.sensors import Monitor
from faust.streams import current_event
from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitResults
from pydantic import BaseModel

from pushstream import deadletter, metrics
from pushstream.config import Settings

log = logging.getLogger(__name__)

# Names of pushstream's topics, before the configured prefix.
REGISTRATIONS = "registrations"
NOTIFICATIONS = "notifications"
TOKEN_EVENTS = "token-events"
TOKEN_OWNERS = "token-owners"
DELIVERIES = "deliveries"
RETRIES = "retries"
DEAD_LETTERS = "dead-letters"
SENDS = {"apns": "sends.apns", "fcm": "sends.fcm", "wns": "sends.wns"}

# Names of the tables (their changelogs are "<app id>-<name>-changelog").
DEVICES_TABLE = "devices"
ROUTED_TABLE = "routed"

# RocksDB's defaults (64 MiB write buffers, a 2 GiB block cache per partition)
# are sized for a dedicated database host, not for a worker sharing a node.
ROCKSDB_OPTIONS: dict[str, Any] = {
    "write_buffer_size": 8 << 20,
    "max_write_buffer_number": 2,
    "block_cache_size": 16 << 20,
}


def raw_schema() -> faust.Schema[bytes, bytes]:
    """Raw bytes keys and values; the agents decode and validate them.

    A new schema for every topic and table: Faust updates a schema in place
    when a topic or table adopts it, so a shared one would take the JSON
    serializers a table derives from its types.
    """
    return faust.Schema(
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"
    )


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class LeanMonitor(Monitor):
    """Faust's monitor without the statistics kept for every record.

    Faust calls its monitor for every message, event, send and table access
    to feed the web stats page and ``faust.sensors.metrics``; pushstream uses
    neither (its metrics are its own, :mod:`pushstream.metrics`), and the
    bookkeeping costs more CPU than a record's own Kafka hop. Kept: the time
    of each partition's last event, which the consumer's "stream stuck" check
    reads (``verify_event_path`` in faust's aiokafka driver), and the
    per-commit and per-fetch offsets, which cost nothing per record.
    """

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_stream_event_in(
        self, tp: Any, offset: int, stream: Any, event: Any
    ) -> dict[str, Any] | None:
        self.stream_inbound_time[tp] = time.monotonic()
        return None

    def on_stream_event_out(
        self,
        tp: Any,
        offset: int,
        stream: Any,
        event: Any,
        state: dict[str, Any] | None = None,
    ) -> None:
        pass

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_send_initiated(
        self, producer: Any, topic: str, message: Any, keysize: int, valsize: int
    ) -> Any:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        pass

    def on_table_get(self, table: Any, key: Any) -> None:
        pass

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        pass

    def on_table_del(self, table: Any, key: Any) -> None:
        pass


class PipelineTable(faust.Table):  # type: ignore[type-arg]
    """A Faust table that waits for its changelog's metadata before checking it.

    Before its first write from a source topic, Faust checks that the source
    and the changelog topic have the same partition count, as the consumer's
    metadata knows them (``Collection._verify_source_topic_partitions``).
    On a worker's first start the changelog topic is new, and until the next
    metadata refresh the consumer lists it with no partitions at all
    (aiokafka leaves out a topic whose leaders are not elected yet): Faust
    then refuses the write with ``PartitionsMismatch``, and the event that
    made it would be dead-lettered. A count of zero means "not known yet",
    so the check is left for a later write; a real mismatch is still
    refused. The write itself waits in the producer for the topic's
    metadata.
    """

    def _verify_source_topic_partitions(self, source_topic: str) -> None:
        if self.app.consumer.topic_partitions(self.changelog_topic_name) == 0:
            return
        super()._verify_source_topic_partitions(source_topic)

    async def put(self, key: bytes, value: bytes) -> None:
        """Store a value in the event in hand's partition, and log it to the changelog.

        What ``table[key] = value`` does, for a table written once per
        notification: the changelog record goes straight to the app's
        producer, as :meth:`Pipeline.send` does, instead of through Faust's
        send buffer (``Topic.send_soon``), which wraps every record in a
        ``FutureMessage``, hands it over through a queue and a background
        task, and holds the writer once 100 records wait. Once Kafka has the
        record, its offset is kept in the store, as Faust keeps it, so that a
        restart reads the changelog only past it. Nothing is lost if the
        worker dies first: Faust flushes the producer before it commits the
        event's offset, and a record never confirmed is simply read again.
        """
        event = current_event()
        if event is None:
            raise RuntimeError("a table is written only while an event is handled")
        message = event.message
        self._verify_source_topic_partitions(message.topic)
        self.data[key] = value
        producer = await self.app.maybe_start_producer()
        written = await producer.send(
            self.changelog_topic_name,
            key,
            value,
            partition=message.partition,
            timestamp=None,
            headers=None,
        )
        written.add_done_callback(self._changelog_written)

    def _changelog_written(self, written: asyncio.Future[Any]) -> None:
        if written.cancelled():
            return
        failure = written.exception()
        if failure is not None:
            log.error(
                "table %s: a changelog record was not written (%s: %s)",
                self.name,
                type(failure).__name__,
                failure,
            )
            return
        metadata = written.result()
        self.data.set_persisted_offset(metadata.topic_partition, metadata.offset)


class FullMetadataProducer(AIOKafkaProducer):  # type: ignore[misc]
    """aiokafka's producer, with metadata always fetched for every topic, and
    at most one metadata request per ``retry_backoff_ms`` (100 ms).

    aiokafka's client fetches metadata for all topics until a send finds a
    topic it knows nothing of (a changelog created a moment ago: the broker
    lists a new topic some 100 ms after creating it); from then on it asks
    only for the topics such sends named, and each answer replaces what it
    knew, so every other topic drops out of its metadata. A batch already
    queued for one of them has no leader any more, and the sender's metadata
    refreshes never bring that topic back: the batch waits until the next
    send to its topic, or until it expires after ``producer_request_timeout``
    (20 minutes). Faust awaits every batch before committing offsets
    (``producer.flush()``), and commits from the loop that fetches records,
    so the whole worker stalls. Here a topic the client has no metadata for
    triggers a full refresh instead of narrowing the list.

    While a queued batch's partition has no leader, aiokafka's sender asks
    for metadata again as soon as the last answer is in, with no pause
    (``Sender._sender_routine``). A broker that stops cleanly hands the
    leadership of its partitions to other replicas, or to none when it is the
    last; once it is gone each request fails at once, and the worker spent
    three quarters of a core on some 2,500 connection attempts a second until
    the broker was back. The Java client waits
    ``retry.backoff.ms`` between metadata requests; so does this one.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        client = self.client
        update = client._metadata_update
        last_request = -math.inf

        def refresh_all(topic: str) -> Any:
            return client.force_metadata_update()

        async def paced_update(cluster: Any, topics: Any) -> bool:
            nonlocal last_request
            wait = last_request + client._retry_backoff - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            last_request = time.monotonic()
            updated: bool = await update(cluster, topics)
            return updated

        client.add_topic = refresh_all
        client._metadata_update = paced_update


class PipelineProducer(faust_aiokafka.Producer):
    """Faust's aiokafka producer, built on :class:`FullMetadataProducer`."""

    @property
    def _producer_type(self) -> type[AIOKafkaProducer]:
        return FullMetadataProducer


# How long the broker may hold a fetch that finds no new records. Faust asks
# for 1,500 ms (fixed in its aiokafka driver). A fetch leaves out the
# partitions whose records are still being handled, and no other fetch goes
# to that broker until it returns: records arriving there meanwhile wait for
# it, at each hop. An idle worker thus asks each broker 50 times a second.
FETCH_MAX_WAIT_MS = 20


class PipelineConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread, with a short fetch wait."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        return consumer


class PipelineConsumer(faust_aiokafka.Consumer):
    """Faust's aiokafka consumer, handing each record over with one task.

    Faust's fetch loop hands every record to the topic conductor with
    ``wait_first(callback(message), suspend_flow.wait())``: the hand-off
    stops waiting (and cancels it) when a rebalance suspends the flow, or
    when the consumer stops or crashes. ``Service.wait_first`` makes four
    tasks for that (the hand-off and three waiters) and cancels three, for
    every record; here the hand-off gets one task, and the three conditions
    wake it through one shared future, resolved by the methods that set
    them (:meth:`stop_flow`, ``_stopped_set``, ``_crash``). Same outcome,
    about a tenth of the event-loop work.
    """

    _interrupted: asyncio.Future[None] | None = None
    # Read offsets set by a seek while a fetched batch is handed out, by
    # partition; None while no batch is.
    _sought: dict[Any, int | None] | None = None
    _repositioned: tuple[Any, ...] = ()

    def _new_consumer_thread(self) -> PipelineConsumerThread:
        return PipelineConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:  # noqa: ASYNC109 (overrides Faust)
        """Faust's batches, without the records a seek made stale.

        A rebalance seeks the partitions to their committed offsets while
        Faust's fetch loop may still be handing out a batch fetched before
        (a worker that joins first reads from wherever its fetcher started).
        Faust keeps handing out that batch, and after each record sets the
        partition's read offset to it, over the one the seek set; the
        fetcher then reads again from the committed offset, but every
        record below that read offset is dropped unseen and never acked, so
        the partition's committed offset can never pass them. Here the rest
        of the batch of a sought partition is left to the fetcher, and the
        seek's read offset is put back after each record.
        """
        self._sought = None
        try:
            async for tp, message in super().getmany(timeout):
                if self._sought is None:
                    self._sought = {}
                elif self._sought:
                    self._read_offset.update(self._sought)
                    if tp in self._sought:
                        continue
                yield tp, message
            if self._sought:
                self._read_offset.update(self._sought)
        finally:
            self._sought = None

    async def seek_to_committed(self) -> Any:
        committed = await super().seek_to_committed()
        # The partitions the fetcher moved: those with an offset committed.
        self._repositioned = tuple(tp for tp, offset in committed.items() if offset)
        return committed

    async def perform_seek(self) -> None:
        self._repositioned = ()
        await super().perform_seek()
        self._note_sought(self._repositioned)

    async def seek(self, partition: Any, offset: int) -> None:
        await super().seek(partition, offset)
        self._note_sought([partition])

    def _note_sought(self, tps: Any) -> None:
        sought = self._sought
        if sought is not None:
            sought.update({tp: self._read_offset.get(tp) for tp in tps})

    def stop_flow(self) -> None:
        super().stop_flow()
        self._interrupt()

    def _stopped_set(self) -> None:
        super()._stopped_set()
        self._interrupt()

    def _crash(self, reason: BaseException) -> None:
        super()._crash(reason)
        self._interrupt()

    def _interrupt(self) -> None:
        interrupted = self._interrupted
        if interrupted is None or interrupted.done():
            return
        loop = interrupted.get_loop()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            interrupted.set_result(None)
        elif not loop.is_closed():
            # A crash can be reported from the consumer's own thread.
            loop.call_soon_threadsafe(self._interrupt)

    async def wait_first(self, *coros: Any, timeout: Any = None) -> Any:  # noqa: ASYNC109 (overrides mode)
        """The fetch loop's hand-off with one task; anything else as Faust does."""
        if (
            timeout is not None
            or len(coros) != 2
            or not asyncio.iscoroutine(coros[0])
            or not _awaits_event(coros[1], self.suspend_flow)
            or self.suspend_flow.is_set()
            or self._stopped.is_set()
            or self._crashed.is_set()
        ):
            return await super().wait_first(*coros, timeout=timeout)
        handoff, flow = coros
        flow.close()
        loop = asyncio.get_running_loop()
        interrupted = self._interrupted
        if interrupted is None or interrupted.done():
            interrupted = self._interrupted = loop.create_future()
        task = loop.create_task(handoff)
        if not task.done():
            waiter = loop.create_future()

            def wake(_: Any) -> None:
                if not waiter.done():
                    waiter.set_result(None)

            task.add_done_callback(wake)
            interrupted.add_done_callback(wake)
            try:
                await waiter
            finally:
                interrupted.remove_done_callback(wake)
                if not task.done():
                    task.cancel()
        if not task.done() or task.cancelled():
            return WaitResults([], [], True)
        return WaitResults([handoff], [task.result()], False)


def _awaits_event(coro: Any, event: Any) -> bool:
    """True for a ``event.wait()`` coroutine not started yet."""
    frame = getattr(coro, "cr_frame", None)
    return (
        frame is not None
        and coro.cr_code is type(event).wait.__code__
        and frame.f_locals.get("self") is event
    )


class PipelineApp(faust.App):
    """A Faust app with a :class:`PipelineProducer` and a :class:`PipelineConsumer`."""

    def _new_producer(self) -> PipelineProducer:
        return PipelineProducer(self.transport, loop=self.loop, beacon=self.beacon)

    def _new_consumer(self) -> PipelineConsumer:
        return PipelineConsumer(
            self.transport,
            callback=self.topics.on_message,
            on_partitions_revoked=self._on_partitions_revoked,
            on_partitions_assigned=self._on_partitions_assigned,
            beacon=self.beacon,
            loop=self.loop,
        )


class DeadLetterError(Exception):
    """A dead letter could not be written; the worker stops so as not to lose it."""


class Pipeline:
    """The Faust app of one worker, and what its agents share."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app = PipelineApp(
            settings.app_id,
            broker=f"kafka://{settings.kafka_bootstrap}",
            broker_credentials=kafka_credentials(settings),
            store="rocksdb://",
            datadir=str(settings.data_dir),
            topic_partitions=settings.partitions,
            topic_replication_factor=settings.replication_factor,
            Table=PipelineTable,
            web_enabled=True,
            web_host=settings.web_host,
            web_port=settings.web_port,
            web_bind=settings.web_host,
            # Table views would serve device tokens to anyone who can connect.
            web_tables_enabled=False,
            web_graph_enabled=False,
            web_stats_enabled=False,
            web_router_enabled=False,
            Monitor=LeanMonitor,
            broker_session_timeout=10.0,
            broker_heartbeat_interval=1.0,
            broker_commit_interval=1.0,
            stream_wait_empty=True,
            table_standby_replicas=0,
            producer_linger=0.005,
            consumer_auto_offset_reset="earliest",
        )
        self._tables: dict[str, PipelineTable] = {}
        self.topics: dict[str, faust.TopicT] = {}
        self._topic_names: dict[str, str] = {}
        for name in (
            REGISTRATIONS,
            NOTIFICATIONS,
            TOKEN_EVENTS,
            TOKEN_OWNERS,
            DELIVERIES,
            RETRIES,
            DEAD_LETTERS,
            *SENDS.values(),
        ):
            self._topic_names[name] = settings.topic(name)
            self.topics[name] = self.app.topic(
                self._topic_names[name], schema=raw_schema(), internal=False
            )

    def table(self, name: str, **options: Any) -> PipelineTable:
        """A RocksDB table with raw bytes keys and values, co-partitioned inputs.

        Asking again for a name returns the same table (the options of the
        first call hold), so the parts that share a table may attach in any
        order.
        """
        if name in self._tables:
            return self._tables[name]
        # app.Table is typed as the TableT protocol; it builds a faust.Table.
        table = cast(
            "PipelineTable",
            self.app.Table(
                name,
                schema=raw_schema(),
                key_type=bytes,
                value_type=bytes,
                partitions=self.settings.partitions,
                options={**ROCKSDB_OPTIONS, **options.pop("options", {})},
                **options,
            ),
        )
        self._tables[name] = table
        return table

    @functools.cached_property
    def devices(self) -> PipelineTable:
        """user id -> UserDevices JSON: written by the registry, read by the router.

        Created on first use, so the registry and the router may attach in
        either order and share the one table.
        """
        return self.table(DEVICES_TABLE)

    @functools.cached_property
    def routed(self) -> PipelineTable:
        """The router's dedup entries, kept for ``dedup_window_s``.

        Both copies forget old entries: RocksDB's TTL mode drops them at
        compaction, and the changelog deletes segments past the window
        besides compacting.
        """
        window_ms = str(self.settings.dedup_window_s * 1000)
        return self.table(
            ROUTED_TABLE,
            options={"ttl": self.settings.dedup_window_s},
            extra_topic_configs={
                "cleanup.policy": "compact,delete",
                "retention.ms": window_ms,
                "segment.ms": window_ms,
            },
        )

    async def publish(
        self, topic: str, key: str | bytes | None, value: BaseModel
    ) -> Any:
        """Send an event; the returned future completes when Kafka has it."""
        if isinstance(key, str):
            key = key.encode()
        return await self.send(
            topic, key, value.model_dump_json(exclude_none=True).encode()
        )

    async def send(self, topic: str, key: bytes | None, value: bytes) -> Any:
        """Send a record; the returned future completes when Kafka has it.

        Straight to the app's producer: ``Topic.send`` would build a
        ``FutureMessage``, run the schema and the sensors, and chain a second
        future, per record, to end up in the same ``Producer.send``. Nothing
        is lost by skipping it: before every offset commit Faust awaits
        ``app.producer.flush()``, which waits for every record the producer
        was given (``Consumer._commit_offsets`` in
        faust/transport/consumer.py), so an event sent while a message is
        handled is in Kafka before that message counts as done. A record the
        producer refuses at once raises here, as ``Topic.send`` would.
        """
        producer = await self.app.maybe_start_producer()
        return await producer.send(
            self._topic_names[topic],
            key,
            value,
            partition=None,
            timestamp=None,
            headers=None,
        )

    async def dead_letter(
        self,
        *,
        stage: str,
        error: str,
        source_topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None = None,
        offset: int | None = None,
    ) -> Any:
        """Keep input that could not be handled, with the reason, and move on.

        The key and value are cut to what fits in one record
        (:mod:`pushstream.deadletter`). Returns the publish future.
        """
        record_key, letter = deadletter.build(
            stage=stage,
            error=error,
            source_topic=source_topic,
            key=key,
            value=value,
            partition=partition,
            offset=offset,
            at_ms=now_ms(),
        )
        metrics.dead_letter(source_topic, stage)
        return await self.publish(DEAD_LETTERS, record_key, letter)

    async def dead_letter_event(
        self, event: faust.EventT[bytes], *, stage: str, error: str
    ) -> Any:
        """Dead-letter the event being handled, and wait until Kafka has it.

        Returns the completed publish future, so callers may gather it with
        what else they published. When the dead letter cannot be written
        (the broker refuses it, or does not answer within the producer's
        timeout), the event is never acknowledged, so its offset is never
        committed; the worker stops with an error, and the event is read
        again after a restart. Skipping it would lose it without a trace.
        This call then waits until the stopping worker cancels the agent.
        """
        message = event.message
        try:
            future = await self.dead_letter(
                stage=stage,
                error=error,
                source_topic=message.topic,
                key=message.key,
                value=message.value,
                partition=message.partition,
                offset=message.offset,
            )
            await future
        except Exception as exc:
            failure = DeadLetterError(
                f"the dead letter of {message.topic}[{message.partition}]"
                f"@{message.offset} was not written ({type(exc).__name__}: {exc})"
            )
        else:
            return future
        await self._hold_and_stop(message, failure)

    async def _hold_and_stop(self, message: Any, failure: DeadLetterError) -> NoReturn:
        # One more reference than the streams hold: their acks never reach
        # zero, so the consumer never commits this offset, nor any after it.
        message.incref()
        log.error(
            "%s; stopping the worker, which reads it again after a restart", failure
        )
        # From a new task: the agent may be handling the refused input's
        # exception, whose text (pydantic's) quotes the input.
        stopping = asyncio.get_running_loop().create_task(self.app.crash(failure))
        await asyncio.Event().wait()
        del stopping
        raise AssertionError("unreachable: the worker cancels its agents")


def kafka_credentials(settings: Settings) -> Any:
    """Faust credentials for the configured Kafka security, or None for plaintext."""
    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    ssl_context = None
    if protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        ssl_context = create_ssl_context(
            cafile=str(settings.kafka_ssl_cafile)
            if settings.kafka_ssl_cafile
            else None,
            certfile=(
                str(settings.kafka_ssl_certfile)
                if settings.kafka_ssl_certfile
                else None
            ),
            keyfile=str(settings.kafka_ssl_keyfile)
            if settings.kafka_ssl_keyfile
            else None,
        )
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context)
    password = settings.kafka_sasl_password
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password else None,
        mechanism=settings.kafka_sasl_mechanism or "PLAIN",
        ssl_context=ssl_context,
    )
