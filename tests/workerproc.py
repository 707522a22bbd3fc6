"""A real ``pushstream worker`` subprocess for integration tests.

Usage, with the ``worker_env`` fixture of ``conftest.py`` (which points the
worker at the test's broker, topic prefix, app id and data folder)::

    from workerproc import WorkerProcess, wait_consumed

    async def test_something(kafka, settings, worker_env):
        await kafka.create_topics(settings)
        with WorkerProcess(worker_env()) as worker:      # started and ready
            await kafka.produce(settings.topic("registrations"), [...])
            await wait_consumed(settings)                # handled, outputs out
            ...
            assert worker.stop() == 0                    # SIGTERM, clean exit

- :class:`WorkerProcess` starts ``python -m pushstream worker`` with the given
  environment plus a free ``PUSHSTREAM_WEB_PORT``, and waits until
  ``GET /ready`` answers 200: partitions assigned and tables recovered from
  their changelogs. Everything the worker prints goes to a log file; when
  it dies, does not get ready, or does not stop, the test fails with the
  tail of that log, and when the test fails inside the ``with`` block the
  tail is printed (pytest shows it with the failure).
- :meth:`WorkerProcess.stop` sends SIGTERM and returns the exit status;
  :meth:`WorkerProcess.kill` sends SIGKILL (a crash); :meth:`WorkerProcess.start`
  starts it again with the same environment and data folder, appending to
  the same log.
- :func:`wait_consumed` waits until the worker's consumer group has committed
  everything in the given topics. Faust commits an offset only after the
  event was handled and what it published was flushed, so afterwards every
  effect of the events published so far is in Kafka (and a test may assert
  that something was *not* published).
- :func:`read_all` reads a whole topic (to its current end) without a group;
  :func:`read_table` reads a whole table from its changelog.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import pytest

from pushstream import localstack, topics
from pushstream.config import Settings
from pushstream.localstack import free_port

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 45.0
CONSUMED_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 80

# The input topics of the parts a worker runs, before the prefix.
WORKER_INPUTS = (
    topics.REGISTRATIONS,
    topics.TOKEN_EVENTS,
    topics.TOKEN_OWNERS,
)


class WorkerProcess:
    """One ``pushstream worker`` subprocess; a context manager that stops it."""

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_path: Path | None = None,
        start: bool = True,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.env = dict(env)
        self.port = int(self.env.setdefault("PUSHSTREAM_WEB_PORT", str(free_port())))
        data_dir = Path(self.env.get("PUSHSTREAM_DATA_DIR", ".cache/worker"))
        self.log_path = log_path or data_dir.parent / f"worker-{self.port}.log"
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        if start:
            self.start()

    # --- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the worker (again) and wait until it is ready."""
        assert not self.running, "the worker is already running"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            log.write(f"--- starting worker on port {self.port}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pushstream", "worker"],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in pytest does not reach it
            )
        self.returncode = None
        self.wait_ready(self.ready_timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Poll ``GET /ready`` until 200; fail the test if it dies or times out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                self._fail(f"the worker exited with status {code} before ready")
            status, body = self.ready()
            if status == 200:
                return body
            last = f"HTTP {status} {body}" if status else "no answer"
            time.sleep(0.2)
        self._fail(f"the worker was not ready within {timeout:.0f}s ({last})")

    def ready(self) -> tuple[int, dict[str, Any]]:
        """The /ready answer: (status, JSON body); (0, {}) when nothing answers."""
        url = f"http://127.0.0.1:{self.port}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                return exc.code, json.loads(exc.read() or b"{}")
            except ValueError:
                return exc.code, {}
        except (OSError, ValueError):
            return 0, {}

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, and return the exit status (SIGKILL and fail on timeout)."""
        assert self.process is not None, "the worker was never started"
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                self._fail(f"the worker did not stop within {timeout:.0f}s of SIGTERM")
        self.returncode = self.process.returncode
        return self.returncode

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, as in a crash or an OOM kill."""
        assert self.process is not None, "the worker was never started"
        if self.process.poll() is None:
            self.process.kill()
        self.returncode = self.process.wait()

    # --- the log -----------------------------------------------------------

    def log(self) -> str:
        """Everything the worker printed so far (every start appends)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _fail(self, message: str) -> NoReturn:
        pytest.fail(
            f"{message}\n--- worker log ({self.log_path}), last lines:\n"
            f"{self.log_tail()}"
        )

    # --- context manager ---------------------------------------------------

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            print(f"--- worker log ({self.log_path}), last lines:\n{self.log_tail()}")
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.stop()
        except BaseException:
            if exc is None:
                raise


# --- Kafka helpers -----------------------------------------------------------


async def wait_consumed(
    settings: Settings,
    names: Iterable[str] = WORKER_INPUTS,
    *,
    within: float = CONSUMED_TIMEOUT_S,
) -> None:
    """Wait until the worker's group has committed every record of ``names``
    (see :func:`pushstream.localstack.wait_consumed`); fail the test otherwise."""
    try:
        await localstack.wait_consumed(settings, names, within=within)
    except localstack.StackError as exc:
        pytest.fail(f"the worker did not consume everything: {exc}")


@dataclass(frozen=True)
class Message:
    """One record of a topic: key as text (or None), value decoded from JSON."""

    partition: int
    offset: int
    key: str | None
    value: Any


async def read_all(settings: Settings, topic: str) -> list[Message]:
    """Every record now in ``topic`` (full name), values parsed as JSON."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    admin = topics.admin_client(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [
        TopicPartition(topic, p["partition"])
        for t in described
        if t["error_code"] == 0
        for p in t["partitions"]
    ]
    assert tps, f"topic {topic} does not exist"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        got: list[Message] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    got.append(
                        Message(
                            partition=record.partition,
                            offset=record.offset,
                            key=record.key.decode() if record.key else None,
                            value=_json_or_bytes(record.value),
                        )
                    )
        return sorted(got, key=lambda m: (m.partition, m.offset))
    finally:
        await consumer.stop()


async def read_table(settings: Settings, table: str) -> dict[str, Any]:
    """A whole table as its changelog holds it now: key -> latest value (JSON).

    Keys whose latest record is a deletion are left out.
    """
    topic = f"{settings.app_id}-{table}-changelog"
    latest: dict[str, Any] = {}
    for message in await read_all(settings, topic):
        assert message.key is not None
        if message.value is None:
            latest.pop(message.key, None)
        else:
            latest[message.key] = message.value
    return latest


def _json_or_bytes(raw: bytes | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


async def wait_for(
    settings: Settings,
    topic: str,
    match: Callable[[list[Message]], bool],
    *,
    within: float = 90.0,
) -> list[Message]:
    """Read ``topic`` (short name) until ``match`` accepts its records.

    Fails the test after ``within`` seconds, showing what the topic held.
    """
    deadline = time.monotonic() + within
    while True:
        records = await read_all(settings, settings.topic(topic))
        if match(records):
            return records
        if time.monotonic() > deadline:
            pytest.fail(f"{topic}: no match within {within:.0f}s: {records!r}"[:3000])
        await asyncio.sleep(0.5)
