"""``pushstream demo``: the whole pipeline on this machine, with a realistic sample.

It brings up what the pipeline needs and stops what it started:

1. the Kafka broker (the local one, unless a broker already answers at
   ``PUSHSTREAM_KAFKA_BOOTSTRAP``; it is stopped at the end only if the demo
   started it) and pushstream's topics, with their own prefix
   (``pushstream-demo.``);
2. ``pushstream sandbox`` and ``pushstream worker`` as subprocesses, the
   worker configured from the sandbox's env file, with its own app id and
   data folder under ``.cache/demo``;
3. publishes the sample of :mod:`pushstream.demo_sample` as an upstream
   service would: registrations first (and waits until the worker has
   applied them), then notifications;
4. reads deliveries, token-events and dead-letters until every notification
   has all the final outcomes the sample says it must have, or until the
   deadline, when it says what is missing;
5. prints a summary and, last, one JSON line: ``{"notifications",
   "sends", "outcomes", "platforms", "invalidated_tokens", "dead_letters",
   "elapsed_s"}`` (``elapsed_s``: from the first notification published to
   the last outcome received).

The exit status is 0 when everything came out as expected, 1 when not, and
the JSON line is printed either way. SIGINT and SIGTERM stop the worker, the
sandbox and (when the demo started it) the broker before the demo exits.
Each run has its own tag in user ids, notification ids and tokens, so runs
can follow one another on the same topics.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from pushstream import localstack, topics
from pushstream.app import DEAD_LETTERS, DELIVERIES, TOKEN_EVENTS
from pushstream.config import ConfigError, Settings, load_settings
from pushstream.demo_sample import MIN_USERS, Apps, Record, Sample, build_sample
from pushstream.events import OUTCOMES, PLATFORMS

DEFAULT_USERS = 300
DEFAULT_FOLDER = Path(".cache/demo")
DEFAULT_APP_ID = "pushstream-demo"
DEFAULT_PREFIX = "pushstream-demo."
DEFAULT_DEADLINE_S = 120.0
# After the last expected outcome, how long to watch for unexpected ones.
GRACE_S = 1.0
# Registrations, and what the registry publishes while applying them.
REGISTRY_INPUTS = (topics.REGISTRATIONS, topics.TOKEN_OWNERS, topics.TOKEN_EVENTS)

Echo = Callable[[str], None]


class DemoError(Exception):
    """The demo could not run; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``pushstream demo`` is told; the defaults are its command line's."""

    users: int = DEFAULT_USERS
    seed: int = 7
    folder: Path = DEFAULT_FOLDER
    app_id: str = DEFAULT_APP_ID
    topic_prefix: str = DEFAULT_PREFIX
    deadline_s: float = DEFAULT_DEADLINE_S
    ready_timeout_s: float = localstack.READY_TIMEOUT_S


# --- what came out ------------------------------------------------------------


@dataclass
class Tally:
    """The outputs of one run's notifications, as they arrive."""

    ids: frozenset[str]
    tag: str
    by_id: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    platforms: dict[str, Counter[str]] = field(default_factory=dict)
    sends: int = 0
    invalidated: Counter[str] = field(default_factory=Counter)
    dead_letters: list[tuple[str, str]] = field(default_factory=list)
    last_at: float = 0.0

    def add(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """Count one record of deliveries, token-events or dead-letters."""
        if value is None:
            return
        if topic.endswith(DEAD_LETTERS):
            if key is not None and f"-{self.tag}-" in key.decode("utf-8", "replace"):
                letter = json.loads(value)
                self.dead_letters.append((letter["stage"], letter["error"]))
            return
        event = json.loads(value)
        if event.get("notification_id") not in self.ids:
            return
        if topic.endswith(TOKEN_EVENTS):
            if event.get("type") == "invalidated":
                self.invalidated[event["platform"]] += 1
            return
        self.by_id[event["notification_id"]] += 1
        self.outcomes[event["outcome"]] += 1
        platform = event.get("platform")
        if platform:
            self.platforms.setdefault(platform, Counter())[event["outcome"]] += 1
        if event.get("attempts", 0) > 0:
            self.sends += 1
        self.last_at = time.monotonic()

    def missing(self, expected: Counter[str]) -> Counter[str]:
        """Notification id -> outcomes still to come."""
        return Counter(
            {
                nid: n - self.by_id[nid]
                for nid, n in expected.items()
                if n > self.by_id[nid]
            }
        )

    def complete(self, sample: Sample) -> bool:
        return (
            not self.missing(sample.expected_by_id())
            and sum(self.invalidated.values()) >= sample.expected_invalidations()
            and len(self.dead_letters) >= len(sample.dead_letters)
        )


async def collect(
    settings: Settings,
    start: dict[Any, int],
    tally: Tally,
    stop: asyncio.Event,
) -> None:
    """Read the output topics from ``start`` into ``tally`` until ``stop`` is set."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        **topics.kafka_security(settings),
    )
    await consumer.start()
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        while not stop.is_set():
            batch = await consumer.getmany(timeout_ms=200, max_records=2000)
            for records in batch.values():
                for record in records:
                    tally.add(record.topic, record.key, record.value)
    finally:
        await consumer.stop()


# --- the run ----------------------------------------------------------------------


@dataclass
class Result:
    """What the demo found, ready to print."""

    sample: Sample
    tally: Tally
    elapsed_s: float
    total_s: float
    checks: list[tuple[bool, str]]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems and all(ok for ok, _ in self.checks)

    def as_json(self) -> dict[str, Any]:
        """The demo's last line."""
        return {
            "notifications": len(self.sample.notifications),
            "sends": self.tally.sends,
            "outcomes": {o: self.tally.outcomes[o] for o in OUTCOMES},
            "platforms": {
                p: {o: self.tally.platforms.get(p, Counter())[o] for o in OUTCOMES}
                for p in PLATFORMS
            },
            "invalidated_tokens": sum(self.tally.invalidated.values()),
            "dead_letters": len(self.tally.dead_letters),
            "elapsed_s": round(self.elapsed_s, 2),
        }


async def publish(settings: Settings, records: Sequence[Record]) -> float:
    """Publish records in order, as an upstream service; returns when started."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        acks="all",
        linger_ms=5,
        **topics.kafka_security(settings),
    )
    await producer.start()
    try:
        started = time.monotonic()
        futures = []
        for record in records:
            topic = settings.topic(
                topics.NOTIFICATIONS if record.notification_id else topics.REGISTRATIONS
            )
            futures.append(
                await producer.send(
                    topic,
                    record.value,
                    key=record.key,
                    timestamp_ms=record.timestamp_ms,
                )
            )
        await asyncio.gather(*futures)
        return started
    finally:
        await producer.stop()


class Demo:
    """One demo run: the sandbox and the worker it starts, and what it publishes."""

    def __init__(self, options: DemoOptions, settings: Settings, echo: Echo) -> None:
        self.options = options
        self.settings = settings
        self.echo = echo
        self.tag = secrets.token_hex(3)
        self.children: list[localstack.Child] = []

    async def run(self) -> Result:
        began = time.monotonic()
        options, settings, echo = self.options, self.settings, self.echo
        report = await topics.ensure_topics(settings)
        if not report.ok:
            raise DemoError("; ".join(report.problems))
        created = sum(1 for state in report.topics if state.action == "created")
        echo(
            f"topics: {len(report.topics)} with prefix {settings.topic_prefix} "
            f"({created} created)"
        )

        sandbox = await localstack.start_sandbox(
            options.folder / "sandbox", within=options.ready_timeout_s
        )
        self.children.append(sandbox)
        ports = ", ".join(f"{p} :{sandbox.ports[p]}" for p in PLATFORMS)
        echo(f"sandbox: {ports} (log {sandbox.log_path})")

        sample = await asyncio.to_thread(
            build_sample,
            options.users,
            apps=Apps.from_env(sandbox.worker_env),
            channel=sandbox.wns_channel,
            seed=options.seed,
            tag=self.tag,
        )
        echo(describe_sample(sample))

        outputs = await localstack.partitions(
            settings, (DELIVERIES, TOKEN_EVENTS, DEAD_LETTERS)
        )
        start = await localstack.end_offsets(settings, outputs)

        ready_began = time.monotonic()
        env = localstack.worker_env(settings, sandbox.worker_env)
        worker = localstack.WorkerChild(env, options.folder / "worker.log")
        self.children.append(worker)
        await worker.start()
        await worker.wait_ready(options.ready_timeout_s)
        echo(
            f"worker: ready in {time.monotonic() - ready_began:.1f}s (app id "
            f"{settings.app_id}, log {worker.log_path})"
        )

        applied_began = time.monotonic()
        await publish(settings, sample.registrations)
        try:
            await localstack.wait_consumed(
                settings, REGISTRY_INPUTS, within=options.deadline_s
            )
        except localstack.StackError as exc:
            raise DemoError(f"the registrations were not applied: {exc}") from None
        echo(
            f"registrations: {len(sample.registrations)} published, applied in "
            f"{time.monotonic() - applied_began:.1f}s"
        )

        tally = Tally(frozenset(sample.notification_ids), self.tag)
        stop = asyncio.Event()
        reader = asyncio.create_task(collect(settings, start, tally, stop))
        try:
            published_at = await publish(settings, sample.notifications)
            expected = sum(sample.expected_by_id().values())
            echo(
                f"notifications: {len(sample.notifications)} published; waiting for "
                f"{expected} outcomes (at most {options.deadline_s:.0f}s)"
            )
            await self._wait(tally, sample, reader)
        finally:
            stop.set()
            await reader

        checks = await asyncio.to_thread(sandbox_checks, sample, sandbox)
        last = tally.last_at or time.monotonic()
        return Result(
            sample,
            tally,
            elapsed_s=max(0.0, last - published_at),
            total_s=time.monotonic() - began,
            checks=checks,
            problems=problems(sample, tally),
        )

    async def _wait(
        self, tally: Tally, sample: Sample, reader: asyncio.Task[None]
    ) -> None:
        deadline = time.monotonic() + self.options.deadline_s
        while not tally.complete(sample) and time.monotonic() < deadline:
            if reader.done():
                reader.result()  # the reader failed: raise its error
            for child in self.children:
                if not child.running:
                    raise DemoError(str(child.failed("exited during the demo")))
            await asyncio.sleep(0.2)
        await asyncio.sleep(GRACE_S)  # unexpected extra outcomes show up here

    async def aclose(self) -> None:
        """Stop the worker, then the sandbox."""
        for child in reversed(self.children):
            await child.stop()

    def kill(self) -> None:
        """The last resort when the event loop is gone: SIGKILL what still runs."""
        for child in self.children:
            child.kill()


def sandbox_checks(
    sample: Sample, sandbox: localstack.SandboxChild
) -> list[tuple[bool, str]]:
    """What the sandbox received, for the rotations and the phone that changed hands."""
    pushes = Counter(record.get("token") for record in sandbox.accepted("apns"))
    checks = []
    rotated_ok = all(
        pushes[old] == 0 and pushes[new] > 0 for old, new in sample.rotated
    )
    checks.append(
        (
            rotated_ok,
            f"{len(sample.rotated)} rotated devices: pushes went to the new tokens, "
            "none to the old ones",
        )
    )
    if sample.handed_over is not None:
        token, seller, buyer = sample.handed_over
        count = pushes[token]
        checks.append(
            (
                count == 1,
                f"the phone {seller} handed to {buyer}: pushed {count} time(s), "
                "for its new owner only",
            )
        )
    return checks


def problems(sample: Sample, tally: Tally) -> list[str]:
    """Everything that differs from what the sample says must happen."""
    found = []
    missing = tally.missing(sample.expected_by_id())
    if missing:
        ids = ", ".join(f"{nid} ({n})" for nid, n in sorted(missing.items())[:10])
        more = " ..." if len(missing) > 10 else ""
        found.append(
            f"missing {sum(missing.values())} outcomes of {len(missing)} "
            f"notifications: {ids}{more}"
        )
    expected = Counter(outcome for _, outcome in sample.expected_outcomes().elements())
    for outcome in OUTCOMES:
        if tally.outcomes[outcome] != expected[outcome]:
            found.append(
                f"{outcome}: {tally.outcomes[outcome]} outcomes, expected "
                f"{expected[outcome]}"
            )
    invalidated = sum(tally.invalidated.values())
    if invalidated != sample.expected_invalidations():
        found.append(
            f"invalidated tokens: {invalidated}, expected "
            f"{sample.expected_invalidations()}"
        )
    if len(tally.dead_letters) != len(sample.dead_letters):
        found.append(
            f"dead letters: {len(tally.dead_letters)}, expected "
            f"{len(sample.dead_letters)}"
        )
    return found


# --- printing ------------------------------------------------------------------------


def describe_sample(sample: Sample) -> str:
    by_platform = Counter(d.platform for ds in sample.devices.values() for d in ds)
    platforms = ", ".join(f"{p} {by_platform[p]}" for p in PLATFORMS)
    dead = sum(1 for ds in sample.devices.values() for d in ds if d.scenario != "ok")
    return (
        f"sample {sample.tag}: {len(sample.users)} users, {sample.device_count} "
        f"devices ({platforms}), {dead} dead tokens, {len(sample.rotated)} token "
        f"rotations, 1 phone changing hands, {len(sample.dead_letters)} malformed "
        "events"
    )


def summary(result: Result) -> list[str]:
    """The human part of the demo's output."""
    tally = result.tally
    expected = Counter(o for _, o in result.sample.expected_outcomes().elements())
    shown = [o for o in OUTCOMES if tally.outcomes[o] or expected[o]]
    widths = {o: max(len(o), 5) + 2 for o in shown}
    lines = ["", "outcomes per platform"]
    header = "".join(f"{o:>{widths[o]}}" for o in shown)
    lines.append(f"  {'platform':<8}{header}{'total':>7}")
    rows: list[tuple[str, Counter[str]]] = [
        (p, tally.platforms.get(p, Counter())) for p in PLATFORMS
    ]
    whole = Counter(tally.outcomes)
    for counts in tally.platforms.values():
        whole.subtract(counts)
    rows.append(("-", +whole))
    rows.append(("total", tally.outcomes))
    for name, counts in rows:
        cells = "".join(f"{counts[o] or '-':>{widths[o]}}" for o in shown)
        lines.append(f"  {name:<8}{cells}{sum(counts.values()):>7}")

    invalidated = ", ".join(f"{p} {tally.invalidated[p]}" for p in PLATFORMS)
    lines.append(
        f"invalidated tokens: {sum(tally.invalidated.values())} ({invalidated})"
    )
    lines.append(f"dead letters: {len(tally.dead_letters)}")
    for stage, error in tally.dead_letters:
        lines.append(f"  {stage}: {error[:100]}")
    lines.append(f"sends answered by the sandbox: {tally.sends}")
    lines.append("checks:")
    for ok, text in result.checks:
        lines.append(f"  {'ok  ' if ok else 'FAIL'} {text}")
    total = sum(result.sample.expected_by_id().values())
    if result.problems:
        lines.extend(f"  FAIL {problem}" for problem in result.problems)
    else:
        lines.append(
            f"  ok   every notification accounted for: "
            f"{len(result.sample.notifications)} published, {total} outcomes as "
            "expected"
        )
    lines.append(
        f"elapsed: {result.elapsed_s:.1f}s from the first notification to the last "
        f"outcome; {result.total_s:.0f}s for the whole demo"
    )
    return lines


# --- the command --------------------------------------------------------------------


def demo_settings(options: DemoOptions) -> Settings:
    """The environment's Kafka settings, with the demo's prefix, app id and data."""
    try:
        return load_settings(
            topic_prefix=options.topic_prefix,
            app_id=options.app_id,
            data_dir=options.folder / "worker",
        )
    except ConfigError as exc:
        raise DemoError(str(exc)) from None


async def _main(demo: Demo) -> Result:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await demo.run()
    finally:
        await demo.aclose()


def run_demo(options: DemoOptions, echo: Echo = click.echo) -> Result:
    """Run the whole demo; stops whatever it started, also on SIGINT/SIGTERM."""
    settings = demo_settings(options)
    previous = signal.signal(signal.SIGTERM, _terminate)
    broker: localstack.Broker | None = None
    demo = Demo(options, settings, echo)
    try:
        broker = localstack.ensure_broker(settings.kafka_bootstrap)
        how = "started" if broker.started else "already running"
        echo(f"broker: {how} at {broker.bootstrap}")
        return asyncio.run(_main(demo))
    except localstack.StackError as exc:
        raise DemoError(str(exc)) from None
    finally:
        signal.signal(signal.SIGTERM, _terminate)  # asyncio.run reset it
        demo.kill()
        if broker is not None and broker.started:
            echo("broker: stopping the broker the demo started")
            broker.stop()
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@click.command("demo")
@click.option(
    "--users",
    type=click.IntRange(MIN_USERS, 100_000),
    default=DEFAULT_USERS,
    show_default=True,
    help="Users in the sample (one to three devices each).",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Sample seed.")
@click.option(
    "--folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_FOLDER,
    show_default=True,
    help="Logs, the sandbox's files and the worker's data.",
)
@click.option("--app-id", default=DEFAULT_APP_ID, show_default=True)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True, help="Topics.")
@click.option(
    "--deadline",
    type=float,
    default=DEFAULT_DEADLINE_S,
    show_default=True,
    help="Seconds to wait for the outcomes.",
)
def demo_command(
    users: int, seed: int, folder: Path, app_id: str, prefix: str, deadline: float
) -> None:
    """Run the whole pipeline locally on a sample; print what came of it."""
    options = DemoOptions(
        users=users,
        seed=seed,
        folder=folder,
        app_id=app_id,
        topic_prefix=prefix,
        deadline_s=deadline,
    )
    try:
        result = run_demo(options)
    except DemoError as exc:
        raise click.ClickException(str(exc)) from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        click.echo("demo interrupted; everything it started is stopped", err=True)
        sys.exit(130)
    for line in summary(result):
        click.echo(line)
    click.echo(json.dumps(result.as_json()))
    if not result.ok:
        sys.exit(1)
