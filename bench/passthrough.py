"""The Kafka limit of one Python process on this machine: consume, produce, no work.

The worker moves each notification through two consume-and-produce hops in
one process: notifications to sends (the router) and sends to deliveries
(the sender), each hop on topics of the same partition counts. This module
does exactly that with aiokafka and nothing else: no decoding, no table, no
HTTP, values of the sizes the pipeline's own records have, the producer's
acks and linger as Faust's. Its rate is what the worker could reach if its
own work cost nothing.

:func:`run_faust` measures the same two hops as a Faust worker built like
pushstream's (:class:`~pushstream.app.Pipeline`: its settings, raw topics,
agents with concurrency 1 iterating ``stream.events()``, ``Pipeline.send``)
whose agents do nothing else: the cost of the stream framework itself. It
runs ``python bench/passthrough.py faust-worker`` as the worker process.

Used by ``bench/run.py``; the topics are ``<prefix>pt.in``, ``pt.mid`` and
``pt.out``, and for the Faust run pushstream's own under ``<prefix>noop.``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pushstream import localstack, topics
from pushstream.app import DELIVERIES, NOTIFICATIONS, SENDS, Pipeline
from pushstream.config import Settings, load_settings
from pushstream.events import Notification, Send
from pushstream.senders import apns
from pushstream.senders.result import Target
from pushstream.senders.runner import delivery_for

WITHIN_S = 600.0
HERE = Path(__file__).resolve()


@dataclass(frozen=True)
class Sizes:
    """Bytes of one notification, one send and one delivery."""

    notification: int
    send: int
    delivery: int


def sizes(notification: bytes) -> Sizes:
    """The sizes of the records the pipeline makes of ``notification``."""
    n = Notification.model_validate_json(notification)
    target = Target("apns", "e" * 64, "com.example.sandbox", "d123456")
    rendered = apns.render(n, target, 0, None)
    send = Send(
        send_id=f"{n.id}:{target.device_id}",
        notification_id=n.id,
        user_id="u00000001",
        device_id=target.device_id,
        platform="apns",
        app=target.app,
        token=target.token,
        accepted_at_ms=int(time.time() * 1000),
        headers=rendered.headers,
        body=rendered.body,
    )
    delivery = delivery_for(
        send,
        "delivered",
        "Success",
        now_ms=send.accepted_at_ms + 5,
        attempts=1,
        status=200,
        provider_id="8f1c5e3a-0a6e-4f1e-9e58-2d8e0b7f3b11",
        sent_at_ms=send.accepted_at_ms + 1,
    )
    return Sizes(
        len(notification),
        len(send.model_dump_json(exclude_none=True)),
        len(delivery.model_dump_json(exclude_none=True)),
    )


async def create_topics(settings: Settings) -> list[str]:
    """The three topics, with the worker's partition counts."""
    names = [settings.topic(f"pt.{n}") for n in ("in", "mid", "out")]
    counts = [settings.partitions, settings.send_partitions, settings.send_partitions]
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap, **topics.kafka_security(settings)
    )
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, count, settings.replication_factor)
                for name, count in zip(names, counts, strict=True)
            ]
        )
    finally:
        await admin.close()
    return names


async def fill(
    settings: Settings, topic: str, records: Sequence[tuple[bytes, bytes]]
) -> None:
    """Put the input records in place before the clock starts."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=20,
        **topics.kafka_security(settings),
    )
    await producer.start()
    try:
        pending = [await producer.send(topic, v, key=k) for k, v in records]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def run(
    settings: Settings,
    records: Sequence[tuple[bytes, bytes]],
    *,
    fanout: int = 1,
    hops: int = 2,
) -> float:
    """Pass ``records`` through ``hops`` hops; input records per second.

    Each input record makes ``fanout`` records on the middle topic (a user's
    devices); with ``hops=1`` the first hop writes straight to the output.
    """
    first_size = sizes(records[0][1])
    names = await create_topics(settings)
    await fill(settings, names[0], records)
    send_value = b"s" * first_size.send
    delivery_value = b"d" * first_size.delivery
    inputs = names[:2] if hops == 2 else names[:1]
    consumer = AIOKafkaConsumer(
        *inputs,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.app_id + "-passthrough",
        auto_offset_reset="earliest",
        enable_auto_commit=True,
        auto_commit_interval_ms=1000,
        **topics.kafka_security(settings),
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=5,
        acks="all",
        **topics.kafka_security(settings),
    )
    await consumer.start()
    await producer.start()
    expected = len(records) * fanout
    written = 0
    began = 0.0
    try:
        deadline = time.monotonic() + WITHIN_S
        pending: list[asyncio.Future[object]] = []
        while written < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=100, max_records=1000)
            if batch and not began:
                began = time.monotonic()
            for tp, messages in batch.items():
                for message in messages:
                    if tp.topic != names[0]:
                        out = await producer.send(
                            names[2], delivery_value, key=message.key
                        )
                        pending.append(out)
                        written += 1
                        continue
                    target = names[1] if hops == 2 else names[2]
                    value = send_value if hops == 2 else delivery_value
                    for k in range(fanout):
                        key = message.key + b":%d" % k
                        pending.append(await producer.send(target, value, key=key))
                    written += 0 if hops == 2 else fanout
            if len(pending) > 10_000:  # bound the memory, not the pace
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
        elapsed = time.monotonic() - began
    finally:
        await producer.stop()
        await consumer.stop()
    return len(records) * (written / expected) / elapsed if elapsed > 0 else 0.0


# --- the same hops as a Faust worker that does nothing else ---------------------


def faust_pipeline(settings: Settings, send_size: int, delivery_size: int) -> Pipeline:
    """notifications -> sends.apns -> deliveries, agents that only forward."""
    pipeline = Pipeline(settings)
    send_value, delivery_value = b"s" * send_size, b"d" * delivery_size

    async def route(stream: object) -> None:
        async for event in stream.events():  # type: ignore[attr-defined]
            await pipeline.send(SENDS["apns"], event.message.key, send_value)

    async def send(stream: object) -> None:
        async for event in stream.events():  # type: ignore[attr-defined]
            await pipeline.send(DELIVERIES, event.message.key, delivery_value)

    app = pipeline.app
    app.agent(pipeline.topics[NOTIFICATIONS], name="noop.route", concurrency=1)(route)
    app.agent(pipeline.topics[SENDS["apns"]], name="noop.send", concurrency=1)(send)
    return pipeline


def serve_faust() -> None:
    """The worker process of :func:`run_faust` (settings from the environment)."""
    import faust

    settings = load_settings()
    pipeline = faust_pipeline(
        settings,
        int(os.environ["NOOP_SEND_SIZE"]),
        int(os.environ["NOOP_DELIVERY_SIZE"]),
    )
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = faust.Worker(pipeline.app, loop=loop, loglevel="WARNING", quiet=True)
    worker.spinner = None
    worker.execute_from_commandline()


async def run_faust(
    settings: Settings, records: Sequence[tuple[bytes, bytes]], folder: Path
) -> float:
    """Input records per second through the no-op Faust worker.

    The worker starts on empty topics; once a first record has come out, the
    records are published as fast as the producer takes them, and the clock
    runs from the first publish to the last record on deliveries.
    """
    noop = settings.model_copy(
        update={
            "topic_prefix": settings.topic_prefix + "noop.",
            "app_id": settings.app_id + "-noop",
            "data_dir": folder / "noop",
        }
    )
    report = await topics.ensure_topics(noop)
    assert report.ok, report.problems
    size = sizes(records[0][1])
    env = localstack.worker_env(
        noop,
        NOOP_SEND_SIZE=str(size.send),
        NOOP_DELIVERY_SIZE=str(size.delivery),
    )
    worker = localstack.WorkerChild(env, folder / "noop-worker.log")
    worker.argv = [sys.executable, str(HERE), "faust-worker"]
    out = await localstack.partitions(noop, (DELIVERIES,))
    notifications = noop.topic(NOTIFICATIONS)
    ends = AIOKafkaConsumer(
        bootstrap_servers=noop.kafka_bootstrap, **topics.kafka_security(noop)
    )
    await ends.start()
    await worker.start()
    try:
        await fill(noop, notifications, records[:1])
        await _wait_for(ends, out, 1, worker)
        began = time.monotonic()
        await fill(noop, notifications, records)
        await _wait_for(ends, out, 1 + len(records), worker)
        return len(records) / (time.monotonic() - began)
    finally:
        await worker.stop()
        await ends.stop()


async def _wait_for(
    consumer: AIOKafkaConsumer, tps: list[object], count: int, worker: localstack.Child
) -> None:
    """Until ``count`` records are in ``tps``; fails if the worker exits."""
    deadline = time.monotonic() + WITHIN_S
    while sum((await consumer.end_offsets(tps)).values()) < count:
        if not worker.running:
            raise worker.failed("exited")
        if time.monotonic() > deadline:
            raise worker.failed(f"fewer than {count} records out in {WITHIN_S:.0f}s")
        await asyncio.sleep(0.05)


if __name__ == "__main__" and sys.argv[1:] == ["faust-worker"]:
    serve_faust()
