"""End-to-end measurements through a real broker, worker and sandbox.

Used by ``bench/run.py``. Everything here talks to Kafka like an upstream
service and an analytics reader would:

- :func:`register` bulk-produces the registrations of ``users`` users with
  ``devices`` devices each (APNs, FCM and WNS tokens the sandbox delivers to)
  and waits until the worker has applied them;
- :func:`burst` publishes notifications as fast as the producer takes them
  and measures notifications per second, from the first publish to the last
  final outcome on deliveries;
- :func:`steady` publishes at a fixed rate for a while and measures the
  latency of each final outcome;
- :func:`bulk_register` only produces (the memory mode).

A latency is the time from just before ``producer.send`` of a notification
to the moment this process's consumer of deliveries receives the final
outcome of one of its sends (the delivery's key is the notification id, so
no value needs parsing). Both clocks are this machine's wall clock.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pushstream import localstack, topics
from pushstream.config import Settings
from pushstream.events import Platform

REGISTERED_WITHIN_S = 1800.0
DRAIN_WITHIN_S = 300.0
TICK_S = 0.01  # the steady publisher's step
STAGES = ("to router", "router to request", "request", "to this reader")

ChannelMaker = Callable[[str, str], str]


@dataclass(frozen=True)
class Mix:
    """The share of devices on each platform, and the apps they belong to."""

    shares: dict[Platform, float]
    apps: dict[Platform, tuple[str, ...]]

    def platforms(self, count: int, rng: random.Random) -> list[Platform]:
        """``count`` platforms in these shares, shuffled."""
        result: list[Platform] = []
        for platform, share in self.shares.items():
            result += [platform] * round(count * share)
        while len(result) < count:
            result.append(next(iter(self.shares)))
        rng.shuffle(result)
        return result[:count]


def parse_mix(text: str) -> dict[Platform, float]:
    """``apns=0.5,fcm=0.35,wns=0.15`` -> shares that sum to 1."""
    shares: dict[Platform, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in ("apns", "fcm", "wns"):
            raise ValueError(f"unknown platform {name!r} in the mix")
        shares[name] = float(value)  # type: ignore[index]  # checked just above
    total = sum(shares.values())
    return {p: share / total for p, share in shares.items() if share > 0}


# --- registrations --------------------------------------------------------------


def registrations(
    users: int,
    devices: int,
    mix: Mix,
    channel: ChannelMaker,
    seed: int = 1,
) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every registration: ``devices`` per user."""
    rng = random.Random(seed)
    at = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    kinds = mix.platforms(users * devices, rng)
    for index, platform in enumerate(kinds):
        user = user_id(index // devices)
        apps = mix.apps[platform]
        app = apps[index % len(apps)]
        if platform == "apns":
            # "e": no sandbox scenario prefix starts with it (they all deliver)
            token = f"e{rng.getrandbits(252):063x}"
        elif platform == "fcm":
            token = f"bench{index:011d}:APA91b" + "x" * 120
        else:
            token = channel(app, "ok")
        event = {
            "type": "register",
            "user_id": user,
            "device_id": f"d{index}",
            "platform": platform,
            "token": token,
            "app": app,
            "event_time": at,
        }
        yield user.encode(), json.dumps(event, separators=(",", ":")).encode()


def user_id(index: int) -> str:
    return f"u{index:08d}"


async def bulk_produce(
    settings: Settings, topic: str, records: Iterator[tuple[bytes, bytes]]
) -> int:
    """Produce records as fast as the producer takes them; returns how many."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=20,
        max_batch_size=256 * 1024,
        acks=1,
        **topics.kafka_security(settings),
    )
    await producer.start()
    count = 0
    try:
        pending = []
        for key, value in records:
            pending.append(await producer.send(topic, value, key=key))
            count += 1
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return count


async def register(
    settings: Settings,
    records: Iterator[tuple[bytes, bytes]],
) -> tuple[int, float]:
    """Publish registrations, wait until the worker applied them; (count, s)."""
    began = time.monotonic()
    count = await bulk_produce(settings, settings.topic(topics.REGISTRATIONS), records)
    await localstack.wait_consumed(
        settings,
        (topics.REGISTRATIONS, topics.TOKEN_OWNERS, topics.TOKEN_EVENTS),
        within=REGISTERED_WITHIN_S,
    )
    return count, time.monotonic() - began


# --- notifications ----------------------------------------------------------------


def notification(nid: str, number: int) -> bytes:
    """A typical notification: title, body, a little data."""
    value = {
        "id": nid,
        "title": "Your order has shipped",
        "body": f"Order #{10_000 + number % 90_000} is on its way.",
        "data": {"order_id": str(number), "screen": "orders"},
    }
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass
class Run:
    """One measured phase: what was published, and what came back when."""

    name: str
    expected_per_notification: int
    published: dict[str, float] = field(default_factory=dict)
    first_publish: float = 0.0
    last_publish: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    last_outcome: float = 0.0
    received: int = 0
    # Where the time goes, from every tenth delivery: publish -> routed,
    # routed -> request made, request -> answer, answer -> received here.
    stages_ms: dict[str, list[float]] = field(
        default_factory=lambda: {s: [] for s in STAGES}
    )

    @property
    def expected(self) -> int:
        return len(self.published) * self.expected_per_notification

    @property
    def notifications_per_s(self) -> float:
        span = self.last_outcome - self.first_publish
        return len(self.published) / span if span > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Deliveries:
    """A reader of the deliveries topic that times each final outcome."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.run: Run | None = None
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._delivered = b'"outcome":"delivered"'

    async def start(self) -> None:
        tps = await localstack.partitions(self.settings, (topics.DELIVERIES,))
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=10,
            **topics.kafka_security(self.settings),
        )
        await self._consumer.start()
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            now = time.time()
            run = self.run
            if run is None:
                continue
            for records in batch.values():
                for record in records:
                    published = run.published.get(record.key.decode())
                    if published is None:
                        continue
                    run.received += 1
                    run.latencies_ms.append((now - published) * 1000)
                    delivered = self._delivered in record.value
                    run.outcomes["delivered" if delivered else _outcome(record)] += 1
                    run.last_outcome = now
                    if run.received % 10 == 0:
                        _stages(run, json.loads(record.value), published, now)

    async def wait_drained(self, run: Run, within: float = DRAIN_WITHIN_S) -> bool:
        """Wait until every expected outcome arrived; False at the deadline."""
        deadline = time.monotonic() + within
        while run.received < run.expected:
            if self._task is not None and self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


def _stages(run: Run, delivery: dict[str, Any], published: float, now: float) -> None:
    if "accepted_at_ms" not in delivery:
        return
    accepted = delivery["accepted_at_ms"]
    sent = delivery.get("sent_at_ms") or accepted
    completed = delivery["completed_at_ms"]
    spans = (
        accepted - published * 1000,
        sent - accepted,
        completed - sent,
        now * 1000 - completed,
    )
    for stage, span in zip(STAGES, spans, strict=True):
        run.stages_ms[stage].append(span)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def _outcome(record: Any) -> str:
    outcome: str = json.loads(record.value).get("outcome", "?")
    return outcome


def _producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=5,
        acks=1,
        **topics.kafka_security(settings),
    )


async def burst(
    settings: Settings,
    reader: Deliveries,
    name: str,
    count: int,
    users: int,
    per_notification: int,
) -> Run:
    """``count`` notifications as fast as possible, spread over the users."""
    run = Run(name, per_notification)
    reader.run = run
    topic = settings.topic(topics.NOTIFICATIONS)
    values = [
        (user_id(i % users).encode(), f"{name}-{i}", notification(f"{name}-{i}", i))
        for i in range(count)
    ]
    producer = _producer(settings)
    await producer.start()
    try:
        pending = []
        run.first_publish = time.time()
        for key, nid, value in values:
            run.published[nid] = time.time()
            pending.append(await producer.send(topic, value, key=key))
        run.last_publish = time.time()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    await reader.wait_drained(run)
    return run


async def steady(
    settings: Settings,
    reader: Deliveries,
    name: str,
    rate: float,
    seconds: float,
    users: int,
    per_notification: int,
) -> Run:
    """``rate`` notifications per second for ``seconds``, on a fixed schedule."""
    run = Run(name, per_notification)
    reader.run = run
    topic = settings.topic(topics.NOTIFICATIONS)
    total = int(rate * seconds)
    producer = _producer(settings)
    await producer.start()
    try:
        pending = []
        began = run.first_publish = time.time()
        for i in range(total):
            due = began + i / rate
            delay = due - time.time()
            if delay > TICK_S:
                await asyncio.sleep(delay)
            nid = f"{name}-{i}"
            run.published[nid] = time.time()
            key = user_id(i % users).encode()
            pending.append(await producer.send(topic, notification(nid, i), key=key))
        run.last_publish = time.time()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    await reader.wait_drained(run)
    return run


def summary(runs: Sequence[Run]) -> list[str]:
    """One table line per phase."""
    lines = [
        f"  {'phase':<22}{'notif.':>8}{'outcomes':>10}{'notif./s':>10}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  not delivered"
    ]
    for run in runs:
        others = {k: v for k, v in run.outcomes.items() if k != "delivered"}
        missing = run.expected - run.received
        if missing:
            others["missing"] = missing
        lines.append(
            f"  {run.name:<22}{len(run.published):>8}{run.received:>10}"
            f"{run.notifications_per_s:>10,.0f}{run.percentile(0.5):>9.0f}"
            f"{run.percentile(0.99):>9.0f}{run.percentile(1.0):>9.0f}  "
            f"{others or '-'}"
        )
    lines.append("  median time per stage (ms): " + ", ".join(STAGES))
    for run in runs:
        spans = "".join(f"{median(run.stages_ms[s]):>10.0f}" for s in STAGES)
        lines.append(f"  {run.name:<22}{spans}")
    return lines
