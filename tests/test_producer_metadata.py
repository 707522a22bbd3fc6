"""The worker's producer keeps every topic's metadata when a new topic appears,
and asks for metadata at a bounded pace.

aiokafka's client narrows its metadata to the topics it found missing when
sending; a record queued for any other topic then waits without a leader
until it expires, and Faust's commit waits for it. And while a queued
record's partition has no leader, its sender asks for metadata without pause
(see :class:`pushstream.app.FullMetadataProducer`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from conftest import Kafka

from pushstream.app import DELIVERIES, Pipeline
from pushstream.config import Settings

pytestmark = pytest.mark.kafka

FLUSH_WITHIN_S = 15.0
WATCHED_S = 2.0
# aiokafka's default retry_backoff_ms: the least time between metadata requests.
RETRY_BACKOFF_S = 0.1


async def test_a_record_queued_before_a_new_topic_is_sent(
    kafka: Kafka, settings: Settings
) -> None:
    """A topic created after the producer's last metadata refresh (as a new
    changelog can be, the broker listing it a moment after creating it) must
    not strand a record queued for a topic the producer already knew."""
    await kafka.create_topics(settings)
    pipeline = Pipeline(settings)
    producer = await pipeline.app.maybe_start_producer()
    # Faust's own step after creating a topic: a refresh of all metadata.
    await producer.create_topic(settings.topic("declared"), 1, 1)
    late = settings.topic("late")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(late, 1, 1)])
    finally:
        await admin.close()
    try:
        queued = await pipeline.send(DELIVERIES, b"key", b"queued first")
        await producer.send(late, b"key", b"new topic", None, None, None)
        await asyncio.wait_for(producer.flush(), FLUSH_WITHIN_S)
        assert (await queued).topic == settings.topic(DELIVERIES)
        again = await pipeline.send(DELIVERIES, b"key", b"after the new topic")
        await asyncio.wait_for(again, FLUSH_WITHIN_S)
    finally:
        await asyncio.wait_for(producer.stop(), FLUSH_WITHIN_S)


async def test_a_record_without_a_leader_waits_at_a_pace(
    kafka: Kafka, settings: Settings
) -> None:
    """A partition without a leader (a broker stopped cleanly mid-flow) would
    cost the worker most of a core, asking for metadata without pause."""
    gone = settings.topic("gone")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    producer = await Pipeline(settings).app.maybe_start_producer()
    client = producer._producer.client
    try:
        await admin.create_topics([NewTopic(gone, 1, 1)])
        await producer.send_and_wait(gone, b"key", b"known", None, None, None)
        requests = count_metadata_requests(client)
        # A topic deleted behind the producer's back: its next record is
        # queued, then the metadata leaves its partition without a leader, as
        # a broker's clean stop does (without stopping the shared broker).
        await delete_topic(admin, gone)
        queued = await producer.send(gone, b"key", b"stranded", None, None, None)
        requests.clear()
        await asyncio.sleep(WATCHED_S)
        asked = len(requests)

        await admin.create_topics([NewTopic(gone, 1, 1)])
        assert (await asyncio.wait_for(queued, FLUSH_WITHIN_S)).topic == gone
        assert 0 < asked <= 1.5 * WATCHED_S / RETRY_BACKOFF_S
    finally:
        await asyncio.wait_for(producer.stop(), FLUSH_WITHIN_S)
        await admin.close()


async def delete_topic(admin: AIOKafkaAdminClient, topic: str) -> None:
    """Delete ``topic`` and wait until the broker no longer lists it."""
    await admin.delete_topics([topic])
    deadline = time.monotonic() + FLUSH_WITHIN_S
    while True:
        if topic not in await admin.list_topics():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"{topic} still listed {FLUSH_WITHIN_S:.0f}s after deletion")
        await asyncio.sleep(0.1)


def count_metadata_requests(client: Any) -> list[float]:
    """The times of the client's metadata requests from now on (it sends each
    one through ``_metadata_update``)."""
    times: list[float] = []
    update = client._metadata_update

    async def counted(*args: Any) -> Any:
        times.append(time.monotonic())
        return await update(*args)

    client._metadata_update = counted
    return times
