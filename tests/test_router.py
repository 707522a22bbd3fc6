"""The router end to end: a real worker, a real broker, RocksDB tables.

One ``pushstream worker`` (4 partitions) serves the whole module; every test
uses its own user and notification ids, publishes registrations and
notifications, waits until the worker's group has consumed them (so every
effect is in Kafka), and reads sends, deliveries and dead letters back.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka.partitioner import murmur2
from conftest import Kafka, module_topics
from workerproc import Message, WorkerProcess, read_all, wait_consumed

from pushstream import localstack, router, topics
from pushstream.config import Settings
from pushstream.events import device_id_for_token

pytestmark = pytest.mark.kafka

PARTITIONS = 4
DEDUP_WINDOW_S = 3600
ROUTER_REASONS = {
    router.EXPIRED,
    router.NO_DEVICES,
    router.FILTERED,
    router.PAYLOAD_TOO_LARGE,
    router.RENDER_FAILED,
    router.ALREADY_SENT,
}
INPUTS = (
    topics.REGISTRATIONS,
    topics.TOKEN_EVENTS,
    topics.TOKEN_OWNERS,
    topics.NOTIFICATIONS,
)


def apns_token(n: int) -> str:
    return f"{n:064x}"


def fcm_token(n: int) -> str:
    return f"fcm-token-{n:08d}:APA91b" + "x" * 40


def wns_token(n: int) -> str:
    return f"https://db3.notify.windows.com/?token=AwYAAAB{n:08d}secret"


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def partition_of(key: str) -> int:
    """The partition Kafka's default partitioner picks for a key."""
    hashed: int = murmur2(key.encode())
    return (hashed & 0x7FFFFFFF) % PARTITIONS


class Pipeline:
    """Publishes to the module's worker and reads what it published."""

    def __init__(self, kafka: Kafka, settings: Settings) -> None:
        self.kafka = kafka
        self.settings = settings

    def topic(self, name: str) -> str:
        return self.settings.topic(name)

    async def register(self, user: str, devices: dict[str, tuple[str, str]]) -> None:
        """Register devices: device id -> (platform, token), one app per platform."""
        apps = {"apns": "com.example", "fcm": "example-project", "wns": "Example.App"}
        now = datetime.now(UTC)
        records = []
        for i, (device, (platform, token)) in enumerate(devices.items()):
            value = {
                "type": "register",
                "user_id": user,
                "device_id": device,
                "platform": platform,
                "token": token,
                "app": apps[platform],
                "event_time": (now + timedelta(milliseconds=i)).isoformat(),
            }
            records.append((user, value))
        await self.kafka.produce(self.topic(topics.REGISTRATIONS), records)
        await self.settled()

    async def notify(
        self, key: str | bytes | None, value: Any, *, published_ms: int | None = None
    ) -> None:
        """Publish one notification record (value: JSON-able, or raw bytes)."""
        from aiokafka import AIOKafkaProducer

        raw = value if value is None or isinstance(value, bytes) else _json(value)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap, acks="all"
        )
        await producer.start()
        try:
            await producer.send_and_wait(
                self.topic(topics.NOTIFICATIONS),
                raw,
                key=key.encode() if isinstance(key, str) else key,
                timestamp_ms=published_ms,
            )
        finally:
            await producer.stop()

    async def settled(self) -> None:
        await wait_consumed(self.settings, INPUTS)

    async def sends(self, notification_id: str) -> dict[str, list[Message]]:
        """platform -> the sends of one notification on sends.<platform>."""
        found = {}
        for platform in ("apns", "fcm", "wns"):
            got = await read_all(self.settings, self.topic(f"sends.{platform}"))
            found[platform] = [
                m for m in got if m.value["notification_id"] == notification_id
            ]
        return found

    async def all_sends(self, notification_id: str) -> list[dict[str, Any]]:
        by_platform = await self.sends(notification_id)
        return [m.value for messages in by_platform.values() for m in messages]

    async def outcomes(self, notification_id: str) -> list[dict[str, Any]]:
        """The router's own deliveries for one notification."""
        got = await read_all(self.settings, self.topic(topics.DELIVERIES))
        return [
            m.value
            for m in got
            if m.key == notification_id and m.value["reason"] in ROUTER_REASONS
        ]

    async def dead_letters(self, user: str) -> list[dict[str, Any]]:
        got = await read_all(self.settings, self.topic(topics.DEAD_LETTERS))
        return [m.value for m in got if m.key == user]


@pytest.fixture(scope="module")
def pipeline(
    kafka: Kafka, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    """One worker with the router for the whole module; its topics go afterwards."""
    folder = tmp_path_factory.mktemp("router")
    with module_topics(kafka, folder, "router", partitions=PARTITIONS) as settings:
        env = localstack.worker_env(
            settings, PUSHSTREAM_DEDUP_WINDOW_S=str(DEDUP_WINDOW_S)
        )
        with WorkerProcess(env, log_path=folder / "worker.log") as worker:
            yield Pipeline(kafka, settings)
            assert worker.stop() == 0


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def note(notification_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": notification_id, "title": "Hello", "body": "World", **fields}


THREE = {
    "phone": ("apns", apns_token(1)),
    "tablet": ("fcm", fcm_token(2)),
    "laptop": ("wns", wns_token(3)),
}


# --- sends ----------------------------------------------------------------------


async def test_three_devices_on_three_platforms_get_three_sends(
    pipeline: Pipeline,
) -> None:
    """A user's device on one of the platforms would not get the notification."""
    user, nid = unique("ann"), unique("n")
    await pipeline.register(user, THREE)

    await pipeline.notify(user, note(nid))
    await pipeline.settled()
    sends = await pipeline.sends(nid)

    assert {p: [m.key for m in ms] for p, ms in sends.items()} == {
        "apns": [f"{nid}:phone"],
        "fcm": [f"{nid}:tablet"],
        "wns": [f"{nid}:laptop"],
    }
    apns = sends["apns"][0].value
    assert (apns["user_id"], apns["token"], apns["app"]) == (
        user,
        apns_token(1),
        "com.example",
    )
    assert json.loads(apns["body"])["aps"]["alert"] == {
        "title": "Hello",
        "body": "World",
    }
    assert apns["headers"]["apns-topic"] == "com.example"
    assert "authorization" not in {h.lower() for h in apns["headers"]}
    fcm = json.loads(sends["fcm"][0].value["body"])
    assert fcm["message"]["token"] == fcm_token(2)
    assert sends["wns"][0].value["token"] == wns_token(3)
    assert await pipeline.outcomes(nid) == []


async def test_the_same_notification_twice_sends_once_and_reports_duplicates(
    pipeline: Pipeline,
) -> None:
    """A notification published twice would reach every device twice."""
    user, nid = unique("bea"), unique("n")
    await pipeline.register(user, THREE)

    await pipeline.notify(user, note(nid))
    await pipeline.notify(user, note(nid))
    await pipeline.settled()

    assert sorted(s["send_id"] for s in await pipeline.all_sends(nid)) == [
        f"{nid}:laptop",
        f"{nid}:phone",
        f"{nid}:tablet",
    ]
    duplicates = await pipeline.outcomes(nid)
    assert sorted((d["outcome"], d["send_id"]) for d in duplicates) == [
        ("duplicate", f"{nid}:laptop"),
        ("duplicate", f"{nid}:phone"),
        ("duplicate", f"{nid}:tablet"),
    ]
    assert {d["reason"] for d in duplicates} == {"already_sent"}


async def test_rotated_token_gets_the_notification_and_the_old_one_not(
    pipeline: Pipeline,
) -> None:
    """A push would go to a token the app has already replaced."""
    user, nid = unique("cem"), unique("n")
    await pipeline.register(user, {"phone": ("apns", apns_token(10))})
    await pipeline.register(user, {"phone": ("apns", apns_token(11))})

    await pipeline.notify(user, note(nid))
    await pipeline.settled()

    sends = await pipeline.all_sends(nid)
    assert [(s["device_id"], s["token"]) for s in sends] == [("phone", apns_token(11))]


async def test_unkeyed_notification_for_a_user_is_rekeyed_and_sent(
    pipeline: Pipeline,
) -> None:
    """A notification published without a key would miss the user's devices."""
    user, nid = unique("dee"), unique("n")
    await pipeline.register(user, {"tablet": ("fcm", fcm_token(40))})

    await pipeline.notify(None, note(nid, user_id=user))
    await pipeline.settled()

    sends = await pipeline.all_sends(nid)
    assert [(s["user_id"], s["token"]) for s in sends] == [(user, fcm_token(40))]


async def test_raw_tokens_are_sent_without_a_lookup_and_deduplicated(
    pipeline: Pipeline,
) -> None:
    """Pushes to raw tokens would need a registration, or repeat when re-published."""
    nid = unique("n")
    value = note(
        nid,
        tokens=[
            {"platform": "apns", "token": apns_token(20).upper(), "app": "com.x"},
            {"platform": "fcm", "token": fcm_token(21), "app": "x-project"},
        ],
    )

    await pipeline.notify("campaign", value)
    await pipeline.notify("campaign", value)
    await pipeline.settled()

    sends = await pipeline.all_sends(nid)
    assert sorted((s["platform"], s["device_id"], s["token"]) for s in sends) == [
        ("apns", device_id_for_token(apns_token(20)), apns_token(20)),
        ("fcm", device_id_for_token(fcm_token(21)), fcm_token(21)),
    ]
    assert "user_id" not in sends[0]
    assert sorted(d["outcome"] for d in await pipeline.outcomes(nid)) == [
        "duplicate",
        "duplicate",
    ]


async def test_audience_reaches_users_on_every_partition(pipeline: Pipeline) -> None:
    """Audience members whose devices live on other partitions would get nothing."""
    base, nid = unique("aud"), unique("n")
    users: dict[int, str] = {}
    i = 0
    while len(users) < PARTITIONS:
        users.setdefault(partition_of(f"{base}-{i}"), f"{base}-{i}")
        i += 1
    tokens = {user: fcm_token(100 + n) for n, user in enumerate(users.values())}
    for user, token in tokens.items():
        await pipeline.register(user, {"tablet": ("fcm", token)})

    await pipeline.notify("campaign", note(nid, audience=[*users.values(), "nobody"]))
    await pipeline.settled()

    sends = (await pipeline.sends(nid))["fcm"]
    assert {m.value["user_id"]: m.value["token"] for m in sends} == tokens
    assert len(sends) == len(tokens)
    copies = [
        m
        for m in await read_all(pipeline.settings, pipeline.topic("notifications"))
        if m.value and m.value.get("id") == nid and "user_id" in m.value
    ]
    assert {m.key: m.partition for m in copies if m.key in users.values()} == {
        user: partition for partition, user in users.items()
    }
    [dropped] = await pipeline.outcomes(nid)
    assert (dropped["outcome"], dropped["user_id"]) == ("dropped", "nobody")


# --- outcomes without a send ----------------------------------------------------


async def test_user_without_devices_is_dropped_with_no_devices(
    pipeline: Pipeline,
) -> None:
    """A notification to a user without devices would vanish without a trace."""
    user, nid = unique("dan"), unique("n")

    await pipeline.notify(user, note(nid))
    await pipeline.settled()

    [delivery] = await pipeline.outcomes(nid)
    assert (delivery["outcome"], delivery["reason"], delivery["user_id"]) == (
        "dropped",
        "no_devices",
        user,
    )
    assert await pipeline.all_sends(nid) == []


async def test_filters_that_exclude_every_device_drop_it_as_filtered(
    pipeline: Pipeline,
) -> None:
    """A notification filtered away entirely would look like a user without devices."""
    user, nid, partly = unique("eve"), unique("n"), unique("n")
    await pipeline.register(user, THREE)

    await pipeline.notify(user, note(nid, platforms=["apns"], apps=["other.app"]))
    await pipeline.notify(user, note(partly, platforms=["wns", "fcm"]))
    await pipeline.settled()

    assert [(d["outcome"], d["reason"]) for d in await pipeline.outcomes(nid)] == [
        ("dropped", "filtered")
    ]
    assert await pipeline.all_sends(nid) == []
    assert sorted(s["platform"] for s in await pipeline.all_sends(partly)) == [
        "fcm",
        "wns",
    ]
    assert await pipeline.outcomes(partly) == []


async def test_expired_before_routing_is_not_sent(pipeline: Pipeline) -> None:
    """A notification past its expiry would still be pushed to the user."""
    user = unique("fay")
    by_ttl, by_time = unique("n"), unique("n")
    await pipeline.register(user, THREE)
    two_minutes_ago = int(time.time() * 1000) - 120_000
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()

    await pipeline.notify(user, note(by_ttl, ttl=60), published_ms=two_minutes_ago)
    await pipeline.notify(user, note(by_time, expires_at=past))
    await pipeline.settled()

    for nid in (by_ttl, by_time):
        assert [(d["outcome"], d["user_id"]) for d in await pipeline.outcomes(nid)] == [
            ("expired", user)
        ]
        assert await pipeline.all_sends(nid) == []


async def test_too_large_for_the_provider_is_rejected_per_device(
    pipeline: Pipeline,
) -> None:
    """An oversized push would be sent only to be refused by the provider."""
    user, nid = unique("gus"), unique("n")
    await pipeline.register(user, THREE)

    await pipeline.notify(user, note(nid, body="x" * 6000))
    await pipeline.settled()

    rejected = await pipeline.outcomes(nid)
    assert sorted((d["outcome"], d["reason"], d["device_id"]) for d in rejected) == [
        ("rejected", "payload_too_large", "laptop"),
        ("rejected", "payload_too_large", "phone"),
        ("rejected", "payload_too_large", "tablet"),
    ]
    assert await pipeline.all_sends(nid) == []


async def test_bad_notifications_go_to_dead_letters_and_the_stream_goes_on(
    pipeline: Pipeline,
) -> None:
    """One malformed notification would stop every notification after it."""
    user, nid = unique("hal"), unique("n")
    await pipeline.register(user, {"tablet": ("fcm", fcm_token(30))})

    await pipeline.notify(user, b"{not json")
    await pipeline.notify(user, note("x", colour="red"))
    await pipeline.notify(user, note("y", user_id="someone-else"))
    await pipeline.notify(user, None)
    await pipeline.notify(user, note(nid))
    await pipeline.settled()

    letters = await pipeline.dead_letters(user)
    assert [d["stage"] for d in letters] == ["router"] * 4
    assert [d["source_topic"] for d in letters] == [pipeline.topic("notifications")] * 4
    assert "Invalid JSON" in letters[0]["error"]
    assert letters[0]["value"] == "{not json"
    assert "colour: Extra inputs are not permitted" in letters[1]["error"]
    assert "differ" in letters[2]["error"]
    assert "no value" in letters[3]["error"]
    assert [s["token"] for s in await pipeline.all_sends(nid)] == [fcm_token(30)]


async def test_notifications_with_illegal_apns_headers_go_to_dead_letters(
    pipeline: Pipeline,
) -> None:
    """An injected header would reach APNs and close the connection under all pushes."""
    user, nid = unique("ida"), unique("n")
    await pipeline.register(user, {"phone": ("apns", apns_token(40))})

    injected = {"apns": {"headers": {"x\r\ninjected": "1"}}}
    await pipeline.notify(user, note(unique("n"), **injected))
    other_app = {"apns": {"headers": {"apns-topic": "com.example.other"}}}
    await pipeline.notify(user, note(unique("n"), **other_app))
    await pipeline.notify(user, note(nid))
    await pipeline.settled()

    letters = await pipeline.dead_letters(user)
    assert [d["stage"] for d in letters] == ["router"] * 2
    assert letters[0]["error"].startswith("apns.headers: ")
    assert "'x\\r\\ninjected'" in letters[0]["error"]
    assert "apns-topic" in letters[1]["error"]
    assert [s["token"] for s in await pipeline.all_sends(nid)] == [apns_token(40)]


# --- the dedup table --------------------------------------------------------------


async def test_dedup_changelog_forgets_after_the_window(pipeline: Pipeline) -> None:
    """The dedup table's changelog would grow for ever, or forget too soon."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    changelog = f"{pipeline.settings.app_id}-routed-changelog"
    admin = topics.admin_client(pipeline.settings)
    await admin.start()
    try:
        [described] = await admin.describe_topics([changelog])
        [response] = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, changelog)]
        )
    finally:
        await admin.close()
    [resource] = response.to_object()["resources"]
    config = {e["config_names"]: e["config_value"] for e in resource["config_entries"]}

    assert len(described["partitions"]) == PARTITIONS
    assert config["cleanup.policy"] == "compact,delete"
    assert config["retention.ms"] == str(DEDUP_WINDOW_S * 1000)
