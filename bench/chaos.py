"""Delivery guarantees on a bad day: kill -9, SIGTERM and a broker restart.

Each mode runs on fresh topics, with the sandbox and one real worker:

- ``kill``: ``--kills`` times, at a random moment while outcomes flow, the
  worker gets SIGKILL and is started again at once;
- ``sigterm``: the worker gets SIGTERM while outcomes flow; it must exit 0
  within its ``shutdown_timeout_s`` plus :data:`SIGTERM_MARGIN_S`, and is
  started again;
- ``broker``: a private broker (its own port and data folder; the shared
  one is never touched) is stopped while outcomes flow and started again
  ``--broker-down-s`` later; the same worker process must carry on alone;
- ``all``: the three in turn.

``--users`` users each register one APNs, one FCM and one WNS device; a few
devices are on the sandbox's bad-day scenarios (slow answers, throttling,
dead tokens; :data:`SCENARIOS`). ``--notifications`` notifications are
published at ``--rate`` per second while the chaos happens; a user with a
dead token gets exactly one, so which sends exist never depends on when the
registry applies an invalidation. Once the worker has consumed every input,
the run checks, from the deliveries topic and the sandbox's ``/accepted``:

- every expected (notification, device) has a final outcome (missing: 0);
- no send has two different outcomes, and each has the outcome its token's
  scenario calls for;
- the sandbox accepted every push whose outcome is ``delivered``;
- duplicates, counted: delivery records for a send already reported, and
  pushes the sandbox accepted twice (the same device and notification: for
  APNs, the same apns-id). ``duplicate`` records (a notification id seen
  again, not sent again: a crash during an audience split repeats its
  per-user copies) are counted apart; they are not a send's outcome.

It prints a table and one JSON line. A measurement, not a test: it loads the
machine for a few minutes per mode. The notifications' plan and the checks
are :mod:`pushstream.chaos_audit`'s, which ``tests/test_chaos.py`` runs too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pushstream import localkafka, localstack, topics
from pushstream.chaos_audit import (
    WORKER_INPUTS,
    Audit,
    Device,
    Planned,
    Population,
    audit,
    expected_sends,
    plan,
    registrations,
)
from pushstream.config import Settings, load_settings
from pushstream.demo_sample import Apps
from pushstream.events import Outcome, Platform
from pushstream.sandbox.apns import SCENARIO_PREFIXES

FOLDER = Path(".cache/chaos")
MODES = ("kill", "sigterm", "broker")
SIGTERM_MARGIN_S = 5.0
SHUTDOWN_TIMEOUT_S = 10.0
DRAIN_WITHIN_S = 600.0
FLOWING_S = 1.0  # outcomes arrived this recently: work is flowing

# Small retry numbers, so throttled sends finish within the run.
WORKER_SETTINGS = {
    "PUSHSTREAM_RETRY_BASE_S": "0.2",
    "PUSHSTREAM_RETRY_MAX_S": "1",
    "PUSHSTREAM_RETRY_MAX_ATTEMPTS": "3",
    "PUSHSTREAM_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
}
# Sandbox knobs: slow answers take 1.5 s, throttling asks for 1 s.
SANDBOX_SETTINGS: dict[Platform, dict[str, Any]] = {
    "apns": {"slow_s": 1.5},
    "fcm": {"slow_s": 1.5, "quota_failures": 1, "retry_after_s": 1},
    "wns": {"slow_s": 1.5, "retry_after_s": 1},
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """A sandbox scenario: its share of devices and the outcome it ends in."""

    name: str
    share: float
    outcome: Outcome


SCENARIOS: dict[Platform, tuple[Scenario, ...]] = {
    "apns": (
        Scenario("slow", 0.04, "delivered"),
        Scenario("throttled", 0.02, "failed"),  # 429 until retries run out
        Scenario("unregistered", 0.03, "invalid_token"),
    ),
    "fcm": (
        Scenario("slow", 0.04, "delivered"),
        Scenario("quota", 0.03, "delivered"),  # one 429, then delivered
        Scenario("unregistered", 0.03, "invalid_token"),
    ),
    "wns": (
        Scenario("slow", 0.04, "delivered"),
        Scenario("throttled", 0.02, "failed"),  # 406 until retries run out
        Scenario("expired", 0.03, "invalid_token"),
    ),
}
OK = Scenario("ok", 1.0, "delivered")
_APNS_PREFIX = {name: prefix for prefix, name in SCENARIO_PREFIXES.items()}


# --- the population (pure) ------------------------------------------------------------


ChannelMaker = Callable[[str, str], str]


def pick_scenario(platform: Platform, rng: random.Random) -> Scenario:
    draw = rng.random()
    for scenario in SCENARIOS[platform]:
        if draw < scenario.share:
            return scenario
        draw -= scenario.share
    return OK


def make_token(
    platform: Platform, scenario: Scenario, app: str, rng: random.Random, channel: Any
) -> str:
    if platform == "apns":
        prefix = _APNS_PREFIX.get(scenario.name, "e")  # no scenario starts with "e"
        return prefix + f"{rng.getrandbits(256):064x}"[len(prefix) :]
    if platform == "fcm":
        return f"{scenario.name}-{rng.getrandbits(128):032x}:APA91b"
    uri: str = channel(app, scenario.name)
    return uri


def build_population(
    users: int, apps: Apps, channel: ChannelMaker, rng: random.Random
) -> Population:
    """``users`` users, each with one device per platform."""
    devices = {}
    for index in range(users):
        user = f"u{index:06d}"
        mine = []
        for platform in ("apns", "fcm", "wns"):
            app = rng.choice(apps.for_platform(platform))
            scenario = pick_scenario(platform, rng)
            token = make_token(platform, scenario, app, rng, channel)
            device_id = f"{user}-{platform}"
            mine.append(Device(user, device_id, platform, app, token, scenario.outcome))
        devices[user] = tuple(mine)
    return Population(devices)


# --- outcomes as they arrive ----------------------------------------------------------


class Reader:
    """Reads deliveries from the start; knows which expected sends have an outcome."""

    def __init__(self, settings: Settings, expected: Iterable[str]) -> None:
        self.settings = settings
        self.waiting = set(expected)
        self.total = len(self.waiting)
        self.last_arrival = 0.0
        self.records = 0
        self.completed_ms: list[int] = []  # completed_at_ms of each record
        self._consumer: Any = None
        self._task: asyncio.Task[None] | None = None
        self.guard: Callable[[], None] = lambda: None  # raises when all is lost

    @property
    def progress(self) -> float:
        return 1 - len(self.waiting) / self.total if self.total else 1.0

    @property
    def flowing(self) -> bool:
        return time.monotonic() - self.last_arrival < FLOWING_S

    async def start(self) -> None:
        tps = await localstack.partitions(self.settings, (topics.DELIVERIES,))
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_auto_commit=False,
            fetch_max_wait_ms=100,
        )
        await self._consumer.start()
        self._consumer.assign(tps)
        await self._consumer.seek_to_beginning(*tps)
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            for records in batch.values():
                for record in records:
                    value = json.loads(record.value)
                    if value["outcome"] != "duplicate":  # not a send's outcome
                        self.waiting.discard(value.get("send_id"))
                    self.completed_ms.append(value["completed_at_ms"])
                    self.records += 1
                    self.last_arrival = time.monotonic()

    def check(self) -> None:
        if self._task is not None and self._task.done():
            self._task.result()

    async def until(self, done: Callable[[], bool], within: float) -> bool:
        deadline = time.monotonic() + within
        while not done():
            self.check()
            self.guard()
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def decided_since(self, since_ms: int) -> bool:
        """Has an outcome decided after ``since_ms`` arrived?"""
        return any(ms >= since_ms for ms in self.completed_ms[-2000:])

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()


async def read_topic(settings: Settings, name: str) -> list[dict[str, Any]]:
    """Every record of a topic now, values parsed."""
    tps = await localstack.partitions(settings, (name,))
    ends = await localstack.end_offsets(settings, tps)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    values = []
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            for records in batch.values():
                values += [json.loads(r.value) for r in records if r.value]
    finally:
        await consumer.stop()
    return values


# --- one run --------------------------------------------------------------------------


@dataclass
class Event:
    """One act of chaos and how long the pipeline took to get over it."""

    what: str
    at_s: float  # since the first notification was published
    exit_code: int | None = None
    exit_s: float | None = None  # SIGTERM: until the process ended
    ready_s: float | None = None  # until /ready answered 200 after the restart
    flowing_s: float | None = None  # until outcomes flowed again
    note: str = ""


@dataclass
class Run:
    mode: str
    notifications: int
    users: int
    events: list[Event] = field(default_factory=list)
    audit: Audit | None = None
    elapsed_s: float = 0.0
    problems: list[str] = field(default_factory=list)


class Chaos:
    """The parts of one run: settings, sandbox, worker, reader, broker."""

    def __init__(
        self, args: argparse.Namespace, mode: str, broker: localkafka.LocalKafka | None
    ) -> None:
        self.args = args
        self.mode = mode
        self.broker = broker
        self.tag = secrets.token_hex(3)
        self.folder = FOLDER / self.tag
        bootstrap = broker.bootstrap if broker else None
        app_id = f"chaos-{self.tag}"
        self.settings = load_settings(
            topic_prefix=f"{app_id}.",
            app_id=app_id,
            data_dir=self.folder / "worker",
            **({"kafka_bootstrap": bootstrap} if bootstrap else {}),
        )
        self.rng = random.Random(args.seed)
        self.children: list[localstack.Child] = []
        self.worker: localstack.WorkerChild | None = None
        self.worker_down = False  # killed or stopped here, about to restart
        self.began = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{self.mode} {time.monotonic() - self.began:6.1f}s] {text}", flush=True)

    async def run(self) -> Run:
        args, settings = self.args, self.settings
        run = Run(self.mode, args.notifications, args.users)
        report = await topics.ensure_topics(settings)
        assert report.ok, report.problems
        sandbox = await localstack.start_sandbox(self.folder / "sandbox")
        self.children.append(sandbox)
        for platform, knobs in SANDBOX_SETTINGS.items():
            await asyncio.to_thread(
                sandbox.call,
                "POST",
                "/scenario",
                {"platform": platform, "settings": knobs},
            )

        apps = Apps.from_env(sandbox.worker_env)
        population = await asyncio.to_thread(
            build_population, args.users, apps, sandbox.wns_channel, self.rng
        )
        env = localstack.worker_env(settings, sandbox.worker_env, **WORKER_SETTINGS)
        self.worker = localstack.WorkerChild(env, self.folder / "worker.log")
        self.children.append(self.worker)
        await self.worker.start()
        await self.worker.wait_ready(localstack.READY_TIMEOUT_S)

        await _produce(settings, topics.REGISTRATIONS, registrations(population))
        await localstack.wait_consumed(
            settings,
            (topics.REGISTRATIONS, topics.TOKEN_OWNERS, topics.TOKEN_EVENTS),
            within=300,
        )
        notifications = plan(
            population, args.notifications, self.tag, args.audience_share
        )
        expected = expected_sends(population, notifications)
        self.log(
            f"{sum(len(d) for d in population.devices.values())} devices of "
            f"{args.users} users registered; {len(notifications)} notifications, "
            f"{len(expected)} sends to come"
        )

        reader = Reader(settings, expected)
        reader.guard = self._check_worker
        await reader.start()
        self.began = time.monotonic()
        publisher = asyncio.create_task(self._publish(notifications))
        try:
            if self.mode == "kill":
                await self._kills(reader, run)
            elif self.mode == "sigterm":
                await self._sigterm(reader, run)
            else:
                await self._broker_restart(reader, run)
            await publisher
            if not await reader.until(lambda: not reader.waiting, DRAIN_WITHIN_S):
                run.problems.append(f"{len(reader.waiting)} sends without an outcome")
            run.elapsed_s = time.monotonic() - self.began
            await localstack.wait_consumed(
                settings, [*WORKER_INPUTS], within=DRAIN_WITHIN_S
            )
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
            await reader.aclose()

        if not self.worker.running:
            run.problems.append("the worker is not running at the end")
        deliveries = await read_topic(settings, topics.DELIVERIES)
        accepted = []
        for platform in ("apns", "fcm", "wns"):
            accepted += await asyncio.to_thread(sandbox.accepted, platform)
        run.audit = audit(expected, deliveries, accepted)
        return run

    def _check_worker(self) -> None:
        """Raise when the worker died on its own (not killed or stopped here)."""
        worker = self.worker
        if worker is not None and not worker.running and not self.worker_down:
            raise worker.failed("exited during the run")

    async def _publish(self, notifications: Sequence[Planned]) -> None:
        topic = self.settings.topic(topics.NOTIFICATIONS)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            enable_idempotence=True,  # a retry during a broker restart adds nothing
            linger_ms=5,
            request_timeout_ms=300_000,
        )
        await producer.start()
        try:
            pending = []
            began = time.monotonic()
            for i, planned in enumerate(notifications):
                delay = began + i / self.args.rate - time.monotonic()
                if delay > 0.01:
                    await asyncio.sleep(delay)
                pending.append(
                    await producer.send(topic, planned.value, key=planned.key)
                )
            await asyncio.gather(*pending)
            self.log(f"all {len(notifications)} notifications published")
        finally:
            await producer.stop()

    async def _flowing_at(self, reader: Reader, fraction: float) -> Event:
        """Wait until ``fraction`` of the sends have an outcome and more arrive."""
        await reader.until(
            lambda: reader.progress >= fraction and reader.flowing, DRAIN_WITHIN_S
        )
        await asyncio.sleep(self.rng.uniform(0, 0.5))  # anywhere inside a batch
        return Event("", time.monotonic() - self.began)

    async def _restarted(self, reader: Reader, event: Event, since: float) -> None:
        """Start the worker again; time its readiness and the first new outcome."""
        assert self.worker is not None
        started_ms = time.time_ns() // 1_000_000
        await self.worker.start()
        await self.worker.wait_ready(localstack.READY_TIMEOUT_S)
        self.worker_down = False
        event.ready_s = time.monotonic() - since
        await reader.until(lambda: reader.decided_since(started_ms), DRAIN_WITHIN_S)
        event.flowing_s = time.monotonic() - since
        self.log(
            f"{event.what}: ready after {event.ready_s:.1f}s, outcomes flowing "
            f"after {event.flowing_s:.1f}s"
        )

    async def _kills(self, reader: Reader, run: Run) -> None:
        assert self.worker is not None
        assert self.worker.process is not None
        # One moment in each of ``kills`` equal stretches of the run.
        width = 0.75 / self.args.kills
        points = [
            0.1 + width * (n + self.rng.uniform(0.2, 0.8))
            for n in range(self.args.kills)
        ]
        for number, point in enumerate(points, 1):
            event = await self._flowing_at(reader, point)
            event.what = f"kill -9 #{number}"
            self.worker_down = True
            self.worker.kill()
            await self.worker.process.wait()
            since = time.monotonic()
            self.log(f"{event.what} at {100 * reader.progress:.0f}% of the sends")
            run.events.append(event)
            await self._restarted(reader, event, since)

    async def _sigterm(self, reader: Reader, run: Run) -> None:
        assert self.worker is not None
        assert self.worker.process is not None
        event = await self._flowing_at(reader, self.rng.uniform(0.2, 0.7))
        event.what = "SIGTERM"
        since = time.monotonic()
        limit = SHUTDOWN_TIMEOUT_S + SIGTERM_MARGIN_S
        self.worker_down = True
        event.exit_code = await self.worker.stop(within=limit + 30)
        event.exit_s = time.monotonic() - since
        self.log(
            f"SIGTERM at {100 * reader.progress:.0f}% of the sends: exit "
            f"{event.exit_code} after {event.exit_s:.1f}s"
        )
        if event.exit_code != 0:
            run.problems.append(f"SIGTERM: exit status {event.exit_code}")
        if event.exit_s > limit:
            run.problems.append(f"SIGTERM: {event.exit_s:.1f}s to exit, over {limit}s")
        run.events.append(event)
        await self._restarted(reader, event, time.monotonic())

    async def _broker_restart(self, reader: Reader, run: Run) -> None:
        assert self.broker is not None
        assert self.worker is not None
        event = await self._flowing_at(reader, self.rng.uniform(0.2, 0.6))
        event.what = (
            "broker kill/start" if self.args.broker_kill else "broker stop/start"
        )
        pid = self.worker.pid
        began, cpu, lines = time.monotonic(), cpu_s(pid), log_lines(self.worker)
        await asyncio.to_thread(stop_broker, self.broker, self.args.broker_kill)
        self.log(f"broker stopped at {100 * reader.progress:.0f}% of the sends")
        await asyncio.sleep(self.args.broker_down_s)
        await asyncio.to_thread(localkafka.up, self.broker)
        since = time.monotonic()
        outage = since - began
        event.note = (
            f"no broker for {outage:.0f}s; meanwhile the worker used "
            f"{100 * (cpu_s(pid) - cpu) / outage:.0f}% of a core and logged "
            f"{log_lines(self.worker) - lines} lines"
        )
        self.log(event.note)
        count = reader.records
        recovered = await reader.until(
            lambda: reader.records > count and reader.flowing, DRAIN_WITHIN_S
        )
        event.flowing_s = time.monotonic() - since if recovered else None
        if not self.worker.running or self.worker.pid != pid:
            run.problems.append("the worker did not survive the broker restart")
        self.log(f"outcomes flowing {_fmt(event.flowing_s)}s after the broker is back")
        run.events.append(event)

    async def aclose(self, keep_logs: bool) -> None:
        for child in reversed(self.children):
            await child.stop()
        if self.args.keep:
            return
        await localstack.delete_topics(self.settings)
        if keep_logs:
            shutil.rmtree(self.folder / "worker", ignore_errors=True)
            print(f"logs kept in {self.folder}")
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


def stop_broker(broker: localkafka.LocalKafka, kill: bool) -> None:
    """Stop the private broker: cleanly, or with SIGKILL (a crashed broker)."""
    pid = localkafka.status(broker).pid
    if not kill or pid is None:
        localkafka.down(broker)
        return
    os.killpg(pid, signal.SIGKILL)
    while localkafka.status(broker).running:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)


def cpu_s(pid: int | None) -> float:
    """CPU seconds a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_lines(child: localstack.Child) -> int:
    try:
        with child.log_path.open("rb") as log:
            return sum(1 for _ in log)
    except OSError:
        return 0


async def _produce(
    settings: Settings, name: str, records: Sequence[tuple[bytes, bytes]]
) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True
    )
    await producer.start()
    try:
        topic = settings.topic(name)
        pending = [await producer.send(topic, v, key=k) for k, v in records]
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


# --- printing -------------------------------------------------------------------------


def summary(run: Run) -> list[str]:
    a = run.audit
    lines = [f"\n{run.mode}: {run.notifications} notifications to {run.users} users"]
    if a is not None:
        rows = [
            ("sends expected", a.expected),
            *((f"  final outcome {o}", n) for o, n in sorted(a.outcomes.items())),
            ("missing (no outcome)", len(a.missing)),
            ("conflicting outcomes", len(a.conflicting)),
            ("outcome not the scenario's", len(a.wrong)),
            ("outcomes for no expected send", a.unexpected),
            ("duplicate delivery records", a.duplicate_records),
            ("  sends with duplicates", a.sends_with_duplicates),
            ("  from notifications routed again", a.rerouted),
            ('"duplicate" reports (not sent again)', a.duplicate_reports),
            ("pushes missing at the sandbox", len(a.pushes_missing)),
            ("duplicate pushes at the sandbox", a.duplicate_pushes),
        ]
        lines += [f"  {name:<38}{value:>8}" for name, value in rows]
        for what, items in (
            ("missing", a.missing),
            ("conflicting", list(a.conflicting.items())),
            ("wrong", list(a.wrong.items())),
            ("pushes missing", a.pushes_missing),
        ):
            if items:
                lines.append(f"  {what}, first ones: {items[:5]}")
    lines.append(
        f"  {'event':<20}{'at s':>7}{'exit':>6}{'exit s':>8}{'ready s':>9}"
        f"{'flowing s':>11}  note"
    )
    for e in run.events:
        lines.append(
            f"  {e.what:<20}{e.at_s:>7.1f}{_fmt(e.exit_code, 'd'):>6}"
            f"{_fmt(e.exit_s):>8}{_fmt(e.ready_s):>9}{_fmt(e.flowing_s):>11}  {e.note}"
        )
    lines.append(f"  all outcomes in {run.elapsed_s:.1f}s after the first publish")
    lines += [f"  PROBLEM: {p}" for p in run.problems]
    return lines


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def figures(run: Run) -> dict[str, Any]:
    a = run.audit
    result: dict[str, Any] = {
        "notifications": run.notifications,
        "sends": a.expected if a else None,
        "missing": len(a.missing) if a else None,
        "conflicting": len(a.conflicting) if a else None,
        "wrong_outcome": len(a.wrong) if a else None,
        "duplicate_records": a.duplicate_records if a else None,
        "duplicate_reports": a.duplicate_reports if a else None,
        "duplicate_pushes": a.duplicate_pushes if a else None,
        "pushes_missing": len(a.pushes_missing) if a else None,
        "elapsed_s": round(run.elapsed_s, 1),
        "ok": bool(a and a.ok and not run.problems),
    }
    for e in run.events:
        key = e.what.replace(" ", "_").replace("#", "").replace("/", "_")
        result[key] = {
            k: round(v, 2) if isinstance(v, float) else v
            for k, v in (
                ("exit_code", e.exit_code),
                ("exit_s", e.exit_s),
                ("ready_s", e.ready_s),
                ("recovered_s", e.flowing_s),
            )
            if v is not None
        }
    return result


# --- main -----------------------------------------------------------------------------


async def one_mode(args: argparse.Namespace, mode: str) -> Run:
    broker = None
    if mode == "broker":
        port = localstack.free_port()
        data = (FOLDER / f"kafka-{port}").resolve()
        broker = localkafka.LocalKafka.from_env(port=port, data_dir=data)
        await asyncio.to_thread(localkafka.up, broker)
    else:
        found = await asyncio.to_thread(
            localstack.ensure_broker, load_settings().kafka_bootstrap
        )
        if found.started and found.local is not None:
            broker = found.local  # ours to stop at the end
    chaos = Chaos(args, mode, broker if mode == "broker" else None)
    run = None
    try:
        run = await chaos.run()
        return run
    finally:
        failed = run is None or run.problems or not (run.audit and run.audit.ok)
        await chaos.aclose(keep_logs=bool(failed))
        if broker is not None:
            await asyncio.to_thread(localkafka.down, broker)
            if mode == "broker" and not args.keep:
                shutil.rmtree(broker.data_dir, ignore_errors=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=(*MODES, "all"), default="kill")
    parser.add_argument("--notifications", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=250.0, help="published per s")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--audience-share", type=float, default=0.02)
    parser.add_argument("--broker-down-s", type=float, default=10.0)
    parser.add_argument(
        "--broker-kill", action="store_true", help="SIGKILL the broker, not SIGTERM"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep topics and data")
    return parser.parse_args()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results = {}
    for mode in MODES if args.mode == "all" else (args.mode,):
        run = await one_mode(args, mode)
        print("\n".join(summary(run)), flush=True)
        results[mode] = figures(run)
    return results


def main() -> None:
    args = parse_args()
    # This process's own clients would print every failed reconnection while
    # the broker is down; the worker's log keeps them.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    print(
        f"chaos, seed {args.seed}: load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    results = asyncio.run(main_async(args))
    print(json.dumps(results if len(results) > 1 else next(iter(results.values()))))
    sys.exit(0 if all(r["ok"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
