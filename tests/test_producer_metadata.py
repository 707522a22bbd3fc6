"""The worker's producer keeps every topic's metadata when a new topic appears.

aiokafka's client narrows its metadata to the topics it found missing when
sending; a record queued for any other topic then waits without a leader
until it expires, and Faust's commit waits for it (see
:class:`pushstream.app.FullMetadataProducer`).
"""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from conftest import Kafka

from pushstream.app import DELIVERIES, Pipeline
from pushstream.config import Settings

pytestmark = pytest.mark.kafka

FLUSH_WITHIN_S = 15.0


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
