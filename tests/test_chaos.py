"""Delivery guarantees on a bad day: a worker killed, stopped, or cut off from Kafka.

Short versions of ``bench/chaos.py``: users with one APNs, one FCM and one
WNS device each (a few slow, throttled once, or dead), a few hundred
notifications published while a real worker runs against the sandbox, and
one act of chaos while outcomes flow. Then, from the deliveries topic and the
sandbox's record of accepted pushes:

- every (notification, device) has a final outcome: nothing is lost;
- no send has two different outcomes, and each has the one its token's
  scenario calls for (duplicate records of the same outcome are allowed: the
  contract is at least once, see docs/limitations.md);
- the sandbox accepted every push reported ``delivered``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import pytest
from aiokafka import AIOKafkaProducer
from sandboxproc import SandboxProcess
from workerproc import WorkerProcess, free_port, read_all, wait_consumed

from pushstream import localkafka, topics
from pushstream.config import Settings
from pushstream.demo_sample import Apps
from pushstream.events import Outcome, Platform

if TYPE_CHECKING:
    from conftest import Kafka, TestNames

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]

USERS = 40
NOTIFICATIONS = 300
PUBLISH_RATE = 60.0  # per second, so that work still flows when chaos strikes
OUTCOMES_WITHIN_S = 120.0
PLATFORMS: tuple[Platform, ...] = ("apns", "fcm", "wns")

# Small numbers: throttled sends are tried again after a second.
WORKER_SETTINGS = {
    "PUSHSTREAM_RETRY_BASE_S": "0.2",
    "PUSHSTREAM_RETRY_MAX_S": "1",
    "PUSHSTREAM_RETRY_MAX_ATTEMPTS": "3",
    "PUSHSTREAM_SHUTDOWN_TIMEOUT_S": "6",
}
SANDBOX_SETTINGS: dict[Platform, dict[str, Any]] = {
    "apns": {"slow_s": 1.0},
    "fcm": {"slow_s": 1.0, "quota_failures": 1, "retry_after_s": 1},
    "wns": {"slow_s": 1.0},
}

# Scenario of the first users' devices; (platform, scenario, outcome).
DEAD: tuple[tuple[Platform, str, Outcome], ...] = (
    ("apns", "unregistered", "invalid_token"),
    ("fcm", "unregistered", "invalid_token"),
    ("wns", "expired", "invalid_token"),
)
LIVE: tuple[tuple[Platform, str, Outcome], ...] = (
    ("apns", "slow", "delivered"),
    ("fcm", "slow", "delivered"),
    ("wns", "slow", "delivered"),
    ("fcm", "quota", "delivered"),  # one 429, then delivered after a retry
) * 2
OK: tuple[Platform, str, Outcome] = ("apns", "ok", "delivered")
APNS_PREFIX = {"ok": "e0", "slow": "1a7e0000", "unregistered": "dead0000"}
NID = re.compile(r"chaos-[0-9a-f]{8}-\d{4}")


@dataclass(frozen=True)
class Device:
    user_id: str
    device_id: str
    platform: Platform
    app: str
    token: str
    outcome: Outcome

    @property
    def push_key(self) -> str:
        """The name the sandbox's accepted record gives this device."""
        if self.platform == "wns":
            return parse_qs(urlsplit(self.token).query)["token"][0]
        return self.token


@dataclass
class Workload:
    """Who is registered, what is published, and which sends must follow."""

    devices: dict[str, list[Device]]
    notifications: list[tuple[str, str]]  # (user id, notification id)

    @property
    def expected(self) -> dict[str, Device]:
        """send id -> device, for every (notification, device)."""
        return {
            f"{nid}:{d.device_id}": d
            for user, nid in self.notifications
            for d in self.devices[user]
        }


def token_for(platform: Platform, scenario: str, app: str, sandbox: Any) -> str:
    if platform == "apns":
        prefix = APNS_PREFIX[scenario]
        return prefix + uuid.uuid4().hex[len(prefix) :] + uuid.uuid4().hex
    if platform == "fcm":
        return f"{scenario}-{uuid.uuid4().hex}:APA91b"
    uri: str = sandbox.wns_channel(app, scenario)
    return uri


def workload(sandbox: SandboxProcess) -> Workload:
    """USERS users with a device per platform; a user with a dead one gets one
    notification (so the sends never depend on when an invalidation lands)."""
    apps = Apps.from_env(sandbox.env)
    special = dict(enumerate(DEAD + LIVE))
    devices: dict[str, list[Device]] = {}
    for i in range(USERS):
        user = f"u{i:03d}"
        devices[user] = []
        for platform in PLATFORMS:
            kind = special.get(i)
            _, scenario, outcome = kind if kind and kind[0] == platform else OK
            app = apps.for_platform(platform)[0]
            token = token_for(platform, scenario, app, sandbox)
            device = Device(user, f"{user}-{platform}", platform, app, token, outcome)
            devices[user].append(device)

    once = [f"u{i:03d}" for i in range(len(DEAD))]
    many = [u for u in devices if u not in once]
    users = once + [many[i % len(many)] for i in range(NOTIFICATIONS - len(once))]
    random.Random(7).shuffle(users)
    tag = uuid.uuid4().hex[:8]
    return Workload(devices, [(u, f"chaos-{tag}-{n:04d}") for n, u in enumerate(users)])


def registrations(load: Workload) -> list[tuple[bytes, bytes]]:
    at = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    return [
        (
            d.user_id.encode(),
            json.dumps(
                {
                    "type": "register",
                    "user_id": d.user_id,
                    "device_id": d.device_id,
                    "platform": d.platform,
                    "token": d.token,
                    "app": d.app,
                    "event_time": at,
                }
            ).encode(),
        )
        for ds in load.devices.values()
        for d in ds
    ]


def notification(nid: str) -> bytes:
    return json.dumps({"id": nid, "title": "Chaos", "body": f"ping {nid}"}).encode()


async def produce(
    settings: Settings,
    name: str,
    records: Sequence[tuple[bytes, bytes]],
    rate: float | None = None,
) -> None:
    """Publish records, at ``rate`` per second if given; idempotent, so a retry
    while the broker restarts adds no second copy."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_idempotence=True,
        request_timeout_ms=120_000,
    )
    await producer.start()
    try:
        began = time.monotonic()
        pending = []
        for i, (key, value) in enumerate(records):
            if rate is not None:
                await asyncio.sleep(max(0.0, began + i / rate - time.monotonic()))
            pending.append(await producer.send(settings.topic(name), value, key=key))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


# --- what came out --------------------------------------------------------------------


async def outcomes(settings: Settings) -> dict[str, list[str]]:
    """send id -> the outcome of each of its delivery records, in order."""
    found: dict[str, list[str]] = defaultdict(list)
    for record in await read_all(settings, settings.topic(topics.DELIVERIES)):
        send_id = record.value.get("send_id")
        if send_id is not None:
            found[send_id].append(record.value["outcome"])
    return found


async def wait_for_outcomes(
    settings: Settings, expected: dict[str, Device], share: float
) -> int:
    """Wait until ``share`` of the expected sends have an outcome; how many do."""
    deadline = time.monotonic() + OUTCOMES_WITHIN_S
    while True:
        done = len(expected.keys() & (await outcomes(settings)).keys())
        if done >= share * len(expected):
            return done
        if time.monotonic() > deadline:
            pytest.fail(
                f"only {done} of {len(expected)} sends have an outcome after "
                f"{OUTCOMES_WITHIN_S:.0f}s: the others are lost or stuck"
            )
        await asyncio.sleep(0.2)


INPUTS = (
    topics.REGISTRATIONS,
    topics.TOKEN_EVENTS,
    topics.TOKEN_OWNERS,
    topics.NOTIFICATIONS,
    topics.RETRIES,
    "sends.apns",
    "sends.fcm",
    "sends.wns",
)


def push_ids(sandbox: SandboxProcess) -> Counter[tuple[str, str]]:
    """(device, notification id) of every push the sandbox accepted, counted."""
    pushes: Counter[tuple[str, str]] = Counter()
    for platform in PLATFORMS:
        for record in sandbox.accepted(platform):
            found = NID.search(record.get("body") or json.dumps(record.get("message")))
            key = record["channel"] if platform == "wns" else record["token"]
            if found is not None:
                pushes[key, found.group(0)] += 1
    return pushes


async def check_nothing_lost(
    settings: Settings, sandbox: SandboxProcess, load: Workload
) -> None:
    """Every send has one final outcome, the right one, and its push if delivered."""
    expected = load.expected
    await wait_for_outcomes(settings, expected, 1.0)
    await wait_consumed(settings, INPUTS, within=OUTCOMES_WITHIN_S)
    found = await outcomes(settings)

    missing = [s for s in expected if not found.get(s)]
    conflicting = {s: found[s] for s in expected if len(set(found.get(s, ()))) > 1}
    wrong = {
        s: (d.outcome, found[s][0])
        for s, d in expected.items()
        if found.get(s) and found[s][0] != d.outcome
    }
    assert not missing, f"{len(missing)} sends without an outcome: {missing[:5]}"
    assert not conflicting, f"sends with different outcomes: {conflicting}"
    assert not wrong, f"(expected, got): {wrong}"

    pushes = push_ids(sandbox)
    unpushed = [
        s
        for s, d in expected.items()
        if d.outcome == "delivered" and not pushes[d.push_key, s.rpartition(":")[0]]
    ]
    assert not unpushed, f"delivered but never accepted: {unpushed[:5]}"


# --- set-up ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    with SandboxProcess(tmp_path_factory.mktemp("sandbox")) as process:
        yield process


@pytest.fixture
def stand_ins(sandbox: SandboxProcess) -> SandboxProcess:
    """The sandbox, reset, with quick slow answers and one 429 per quota token."""
    sandbox.reset()
    for platform, knobs in SANDBOX_SETTINGS.items():
        sandbox.scenario(platform=platform, settings=knobs)
    return sandbox


def environment(settings: Settings, sandbox: SandboxProcess) -> dict[str, str]:
    return {
        **os.environ,
        **sandbox.env,
        **WORKER_SETTINGS,
        "PUSHSTREAM_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "PUSHSTREAM_TOPIC_PREFIX": settings.topic_prefix,
        "PUSHSTREAM_APP_ID": settings.app_id,
        "PUSHSTREAM_DATA_DIR": str(settings.data_dir),
        "PUSHSTREAM_PARTITIONS": str(settings.partitions),
        "PUSHSTREAM_SEND_PARTITIONS": str(settings.send_partitions),
    }


async def registered(
    settings: Settings, sandbox: SandboxProcess, worker: WorkerProcess
) -> Workload:
    """Register the workload's devices and wait until the worker applied them."""
    load = await asyncio.to_thread(workload, sandbox)
    await produce(settings, topics.REGISTRATIONS, registrations(load))
    await wait_consumed(
        settings, (topics.REGISTRATIONS, topics.TOKEN_OWNERS, topics.TOKEN_EVENTS)
    )
    assert worker.running, worker.log_tail()
    return load


async def mid_flow(settings: Settings, load: Workload) -> None:
    """Return once a fifth of the sends have an outcome, and not all of them."""
    done = await wait_for_outcomes(settings, load.expected, 0.2)
    assert done < len(load.expected), "the chaos would come after the work"


def publishing(settings: Settings, load: Workload) -> asyncio.Task[None]:
    records = [(u.encode(), notification(nid)) for u, nid in load.notifications]
    return asyncio.create_task(
        produce(settings, topics.NOTIFICATIONS, records, rate=PUBLISH_RATE)
    )


# --- the tests ------------------------------------------------------------------------


async def test_kill_9_while_sending_loses_nothing(
    kafka: Kafka, settings: Settings, stand_ins: SandboxProcess, tmp_path: Path
) -> None:
    """A worker killed mid-flow would lose pushes or report a send two ways."""
    await kafka.create_topics(settings)
    env = environment(settings, stand_ins)
    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        load = await registered(settings, stand_ins, worker)
        publisher = publishing(settings, load)
        await mid_flow(settings, load)
        worker.kill()

        await asyncio.to_thread(worker.start)
        await publisher
        await check_nothing_lost(settings, stand_ins, load)


async def test_sigterm_while_sending_exits_0_and_loses_nothing(
    kafka: Kafka, settings: Settings, stand_ins: SandboxProcess, tmp_path: Path
) -> None:
    """Stopping a worker mid-flow (a deploy) would fail, hang, or lose pushes."""
    await kafka.create_topics(settings)
    env = environment(settings, stand_ins)
    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        load = await registered(settings, stand_ins, worker)
        publisher = publishing(settings, load)
        await mid_flow(settings, load)
        assert await asyncio.to_thread(worker.stop) == 0

        await asyncio.to_thread(worker.start)
        await publisher
        await check_nothing_lost(settings, stand_ins, load)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[localkafka.LocalKafka]:
    """A broker of this test's own (port, data folder): it may be stopped."""
    broker = localkafka.LocalKafka.from_env(
        port=free_port(), data_dir=tmp_path / "kafka"
    )
    localkafka.up(broker)
    try:
        yield broker
    finally:
        localkafka.down(broker)


async def test_broker_restart_the_worker_reconnects_and_loses_nothing(
    names: TestNames,
    private_broker: localkafka.LocalKafka,
    stand_ins: SandboxProcess,
    tmp_path: Path,
) -> None:
    """A broker restart would kill the worker, stall it, or lose pushes."""
    settings = Settings(
        kafka_bootstrap=private_broker.bootstrap,
        topic_prefix=names.topic_prefix,
        app_id=names.app_id,
        data_dir=tmp_path / "worker",
    )
    assert (await topics.ensure_topics(settings)).ok
    env = environment(settings, stand_ins)
    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        load = await registered(settings, stand_ins, worker)
        pid = worker.pid
        publisher = publishing(settings, load)
        await mid_flow(settings, load)

        await asyncio.to_thread(localkafka.down, private_broker)
        await asyncio.sleep(3)
        await asyncio.to_thread(localkafka.up, private_broker)

        await publisher
        await check_nothing_lost(settings, stand_ins, load)
        assert worker.running, "the worker died when the broker went away"
        assert worker.pid == pid
        assert worker.stop() == 0
