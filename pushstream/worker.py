"""The ``pushstream worker`` process, and ``pushstream devices`` to look a user up.

:func:`run_worker` builds the :class:`~pushstream.app.Pipeline` from the
settings, attaches every part of the pipeline (:data:`PARTS`), checks that
pushstream's topics exist with the partition counts the tables need, and runs
Faust's worker until SIGTERM or SIGINT, after which it stops cleanly (offsets
committed, tables flushed) and exits with status 0.

A stop is bounded (:class:`StopWatchdog`): a worker that has not exited
``PUSHSTREAM_SHUTDOWN_TIMEOUT_S`` plus :data:`STOP_MARGIN_S` seconds after the
signal (its broker is gone, and aiokafka or Faust wait for it) logs one line
and exits with :data:`EXIT_UNCLEAN_STOP`, as does a stop that finished but
not cleanly. Nothing is lost either way: what was not committed is read
again after a restart (at least once).

Before it joins the consumer group the worker checks what it can: the
settings, every provider credential, that its web port is free, that Kafka
answers and that the topics exist. Each failure stops it with exit status 1
and one line that names the setting to fix.

The worker serves ``GET /health``, ``GET /ready`` and ``GET /metrics`` on its
web port (:mod:`pushstream.web`): ``/ready`` answers 200 once its partitions
are assigned and its tables recovered from their changelogs, 503 before
that, while partitions move and while the broker is unreachable. The
devices table itself is never served over HTTP.

``pushstream devices USER`` needs no worker: it reads the user's latest value
from the devices table's changelog topic in Kafka.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import click
import faust
from aiokafka.errors import KafkaConnectionError, KafkaError

from pushstream import registry, retry, router, topics, web
from pushstream.app import DEVICES_TABLE, Pipeline
from pushstream.config import ConfigError, Settings, load_settings
from pushstream.events import PLATFORMS, UserDevices, token_fingerprint
from pushstream.log import setup_from_settings as setup_logging
from pushstream.log import shorten_token
from pushstream.registry_rules import decode_state
from pushstream.senders import runner

log = logging.getLogger(__name__)

# Every part of the pipeline, attached in this order.
PARTS: tuple[Callable[[Pipeline], object], ...] = (
    registry.attach,
    router.attach,
    runner.attach,
    retry.attach,
)

READ_TIMEOUT_S = 30.0

# How much longer than PUSHSTREAM_SHUTDOWN_TIMEOUT_S a stop may take. A clean
# stop takes about half the timeout (the grace of provider requests in flight)
# plus 2 to 3 s of Faust's and mode's teardown, whose last steps each wait 1 s.
STOP_MARGIN_S = 5.0
# The exit status of a stop that did not finish, or finished but not cleanly.
# 1 is taken by a crash and by a worker that cannot start, 2 by click's usage
# errors.
EXIT_UNCLEAN_STOP = 3
# How long the watchdog waits for its log line to be written before it exits.
LAST_LINE_WAIT_S = 1.0
AT_LEAST_ONCE = (
    "Nothing is lost: offsets not committed are read again after a restart "
    "(at least once), so some work may be done twice"
)


class WorkerError(Exception):
    """The worker cannot start; the message says what to fix."""


# --- the worker ---------------------------------------------------------------


def build_pipeline(settings: Settings) -> Pipeline:
    """The Faust app with every part attached, and its web pages."""
    pipeline = Pipeline(settings)
    for attach in PARTS:
        attach(pipeline)
    web.attach(pipeline)
    return pipeline


async def check_credentials(settings: Settings) -> None:
    """Load every configured provider credential; ConfigError names a bad one.

    The sender agents load them again when they start, after the worker has
    joined the consumer group; checking here first keeps a misconfigured
    worker out of the group. Makes no request to a provider.
    """
    for platform in PLATFORMS:
        if not getattr(settings, platform):
            continue
        client = runner.make_client(settings, platform)
        try:
            await client.start()
        finally:
            await client.aclose()


async def check_topics(settings: Settings) -> None:
    """Raise WorkerError when a topic is missing or its partitions don't fit.

    A co-partitioned topic with another partition count than the tables
    would silently miss table entries (lookups see one partition only).
    Other differences from the spec are logged.
    """
    report = await topics.describe_topics(settings)
    fatal = []
    for state in report.topics:
        if state.partitions == 0:
            fatal.append(f"{state.topic} does not exist")
        elif (
            state.name in topics.CO_PARTITIONED
            and state.partitions != settings.partitions
        ):
            fatal.append(
                f"{state.topic} has {state.partitions} partitions, "
                f"PUSHSTREAM_PARTITIONS is {settings.partitions}"
            )
        else:
            for problem in state.problems:
                log.warning("topic %s %s", state.topic, problem)
    if fatal:
        raise WorkerError(
            "pushstream's topics are not ready: "
            + "; ".join(fatal)
            + " (run `pushstream topics create` with the same settings)"
        )


def check_web_port(settings: Settings) -> None:
    """Raise WorkerError when the worker could not listen on its web port.

    Faust opens the port only once the worker runs; found there, a port in
    use would stop a worker that has joined the group already. Binds the
    way aiohttp does (SO_REUSEADDR) and lets go at once.
    """
    host, port = settings.web_host, settings.web_port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise WorkerError(
            f"PUSHSTREAM_WEB_HOST: {host!r} is not an address ({exc.strerror})"
        ) from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise WorkerError(
                    f"PUSHSTREAM_WEB_PORT: {host}:{port} is in use by another "
                    "process (each worker on a host needs its own port)"
                ) from None
            raise WorkerError(
                f"PUSHSTREAM_WEB_HOST: cannot listen on {host}:{port} ({exc.strerror})"
            ) from None


def kafka_problem(settings: Settings, exc: Exception) -> str:
    """The one line that says why Kafka did not answer the worker's first call."""
    where = f"PUSHSTREAM_KAFKA_BOOTSTRAP: {settings.kafka_bootstrap}"
    protocol = settings.kafka_security_protocol
    over = "" if protocol == "PLAINTEXT" else f" over {protocol}"
    if isinstance(exc, KafkaConnectionError):
        return f"{where}: no Kafka broker answers there{over}"
    return f"{where}: Kafka refused the worker{over} ({type(exc).__name__}: {exc})"


# --- stopping -----------------------------------------------------------------


class StopWatchdog:
    """Ends the process when its stop takes too long; tells a clean stop apart.

    :meth:`arm` starts the clock when the worker begins to stop (SIGTERM,
    SIGINT, or a crash). If the process still runs ``timeout_s + margin_s``
    later, the watchdog logs one ERROR line and ends it with
    :data:`EXIT_UNCLEAN_STOP` (``os._exit``: the rest of the stop does not
    run, as after a SIGKILL). That is safe: Faust commits an offset only once
    everything its record produced is in Kafka, so whatever was not committed
    is read again by the next owner of its partition. It happens when the
    broker is unreachable: Faust's last commit waits for the producer to
    flush records the broker never acknowledges, and mode waits 60 s for a
    consumer thread that died in aiokafka's stop.

    While the worker stops, a thread that dies of an exception (aiokafka's
    consumer thread does, when its last fetch to a lost broker is
    cancelled) makes the stop unclean too: :attr:`failure` says which, and
    :func:`run_worker` then exits with :data:`EXIT_UNCLEAN_STOP` as well.

    The clock runs in a thread of its own, not in an asyncio task: the stop
    can block the event loop's thread (mode waits for Faust's consumer
    thread with a blocking join, and so does the interpreter at exit).
    ``cause``, called when time is up, may name the likely reason.
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        margin_s: float = STOP_MARGIN_S,
        cause: Callable[[], str | None] = lambda: None,
        end_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.timeout_s = timeout_s
        self.margin_s = margin_s
        self.failure: str | None = None
        self._cause = cause
        self._end_process = end_process
        self._lock = threading.Lock()
        self._why: str | None = None

    def arm(self, why: str) -> None:
        """Start the clock, on the first call only; ``why`` names the trigger."""
        with self._lock:
            if self._why is not None:
                return
            self._why = why
        previous = threading.excepthook

        def thread_died(args: threading.ExceptHookArgs) -> None:
            previous(args)
            if self.failure is None:
                self.failure = (
                    f"{_thread_name(args.thread)} died ({args.exc_type.__name__})"
                )

        threading.excepthook = thread_died
        watch = threading.Thread(target=self._watch, name="stop-watchdog")
        watch.daemon = True
        watch.start()

    def _watch(self) -> None:
        time.sleep(self.timeout_s + self.margin_s)
        cause = self._cause()
        line = threading.Thread(target=self._last_line, args=(cause,), daemon=True)
        line.start()
        # A log handler blocked on a full pipe must not keep the process alive.
        line.join(LAST_LINE_WAIT_S)
        self._end_process(EXIT_UNCLEAN_STOP)

    def _last_line(self, cause: str | None) -> None:
        log.error(
            "the worker did not stop within %gs of %s "
            "(PUSHSTREAM_SHUTDOWN_TIMEOUT_S %gs + %gs)%s; exiting with status %d "
            "without finishing the stop. %s",
            self.timeout_s + self.margin_s,
            self._why,
            self.timeout_s,
            self.margin_s,
            f": {cause}" if cause else "",
            EXIT_UNCLEAN_STOP,
            AT_LEAST_ONCE,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()


def _thread_name(thread: threading.Thread | None) -> str:
    """The name of mode's service in a service thread, else the thread's."""
    service = getattr(thread, "service", None)
    if service is not None:
        return type(service).__name__
    return thread.name if thread is not None else "a thread"


def stop_cause(app: faust.App) -> str | None:
    """Why a stop may hang, as far as the worker can tell: the broker is gone."""
    if web.coordinator_known(app) is False:
        return "its consumer has lost the group coordinator (Kafka is unreachable)"
    return None


class PipelineWorker(faust.Worker):
    """Faust's worker, with its stop bounded by a :class:`StopWatchdog`."""

    def __init__(self, app: faust.App, watchdog: StopWatchdog, **options: Any) -> None:
        self.watchdog = watchdog
        super().__init__(app, **options)

    def _schedule_shutdown(self, sig: signal.Signals) -> None:
        # mode's handler of SIGTERM and SIGINT (mode-streaming 0.7): the stop
        # begins here, and may hang before anything else hears of it.
        self.watchdog.arm(sig.name)
        super()._schedule_shutdown(sig)

    def on_worker_shutdown(self) -> None:
        # Every stop passes here, a crash's too, once the worker stops running.
        self.watchdog.arm("beginning to stop")
        super().on_worker_shutdown()


def run_worker(settings: Settings | None = None) -> NoReturn:
    """Run one worker until SIGTERM/SIGINT; exits 0 after a clean stop.

    Exits with :data:`EXIT_UNCLEAN_STOP` when the stop did not finish within
    ``shutdown_timeout_s`` + :data:`STOP_MARGIN_S`, or finished but not
    cleanly. Raises ConfigError or WorkerError (before starting) when it
    cannot run.
    """
    settings = settings or load_settings()
    setup_logging(settings)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    # A bad credential stops the worker before it talks to Kafka.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    pipeline = build_pipeline(settings)
    loop.run_until_complete(check_credentials(settings))
    check_web_port(settings)
    try:
        loop.run_until_complete(check_topics(settings))
    except KafkaError as exc:
        raise WorkerError(kafka_problem(settings, exc)) from None
    log.info(
        "worker %s starting: kafka %s, topics %s*, %d partitions, data in %s",
        settings.app_id,
        settings.kafka_bootstrap,
        settings.topic_prefix,
        settings.partitions,
        settings.data_dir,
    )
    watchdog = StopWatchdog(
        settings.shutdown_timeout_s, cause=lambda: stop_cause(pipeline.app)
    )
    worker = PipelineWorker(
        pipeline.app,
        watchdog,
        loop=loop,
        loglevel=settings.log_level,
        override_logging=False,
        quiet=True,
    )
    worker.spinner = None  # a terminal spinner has no place in a service's log
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None) or watchdog.failure is None:
            raise
        log.error(
            "the worker stopped, but not cleanly (%s while it stopped); "
            "exiting with status %d. %s",
            watchdog.failure,
            EXIT_UNCLEAN_STOP,
            AT_LEAST_ONCE,
        )
        raise SystemExit(EXIT_UNCLEAN_STOP) from None


@click.command("worker")
def worker_command() -> None:
    """Run a worker: registry, router and senders, until SIGTERM."""
    try:
        run_worker()
    except (ConfigError, WorkerError) as exc:
        raise click.ClickException(str(exc)) from None


# --- pushstream devices USER -----------------------------------------------------


def changelog_topic(settings: Settings, table: str) -> str:
    """The Kafka topic Faust keeps a table's changes in."""
    return f"{settings.app_id}-{table}-changelog"


async def read_table_value(settings: Settings, table: str, key: bytes) -> bytes | None:
    """The latest value of ``key`` in a table, read from its changelog in Kafka.

    Reads the one partition the key hashes to (Kafka's default partitioner,
    the one upstream producers and Faust use) from its start to its current
    end. None when the key has no value (never set, or deleted).
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.partitioner import murmur2

    topic = changelog_topic(settings, table)
    count = await _partition_count(settings, topic)
    if not count:
        raise WorkerError(f"{topic} does not exist: has a worker run yet?")
    tp = TopicPartition(topic, (murmur2(key) & 0x7FFFFFFF) % count)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        **topics.kafka_security(settings),
    )
    await consumer.start()
    try:
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        value: bytes | None = None
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=int(READ_TIMEOUT_S * 1000))
            if not batch:
                raise WorkerError(f"{topic}: no answer within {READ_TIMEOUT_S:.0f}s")
            for message in batch.get(tp, ()):
                if message.key == key:
                    value = message.value
        return value
    finally:
        await consumer.stop()


async def _partition_count(settings: Settings, topic: str) -> int:
    """How many partitions a topic has (0: it does not exist)."""
    admin = topics.admin_client(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sum(len(t["partitions"]) for t in described if t["error_code"] == 0)


async def read_devices(settings: Settings, user_id: str) -> UserDevices:
    """A user's devices as the devices table holds them now."""
    raw = await read_table_value(settings, DEVICES_TABLE, user_id.encode())
    return decode_state(raw)


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def describe_devices(user_id: str, state: UserDevices) -> list[str]:
    """Lines that show a user's devices, tokens shortened."""
    count = len(state.devices)
    lines = [f"user {user_id}: {count} device{'' if count == 1 else 's'}"]
    for d in state.devices:
        lines.append(
            f"  {d.device_id}  {d.platform}  {d.app}  {d.environment}  {d.state}"
            f"  token {shorten_token(d.token)} (fp {token_fingerprint(d.token)[:12]})"
            f"  last seen {_when(d.last_seen_ms)}"
            f"  registered {_when(d.registered_at_ms)}"
        )
        if d.state == "invalid":
            lines.append(
                f"      invalid since {_when(d.invalidated_at_ms)}: {d.invalid_reason}"
            )
    return lines


def devices_json(state: UserDevices) -> str:
    """The user's table value as JSON, tokens shortened."""
    data = state.model_dump(exclude_none=True)
    for device in data["devices"]:
        device["token_fp"] = token_fingerprint(device["token"])
        device["token"] = shorten_token(device["token"])
    return json.dumps(data, indent=2, ensure_ascii=False)


@click.command("devices")
@click.argument("user_id")
@click.option("--json", "as_json", is_flag=True, help="Print the table value as JSON.")
def devices_command(user_id: str, as_json: bool) -> None:
    """Show USER_ID's devices, read from the devices table's changelog in Kafka."""
    try:
        settings = load_settings()
        state = asyncio.run(read_devices(settings, user_id))
    except (ConfigError, WorkerError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(devices_json(state))
    else:
        click.echo("\n".join(describe_devices(user_id, state)))
