"""The ``pushstream`` command.

Subcommands report problems as one readable message and a non-zero exit
status; tracebacks are kept for bugs.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from pushstream import __version__, localkafka


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


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
        click.echo("Kafka was not running")


@kafka.command("status")
@click.pass_obj
def kafka_status(local: localkafka.LocalKafka) -> None:
    """Print whether the broker runs; exit status 1 when it does not."""
    current = localkafka.status(local)
    click.echo(f"Kafka {current.describe()}")
    if not current.running:
        sys.exit(1)


def main() -> None:
    """Entry point of the ``pushstream`` console script."""
    cli(prog_name="pushstream")
