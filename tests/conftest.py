"""Shared fixtures: a real Kafka broker, per-test topic names, JSON records.

``kafka`` (session) finds the broker at ``PUSHSTREAM_KAFKA_BOOTSTRAP`` (default
127.0.0.1:9092). When nothing answers there it starts the local broker with
:mod:`pushstream.localkafka`, so plain ``pytest`` works, and stops it at the
end of the session only if it started it.

``names`` (alias ``prefix``) gives each test its own topic prefix and app id,
so tests share one broker without seeing each other's data; the test's topics
(and Faust's internal ones, which start with the app id) are deleted
afterwards unless ``PUSHSTREAM_TEST_KEEP_TOPICS=1``.

A module whose tests share one worker makes its topics with
:func:`module_topics`. ``private_broker`` is a broker of the test's own, for
tests that stop it (the shared one is never stopped), and ``private_settings``
the test's settings on it. ``sandbox`` is a ``pushstream sandbox`` process
shared by a module's tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel
from sandboxproc import SandboxProcess

from pushstream import localkafka, localstack, topics
from pushstream.config import Settings

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
T = TypeVar("T")


def run_sync(factory: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop."""

    async def runner() -> T:
        return await factory()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, runner()).result()


@dataclass(frozen=True)
class Record:
    """One consumed record, its value decoded from JSON."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: Any
    headers: tuple[tuple[str, bytes], ...] = ()


def encode_value(value: Any) -> bytes:
    """JSON bytes of a pydantic model, a JSON-able object, or bytes as given."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, BaseModel):
        return value.model_dump_json(exclude_none=True).encode()
    return json.dumps(value).encode()


def _record(message: Any, decode: bool) -> Record:
    raw = message.value
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key.decode() if message.key is not None else None,
        value=json.loads(raw) if decode and raw is not None else raw,
        headers=tuple(message.headers or ()),
    )


@dataclass(frozen=True)
class Kafka:
    """The test session's broker, with helpers that talk to it with aiokafka."""

    bootstrap: str
    local: localkafka.LocalKafka | None
    started_here: bool

    async def produce(
        self,
        topic: str,
        records: Iterable[tuple[str | bytes | None, Any]],
        *,
        partition: int | None = None,
    ) -> list[tuple[int, int]]:
        """Send (key, value) records, values as JSON; returns (partition, offset)."""
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        try:
            futures = []
            for key, value in records:
                raw_key = key.encode() if isinstance(key, str) else key
                futures.append(
                    await producer.send(
                        topic, encode_value(value), key=raw_key, partition=partition
                    )
                )
            sent = await asyncio.gather(*futures)
        finally:
            await producer.stop()
        return [(meta.partition, meta.offset) for meta in sent]

    async def consume(
        self,
        topic: str,
        count: int,
        *,
        within: float = 20.0,
        decode: bool = True,
    ) -> list[Record]:
        """Read the first ``count`` records of ``topic`` (all partitions).

        Fails the test when fewer arrive within ``within`` seconds. No
        consumer group is used, so nothing is committed.
        """
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await consumer.start()
        got: list[Record] = []
        try:
            async with asyncio.timeout(within):
                while len(got) < count:
                    batch = await consumer.getmany(timeout_ms=500)
                    got += [
                        _record(message, decode)
                        for messages in batch.values()
                        for message in messages
                    ]
        except TimeoutError:
            pytest.fail(f"{topic}: {len(got)} of {count} records within {within}s")
        finally:
            await consumer.stop()
        return got

    async def create_topics(self, settings: Settings) -> topics.Report:
        """Create pushstream's topics for ``settings``; fails the test on mismatch."""
        report = await topics.ensure_topics(settings)
        assert report.ok, report.problems
        return report

    async def topics_starting_with(self, start: str) -> list[str]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            names: list[str] = await admin.list_topics()
        finally:
            await admin.close()
        return sorted(n for n in names if n.startswith(start))

    async def delete_topics_starting_with(self, start: str) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        names = await self.topics_starting_with(start)
        if not names:
            return
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.delete_topics(names)
        finally:
            await admin.close()


@pytest.fixture(scope="session")
def kafka() -> Iterator[Kafka]:
    """A reachable broker; started (and later stopped) here if none runs."""
    bootstrap = os.environ.get("PUSHSTREAM_KAFKA_BOOTSTRAP") or DEFAULT_BOOTSTRAP
    if localkafka.broker_answers(bootstrap):
        yield Kafka(bootstrap, None, started_here=False)
        return

    host, _, port = bootstrap.rpartition(":")
    if "," in bootstrap or host not in ("127.0.0.1", "localhost"):
        pytest.fail(
            f"no Kafka broker answers at PUSHSTREAM_KAFKA_BOOTSTRAP={bootstrap}"
        )
    local = localkafka.LocalKafka.from_env(port=int(port))
    localkafka.up(local)
    try:
        yield Kafka(local.bootstrap, local, started_here=True)
    finally:
        localkafka.down(local)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[localkafka.LocalKafka]:
    """A broker of this test's own (port, data folder): it may be stopped."""
    broker = localkafka.LocalKafka.from_env(
        port=localstack.free_port(), data_dir=tmp_path / "kafka"
    )
    localkafka.up(broker)
    try:
        yield broker
    finally:
        localkafka.down(broker)


@dataclass(frozen=True)
class TestNames:
    """A test's own topic prefix and app id (the prefix starts with the app id)."""

    app_id: str
    topic_prefix: str

    def topic(self, name: str) -> str:
        return self.topic_prefix + name

    def __str__(self) -> str:
        return self.topic_prefix


@pytest.fixture
def names(request: pytest.FixtureRequest, kafka: Kafka) -> Iterator[TestNames]:
    """A unique topic prefix and app id; the test's topics are deleted after it."""
    test = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name).strip("-")[:40]
    app_id = f"t-{test}-{uuid.uuid4().hex[:8]}"
    yield TestNames(app_id=app_id, topic_prefix=f"{app_id}.")
    if os.environ.get("PUSHSTREAM_TEST_KEEP_TOPICS") != "1":
        run_sync(lambda: kafka.delete_topics_starting_with(app_id))


@contextmanager
def module_topics(
    kafka: Kafka, folder: Path, name: str, **fields: Any
) -> Iterator[Settings]:
    """Settings of a worker a module's tests share: an app id and topic prefix
    of their own starting with ``t-NAME-``, data in ``folder/worker``, and
    ``fields``. The topics are created now and deleted at the end unless
    ``PUSHSTREAM_TEST_KEEP_TOPICS=1``."""
    app_id = f"t-{name}-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=f"{app_id}.",
        app_id=app_id,
        data_dir=folder / "worker",
        **fields,
    )
    run_sync(lambda: kafka.create_topics(settings))
    try:
        yield settings
    finally:
        if os.environ.get("PUSHSTREAM_TEST_KEEP_TOPICS") != "1":
            run_sync(lambda: kafka.delete_topics_starting_with(app_id))


@pytest.fixture
def prefix(names: TestNames) -> TestNames:
    """Alias of ``names``: ``str(prefix)`` is the topic prefix."""
    return names


def settings_on(bootstrap: str, names: TestNames, tmp_path: Path) -> Settings:
    """Settings for a test: a broker, its topic prefix, app id and data folder."""
    return Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=names.topic_prefix,
        app_id=names.app_id,
        data_dir=tmp_path / "worker",
    )


@pytest.fixture
def settings(kafka: Kafka, names: TestNames, tmp_path: Path) -> Settings:
    """Settings for this test on the shared broker."""
    return settings_on(kafka.bootstrap, names, tmp_path)


@pytest.fixture
async def private_settings(
    private_broker: localkafka.LocalKafka, names: TestNames, tmp_path: Path
) -> Settings:
    """Settings for this test on its private broker, with the topics made."""
    settings = settings_on(private_broker.bootstrap, names, tmp_path)
    assert (await topics.ensure_topics(settings)).ok
    return settings


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    """A ``pushstream sandbox`` process for the module's tests."""
    with SandboxProcess(tmp_path_factory.mktemp("sandbox")) as process:
        yield process


@pytest.fixture
def worker_env(settings: Settings) -> Callable[..., dict[str, str]]:
    """Builds the environment of a ``pushstream`` subprocess configured like
    ``settings``; keyword arguments add or replace variables."""

    def build(**extra: str) -> dict[str, str]:
        return localstack.worker_env(settings, **extra)

    return build
