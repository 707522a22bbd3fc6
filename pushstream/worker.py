"""The ``pushstream worker`` process, and ``pushstream devices`` to look a user up.

:func:`run_worker` builds the :class:`~pushstream.app.Pipeline` from the
settings, attaches every part of the pipeline (:data:`PARTS`), checks that
pushstream's topics exist with the partition counts the tables need, and runs
Faust's worker until SIGTERM or SIGINT, after which it stops cleanly (offsets
committed, tables flushed) and exits with status 0.

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
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from typing import NoReturn

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


def run_worker(settings: Settings | None = None) -> NoReturn:
    """Run one worker until SIGTERM/SIGINT; exits 0 after a clean stop.

    Raises ConfigError or WorkerError (before starting) when it cannot run.
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
    worker = faust.Worker(
        pipeline.app,
        loop=loop,
        loglevel=settings.log_level,
        override_logging=False,
        quiet=True,
    )
    worker.spinner = None  # a terminal spinner has no place in a service's log
    worker.execute_from_commandline()


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
