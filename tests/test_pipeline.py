"""The whole pipeline end to end: registrations and notifications in, pushes out.

One ``pushstream worker`` (router, registry and senders) and one sandbox serve
the module. Each test registers its own user's devices on the sandbox's apps,
publishes notifications, and checks the deliveries and what the sandbox's
providers received.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import Kafka, encode_value, module_topics
from sandboxproc import SandboxProcess
from workerproc import (
    Message,
    WorkerProcess,
    read_all,
    read_table,
    wait_consumed,
    wait_for,
)

from pushstream import localstack, router, topics
from pushstream.config import Settings

pytestmark = pytest.mark.kafka

APPS = {
    "apns": "com.example.sandbox",
    "fcm": "sandbox-project",
    "wns": "Contoso.Sandbox",
}
WAIT_S = 90.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture(scope="module")
def settings(
    kafka: Kafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    folder = tmp_path_factory.mktemp("pipeline")
    with module_topics(kafka, folder, "pipeline", partitions=2, send_partitions=2) as s:
        yield s


def environment(settings: Settings, sandbox: SandboxProcess) -> dict[str, str]:
    return localstack.worker_env(
        settings,
        sandbox.env,
        PUSHSTREAM_SEND_BATCH_SIZE="10",
        PUSHSTREAM_RETRY_BASE_S="0.05",
        PUSHSTREAM_RETRY_MAX_S="0.2",
    )


@pytest.fixture(scope="module")
def worker(settings: Settings, sandbox: SandboxProcess) -> Iterator[WorkerProcess]:
    log = settings.data_dir.parent / "worker.log"
    with WorkerProcess(environment(settings, sandbox), log_path=log) as process:
        yield process


@pytest.fixture
def pipeline(
    settings: Settings, worker: WorkerProcess, sandbox: SandboxProcess
) -> Settings:
    """The module's worker, running, with the sandbox's records cleared."""
    assert worker.running, worker.log_tail()
    sandbox.reset()
    return settings


# --- publishing and reading ------------------------------------------------------


async def register_three(
    kafka: Kafka, settings: Settings, sandbox: SandboxProcess, user: str
) -> dict[str, str]:
    """Register a phone (APNs), a tablet (FCM) and a laptop (WNS): platform -> token."""
    tokens = {
        "apns": uuid.uuid4().hex * 2,
        "fcm": f"ok-{uuid.uuid4().hex}",
        "wns": sandbox.wns_channel(APPS["wns"]),
    }
    records = [
        (
            user,
            {
                "type": "register",
                "user_id": user,
                "device_id": f"{platform}-device",
                "platform": platform,
                "token": token,
                "app": APPS[platform],
                "event_time": datetime.now(UTC).isoformat(),
            },
        )
        for platform, token in tokens.items()
    ]
    await kafka.produce(settings.topic(topics.REGISTRATIONS), records)
    await wait_consumed(settings)  # the devices are in the table
    return tokens


async def notify(
    settings: Settings,
    user: str,
    value: dict[str, Any],
    published_ms: int | None = None,
) -> None:
    """Publish one notification keyed by its user, stamped ``published_ms``."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            settings.topic(topics.NOTIFICATIONS),
            encode_value(value),
            key=user.encode(),
            timestamp_ms=published_ms,
        )
    finally:
        await producer.stop()


async def deliveries(
    settings: Settings, notification_id: str, count: int
) -> list[dict[str, Any]]:
    """Wait for ``count`` deliveries of a notification and return them."""

    def of(records: list[Message]) -> list[dict[str, Any]]:
        return [r.value for r in records if r.key == notification_id]

    records = await wait_for(
        settings, topics.DELIVERIES, lambda rs: len(of(rs)) >= count
    )
    return of(records)


# --- ttl 0: now or never ----------------------------------------------------------


async def test_now_or_never_is_delivered_everywhere_and_stored_nowhere(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A ttl 0 notification would never be sent, or be kept by a provider for later."""
    user, nid = f"u-{uuid.uuid4().hex[:8]}", f"n-{uuid.uuid4().hex[:8]}"
    tokens = await register_three(kafka, pipeline, sandbox, user)

    await notify(pipeline, user, {"id": nid, "title": "Now", "ttl": 0})
    found = await deliveries(pipeline, nid, 3)

    assert sorted((d["platform"], d["outcome"]) for d in found) == [
        ("apns", "delivered"),
        ("fcm", "delivered"),
        ("wns", "delivered"),
    ]
    [apns] = sandbox.accepted("apns")
    assert apns["token"] == tokens["apns"]
    assert apns["headers"]["apns-expiration"] == "0"
    [fcm] = sandbox.accepted("fcm")
    assert fcm["message"]["android"]["ttl"] == "0s"
    assert fcm["message"]["apns"]["headers"]["apns-expiration"] == "0"
    [wns] = sandbox.accepted("wns")
    assert "x-wns-ttl" not in wns["headers"]
    assert wns["headers"]["x-wns-cache-policy"] == "no-cache"
    assert [d["replay"] for d in found] == [False, False, False]


async def test_now_or_never_past_its_grace_is_expired_and_not_sent(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A ttl 0 notification that waited in Kafka would still buzz phones much later."""
    user, nid = f"u-{uuid.uuid4().hex[:8]}", f"n-{uuid.uuid4().hex[:8]}"
    await register_three(kafka, pipeline, sandbox, user)
    late = now_ms() - (router.NOW_OR_NEVER_GRACE_S + 5) * 1000
    later = f"n-{uuid.uuid4().hex[:8]}"

    await notify(pipeline, user, {"id": nid, "title": "Late", "ttl": 0}, late)
    await notify(pipeline, user, {"id": later, "title": "Now", "ttl": 0})
    await deliveries(pipeline, later, 3)
    [found] = await deliveries(pipeline, nid, 1)

    assert (found["outcome"], found["reason"]) == ("expired", "expired")
    assert len(sandbox.accepted("apns")) == 1
    sends = await read_all(pipeline, pipeline.topic("sends.apns"))
    assert [m for m in sends if m.value["notification_id"] == nid] == []


# --- a crash before the commit: sends made again, marked replay ---------------------


async def rewind(settings: Settings, partition: int, offset: int) -> None:
    """Set the worker group's committed offset of one notifications partition.

    Kafka accepts it once the group is empty: after a kill, once the dead
    member's session has timed out.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    tp = TopicPartition(settings.topic(topics.NOTIFICATIONS), partition)
    deadline = time.monotonic() + WAIT_S
    while True:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=settings.app_id,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            await consumer.commit({tp: offset})
            return
        except KafkaError:
            if time.monotonic() > deadline:
                raise
        finally:
            await consumer.stop()
        await asyncio.sleep(1.0)


def scrape(worker: WorkerProcess, name: str, platform: str) -> float:
    """One sample of the worker's /metrics, 0 when absent."""
    url = f"http://127.0.0.1:{worker.port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    wanted = f'{name}{{platform="{platform}"}} '
    rows = [row for row in text.splitlines() if row.startswith(wanted)]
    return float(rows[0].split()[-1]) if rows else 0.0


async def test_sends_made_again_after_a_crash_are_marked_replay(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess, worker: WorkerProcess
) -> None:
    """Analytics could not tell a repeat after a crash from a second notification."""
    user, nid = f"u-{uuid.uuid4().hex[:8]}", f"n-{uuid.uuid4().hex[:8]}"
    await register_three(kafka, pipeline, sandbox, user)
    await notify(pipeline, user, {"id": nid, "title": "Once"})
    first = await deliveries(pipeline, nid, 3)
    await wait_until_routed(pipeline, user, nid)
    [record] = [
        m
        for m in await read_all(pipeline, pipeline.topic(topics.NOTIFICATIONS))
        if m.value["id"] == nid
    ]

    # The worker dies; its commit of the notification had not happened yet.
    worker.kill()
    await rewind(pipeline, record.partition, record.offset)
    worker.start()
    found = await wait_for(
        pipeline,
        topics.DELIVERIES,
        lambda rs: len({r.value["platform"] for r in rs if replayed(r, nid)}) == 3,
    )

    assert {d["replay"] for d in first} == {False}
    again = [r.value for r in found if replayed(r, nid)]
    assert {d["outcome"] for d in again} == {"delivered"}
    assert {d["send_id"] for d in again} == {d["send_id"] for d in first}
    for platform in ("apns", "fcm", "wns"):
        sends = await read_all(pipeline, pipeline.topic(f"sends.{platform}"))
        marks = [m.value["replay"] for m in sends if m.value["notification_id"] == nid]
        assert marks[0] is False
        assert True in marks[1:]
        assert scrape(worker, "pushstream_replayed_sends_total", platform) == 1.0


async def test_a_worker_that_lost_its_disk_still_knows_what_it_routed(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess, worker: WorkerProcess
) -> None:
    """A notification published again after a restart on a new disk would be
    pushed twice: the routed table must come back from its changelog."""
    user, nid = f"u-{uuid.uuid4().hex[:8]}", f"n-{uuid.uuid4().hex[:8]}"
    await register_three(kafka, pipeline, sandbox, user)
    await notify(pipeline, user, {"id": nid, "title": "Once"})
    assert {d["outcome"] for d in await deliveries(pipeline, nid, 3)} == {"delivered"}
    await wait_until_routed(pipeline, user, nid)

    assert worker.stop() == 0
    shutil.rmtree(pipeline.data_dir)
    worker.start()
    await notify(pipeline, user, {"id": nid, "title": "Once"})

    def duplicates(records: list[Message]) -> int:
        return sum(
            1 for r in records if r.key == nid and r.value["outcome"] == "duplicate"
        )

    found = await wait_for(pipeline, topics.DELIVERIES, lambda rs: duplicates(rs) >= 3)
    # One "duplicate" per device, and no push made again.
    outcomes = Counter(r.value["outcome"] for r in found if r.key == nid)
    assert outcomes == {"delivered": 3, "duplicate": 3}
    assert len(sandbox.accepted("apns")) == 1


def replayed(record: Message, notification_id: str) -> bool:
    return record.key == notification_id and record.value.get("replay") is True


async def wait_until_routed(
    settings: Settings, user: str, notification_id: str
) -> None:
    """Wait until the routed table's changelog remembers the notification."""
    key = router.routed_key(user.encode(), notification_id).decode()
    deadline = time.monotonic() + WAIT_S
    while key not in await read_table(settings, "routed"):
        if time.monotonic() > deadline:
            pytest.fail(f"{notification_id} never reached the routed table")
        await asyncio.sleep(0.5)


# --- each provider end to end: delivered, dead tokens leave the table --------------


async def test_a_notification_reaches_every_platform_with_the_providers_id(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """Analytics could not match a delivery to what the provider accepted."""
    user, nid = f"u-{uuid.uuid4().hex[:8]}", f"n-{uuid.uuid4().hex[:8]}"
    tokens = await register_three(kafka, pipeline, sandbox, user)

    await notify(pipeline, user, {"id": nid, "title": "Hello", "body": "there"})
    found = {d["platform"]: d for d in await deliveries(pipeline, nid, 3)}

    for platform, token in tokens.items():
        delivery = found[platform]
        assert (delivery["outcome"], delivery["status"]) == ("delivered", 200)
        [accepted] = sandbox.accepted(platform)
        assert accepted["token"] == token
        assert accepted["provider_id"] == delivery["provider_message_id"]
        assert delivery["device_id"] == f"{platform}-device"


def dead_token(platform: str, sandbox: SandboxProcess) -> str:
    """A token the sandbox answers as dead (410, UNREGISTERED, 410)."""
    if platform == "apns":
        return "dead0000" + uuid.uuid4().hex + uuid.uuid4().hex[:24]
    if platform == "fcm":
        return f"unregistered-{uuid.uuid4().hex}"
    return sandbox.wns_channel(APPS["wns"], scenario="expired")


@pytest.mark.parametrize("platform", ["apns", "fcm", "wns"])
async def test_a_dead_token_is_invalidated_in_the_table(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess, platform: str
) -> None:
    """A dead token would be pushed forever, its app never asked to register again."""
    user, nid = f"u-{uuid.uuid4().hex[:8]}", f"n-{uuid.uuid4().hex[:8]}"
    token = dead_token(platform, sandbox)
    register = {
        "type": "register",
        "user_id": user,
        "device_id": "dead-device",
        "platform": platform,
        "token": token,
        "app": APPS[platform],
        "event_time": datetime.now(UTC).isoformat(),
    }
    await kafka.produce(pipeline.topic(topics.REGISTRATIONS), [(user, register)])
    await wait_consumed(pipeline)

    await notify(pipeline, user, {"id": nid, "title": "Anyone there?"})
    [delivery] = await deliveries(pipeline, nid, 1)
    assert (delivery["platform"], delivery["outcome"]) == (platform, "invalid_token")

    def types(records: list[Message]) -> set[str]:
        return {r.value["type"] for r in records if r.key == user}

    await wait_for(
        pipeline,
        topics.TOKEN_EVENTS,
        lambda rs: {"invalidated", "reregister_requested"} <= types(rs),
    )
    await wait_consumed(pipeline)
    table = await read_table(pipeline, "devices")
    [device] = table[user]["devices"]
    assert (device["device_id"], device["token"], device["state"]) == (
        "dead-device",
        token,
        "invalid",
    )

    again = f"n-{uuid.uuid4().hex[:8]}"
    await notify(pipeline, user, {"id": again, "title": "Still there?"})
    [dropped] = await deliveries(pipeline, again, 1)
    assert (dropped["outcome"], dropped["reason"]) == ("dropped", "no_devices")


async def test_an_fcm_quota_burst_ends_delivered_after_retry_after(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A throttled project would lose its pushes, or hammer FCM before Retry-After."""
    user, nid = f"u-{uuid.uuid4().hex[:8]}", f"n-{uuid.uuid4().hex[:8]}"
    sandbox.scenario(platform="fcm", settings={"quota_failures": 2})
    register = {
        "type": "register",
        "user_id": user,
        "device_id": "tablet",
        "platform": "fcm",
        "token": f"quota-{uuid.uuid4().hex}",
        "app": APPS["fcm"],
        "event_time": datetime.now(UTC).isoformat(),
    }
    await kafka.produce(pipeline.topic(topics.REGISTRATIONS), [(user, register)])
    await wait_consumed(pipeline)

    await notify(pipeline, user, {"id": nid, "title": "Busy"})
    [delivery] = await deliveries(pipeline, nid, 1)

    assert (delivery["outcome"], delivery["attempts"]) == ("delivered", 3)
    retries = [
        r.value
        for r in await read_all(pipeline, pipeline.topic(topics.RETRIES))
        if r.value["send"]["notification_id"] == nid
    ]
    assert [r["status"] for r in retries] == [429, 429]
    assert sandbox.stats()["fcm"]["statuses"] == {"429": 2, "200": 1}
    # The sandbox asks for one second; the worker's own backoff is 0.05 s.
    assert delivery["completed_at_ms"] - delivery["accepted_at_ms"] >= 2000
