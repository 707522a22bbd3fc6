"""Delivery guarantees on a bad day: a worker killed, stopped, or cut off from Kafka.

Short versions of ``bench/chaos.py``: users with one APNs, one FCM and one
WNS device each (a few slow, throttled once, or dead), a few hundred
notifications published while a real worker runs against the sandbox, and
one act of chaos while outcomes flow. Then :mod:`pushstream.chaos_audit`
checks, from the deliveries topic and the sandbox's record of accepted pushes:

- every (notification, device) has a final outcome: nothing is lost;
- no send has two different outcomes, and each has the one its token's
  scenario calls for (duplicate records of the same outcome are allowed: the
  contract is at least once, see docs/limitations.md);
- the sandbox accepted every push reported ``delivered``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from aiokafka import AIOKafkaProducer
from sandboxproc import SandboxProcess
from workerproc import WorkerProcess, read_all, wait_consumed

from pushstream import localkafka, localstack, topics
from pushstream.chaos_audit import (
    WORKER_INPUTS,
    Device,
    Planned,
    Population,
    audit,
    expected_sends,
    plan,
    registrations,
)
from pushstream.config import Settings
from pushstream.demo_sample import Apps
from pushstream.events import Outcome, Platform

if TYPE_CHECKING:
    from conftest import Kafka

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(240)]
T = TypeVar("T")

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


@dataclass
class Workload:
    """Who is registered, what is published, and which sends must follow."""

    population: Population
    notifications: list[Planned]

    @property
    def expected(self) -> dict[str, Device]:
        """send id -> device, for every (notification, device)."""
        return expected_sends(self.population, self.notifications)


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
    devices: dict[str, tuple[Device, ...]] = {}
    for i in range(USERS):
        user = f"u{i:03d}"
        mine = []
        for platform in PLATFORMS:
            kind = special.get(i)
            _, scenario, outcome = kind if kind and kind[0] == platform else OK
            app = apps.for_platform(platform)[0]
            token = token_for(platform, scenario, app, sandbox)
            mine.append(
                Device(user, f"{user}-{platform}", platform, app, token, outcome)
            )
        devices[user] = tuple(mine)
    population = Population(devices)
    notifications = plan(population, NOTIFICATIONS, uuid.uuid4().hex[:8])
    return Workload(population, notifications)


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


async def check_nothing_lost(
    settings: Settings, sandbox: SandboxProcess, load: Workload
) -> None:
    """Every send has one final outcome, the right one, and its push if delivered."""
    expected = load.expected
    await wait_for_outcomes(settings, expected, 1.0)
    await wait_consumed(settings, WORKER_INPUTS, within=OUTCOMES_WITHIN_S)
    records = await read_all(settings, settings.topic(topics.DELIVERIES))
    accepted = [push for p in PLATFORMS for push in sandbox.accepted(p)]

    found = audit(expected, [r.value for r in records], accepted)

    missing, unpushed = found.missing, found.pushes_missing
    assert not missing, f"{len(missing)} sends without an outcome: {missing[:5]}"
    assert not found.conflicting, f"sends with different outcomes: {found.conflicting}"
    assert not found.wrong, f"(expected, got): {found.wrong}"
    assert not unpushed, f"delivered but never accepted: {unpushed[:5]}"


# --- set-up ---------------------------------------------------------------------------


@pytest.fixture
def stand_ins(sandbox: SandboxProcess) -> SandboxProcess:
    """The sandbox, reset, with quick slow answers and one 429 per quota token."""
    sandbox.reset()
    for platform, knobs in SANDBOX_SETTINGS.items():
        sandbox.scenario(platform=platform, settings=knobs)
    return sandbox


def environment(settings: Settings, sandbox: SandboxProcess) -> dict[str, str]:
    return localstack.worker_env(settings, sandbox.env, **WORKER_SETTINGS)


async def registered(
    settings: Settings, sandbox: SandboxProcess, worker: WorkerProcess
) -> Workload:
    """Register the workload's devices and wait until the worker applied them."""
    load = await asyncio.to_thread(workload, sandbox)
    await produce(settings, topics.REGISTRATIONS, registrations(load.population))
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
    records = [(n.key, n.value) for n in load.notifications]
    return asyncio.create_task(
        produce(settings, topics.NOTIFICATIONS, records, rate=PUBLISH_RATE)
    )


async def restarted_mid_flow(
    settings: Settings,
    sandbox: SandboxProcess,
    tmp_path: Path,
    interrupt: Callable[[WorkerProcess], T],
) -> T:
    """Publish a workload, ``interrupt`` the worker once outcomes flow, start it
    again and check that nothing is lost; what ``interrupt`` returned."""
    env = environment(settings, sandbox)
    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        load = await registered(settings, sandbox, worker)
        publisher = publishing(settings, load)
        await mid_flow(settings, load)
        interrupted = await asyncio.to_thread(interrupt, worker)

        await asyncio.to_thread(worker.start)
        await publisher
        await check_nothing_lost(settings, sandbox, load)
    return interrupted


# --- the tests ------------------------------------------------------------------------


async def test_kill_9_while_sending_loses_nothing(
    kafka: Kafka, settings: Settings, stand_ins: SandboxProcess, tmp_path: Path
) -> None:
    """A worker killed mid-flow would lose pushes or report a send two ways."""
    await kafka.create_topics(settings)
    await restarted_mid_flow(settings, stand_ins, tmp_path, WorkerProcess.kill)


async def test_sigterm_while_sending_exits_0_and_loses_nothing(
    kafka: Kafka, settings: Settings, stand_ins: SandboxProcess, tmp_path: Path
) -> None:
    """Stopping a worker mid-flow (a deploy) would fail, hang, or lose pushes."""
    await kafka.create_topics(settings)
    status = await restarted_mid_flow(settings, stand_ins, tmp_path, WorkerProcess.stop)
    assert status == 0


async def test_broker_restart_the_worker_reconnects_and_loses_nothing(
    private_broker: localkafka.LocalKafka,
    private_settings: Settings,
    stand_ins: SandboxProcess,
    tmp_path: Path,
) -> None:
    """A broker restart would kill the worker, stall it, or lose pushes."""
    settings = private_settings
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
