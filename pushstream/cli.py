"""The ``pushstream`` command.

Subcommands report problems as one readable message and a non-zero exit
status; tracebacks are kept for bugs.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import click

from pushstream import __version__, localkafka, topics, worker
from pushstream import log as pushstream_log
from pushstream.config import ConfigError, Settings, load_settings
from pushstream.demo import demo_command
from pushstream.sandbox.main import command as sandbox_command


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    pushstream_log.setup(level, json_lines=pushstream_log.json_from_env())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pushstream")
@click.option("-v", "--verbose", is_flag=True, help="Log at DEBUG level.")
def cli(verbose: bool) -> None:
    """pushstream: push notifications as a Kafka stream processor."""
    _setup_logging(verbose)


# --- pushstream kafka ---------------------------------------------------------


@cli.group()
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=None,
    help=f"Client port on 127.0.0.1 [env {localkafka.ENV_PORT}; default "
    f"{localkafka.DEFAULT_PORT}].",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"The broker's data folder [env {localkafka.ENV_DATA}; default "
    ".cache/kafka-data].",
)
@click.option(
    "--kafka-version",
    "version",
    default=None,
    help=f"Apache Kafka version [env {localkafka.ENV_VERSION}; default "
    f"{localkafka.DEFAULT_VERSION}].",
)
@click.pass_context
def kafka(
    ctx: click.Context, port: int | None, data_dir: Path | None, version: str | None
) -> None:
    """A local single-node Apache Kafka broker (KRaft, jars from Maven)."""
    try:
        ctx.obj = localkafka.LocalKafka.from_env(
            port=port, data_dir=data_dir, version=version
        )
    except localkafka.LocalKafkaError as exc:
        raise click.ClickException(str(exc)) from None


@kafka.command("up")
@click.option(
    "--timeout",
    type=float,
    default=localkafka.DEFAULT_START_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the broker to answer.",
)
@click.pass_obj
def kafka_up(local: localkafka.LocalKafka, timeout: float) -> None:
    """Start the broker (resolving its jars first if needed); a no-op if it runs."""
    try:
        started = localkafka.up(local, timeout=timeout)
    except localkafka.LocalKafkaError as exc:
        raise click.ClickException(str(exc)) from None
    if started.started:
        how = " (jars resolved with Maven)" if started.resolved_jars else ""
        click.echo(
            f"Kafka {local.version} started on {local.bootstrap} in "
            f"{started.seconds:.1f}s{how}: pid {started.status.pid}"
        )
    elif started.foreign:
        click.echo(
            f"a Kafka broker already answers on {local.bootstrap} (not the one of "
            f"{local.data_dir}); using it"
        )
    else:
        click.echo(f"Kafka already {started.status.describe()}")


@kafka.command("down")
@click.option(
    "--timeout",
    type=float,
    default=localkafka.DEFAULT_STOP_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait after SIGTERM before SIGKILL.",
)
@click.pass_obj
def kafka_down(local: localkafka.LocalKafka, timeout: float) -> None:
    """Stop the broker (SIGTERM, then SIGKILL after the timeout)."""
    was = localkafka.down(local, timeout=timeout)
    if was.running:
        click.echo(f"Kafka stopped (pid {was.pid})")
    else:
        click.echo(f"no broker of {local.data_dir} runs; nothing to stop")


@kafka.command("status")
@click.pass_obj
def kafka_status(local: localkafka.LocalKafka) -> None:
    """Print whether the broker runs; exit status 1 when it does not."""
    current = localkafka.status(local)
    click.echo(f"Kafka {current.describe()}")
    if current.running:
        return
    if localkafka.broker_answers(local.bootstrap):
        click.echo(
            f"another broker answers on {local.bootstrap}; `kafka down` leaves it alone"
        )
    sys.exit(1)


@kafka.command("in-use")
@click.pass_obj
def kafka_in_use(local: localkafka.LocalKafka) -> None:
    """Exit 0 when a broker runs on the port (this data folder's or another
    that answers), 1 when `up` would start one; prints nothing."""
    if not localkafka.in_use(local):
        sys.exit(1)


# --- pushstream topics --------------------------------------------------------


def _settings(**overrides: Any) -> Settings:
    """The settings from the environment, with the given options on top."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        return load_settings(**given)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _days(ms: str | None) -> str:
    if ms is None or not ms.isdigit():
        return str(ms)
    return f"{int(ms) / 86_400_000:g}d"


def _print_report(report: topics.Report) -> None:
    for state in report.topics:
        spec = topics.BY_NAME[state.name]
        retention = _days(state.config.get("retention.ms"))
        plural = "" if state.partitions == 1 else "s"
        click.echo(
            f"{state.action:<9} {state.topic:<32} {state.partitions:>3} partition"
            f"{plural:<1}  {state.config.get('cleanup.policy', '-')}, retention "
            f"{retention}  key: {spec.key}"
        )
    for problem in report.problems:
        click.echo(f"error: {problem}", err=True)
    if not report.ok:
        click.echo(
            "some topics differ from the spec; pushstream never alters an existing "
            "topic: fix or delete it, or change the settings",
            err=True,
        )


@cli.group("topics")
@click.option(
    "--bootstrap",
    default=None,
    help="Kafka bootstrap servers [env PUSHSTREAM_KAFKA_BOOTSTRAP].",
)
@click.option(
    "--prefix", default=None, help="Topic name prefix [env PUSHSTREAM_TOPIC_PREFIX]."
)
@click.pass_context
def topics_group(ctx: click.Context, bootstrap: str | None, prefix: str | None) -> None:
    """pushstream's Kafka topics: create and check them, and their JSON Schemas."""
    ctx.obj = {"kafka_bootstrap": bootstrap, "topic_prefix": prefix}


@topics_group.command("create")
@click.pass_obj
def topics_create(overrides: dict[str, Any]) -> None:
    """Create the missing topics and check the others; exit 1 if any differs."""
    _report_topics(topics.ensure_topics, _settings(**overrides))


@topics_group.command("describe")
@click.pass_obj
def topics_describe(overrides: dict[str, Any]) -> None:
    """Show the topics as the broker has them; exit 1 if any is missing or differs."""
    _report_topics(topics.describe_topics, _settings(**overrides))


def _report_topics(
    check: Callable[[Settings], Coroutine[Any, Any, topics.Report]],
    settings: Settings,
) -> None:
    """Run one topic check against the broker, print it, exit 1 if it failed."""
    try:
        report = asyncio.run(check(settings))
    except topics.TopicError as exc:
        raise click.ClickException(str(exc)) from None
    _print_report(report)
    if not report.ok:
        sys.exit(1)


@topics_group.command("schemas")
@click.option(
    "--write", is_flag=True, help="Rewrite the files instead of checking them."
)
@click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the files are [default: topics/ in the project].",
)
def topics_schemas(write: bool, folder: Path | None) -> None:
    """Check topics/<name>.json against the event models (exit 1 on drift)."""
    folder = folder or localkafka.project_root() / "topics"
    if write:
        for path in topics.write_schemas(folder):
            click.echo(f"wrote {path}")
        return
    drift = topics.schema_drift(folder)
    for problem in drift:
        click.echo(f"error: {problem}", err=True)
    if drift:
        click.echo(
            "the topic schemas are out of date: run `pushstream topics schemas "
            "--write` and commit topics/",
            err=True,
        )
        sys.exit(1)
    click.echo(f"{len(topics.TOPICS)} topic schemas in {folder} match the models")


cli.add_command(worker.worker_command)
cli.add_command(worker.devices_command)
cli.add_command(sandbox_command)
cli.add_command(demo_command)


def main() -> None:
    """Entry point of the ``pushstream`` console script."""
    cli(prog_name="pushstream")
