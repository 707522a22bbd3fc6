"""pushstream's parts on one machine, as the demo and the benchmarks run them.

- :func:`ensure_broker`: a Kafka broker at the bootstrap address; the local
  one (:mod:`pushstream.localkafka`) is started when nothing answers, and
  :attr:`Broker.started` says whether it was, so that only a broker started
  here is stopped afterwards.
- :class:`Child`: a subprocess in its own process group (a Ctrl-C in the
  terminal reaches only the parent, which stops its children in order), its
  output in a log file; :meth:`Child.stop` sends SIGTERM to the group, then
  SIGKILL after a timeout.
- :func:`start_sandbox`: ``pushstream sandbox`` on free ports, with its env
  file (the settings that point a worker at it) and its admin API
  (:class:`SandboxAdmin`, which the tests' sandbox process uses too).
- :func:`start_worker`: ``pushstream worker``, ready once ``GET /ready``
  answers 200.
- :func:`wait_consumed`: until a consumer group has committed every record
  of some topics, i.e. the worker has handled them and published their
  effects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pushstream import localkafka, topics
from pushstream.config import Settings
from pushstream.sandbox.main import ENV_FILE, PORTS_FILE, parse_env

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.25
LOG_TAIL_LINES = 30


class StackError(Exception):
    """A part did not start, or did not finish in time; the message says which."""


# --- the broker ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Broker:
    """The broker in use; ``started`` when it was started here."""

    bootstrap: str
    started: bool
    local: localkafka.LocalKafka | None = None

    def stop(self) -> None:
        """Stop the broker if it was started here; leave it alone otherwise."""
        if self.started and self.local is not None:
            localkafka.down(self.local)


def ensure_broker(bootstrap: str) -> Broker:
    """Use the broker answering at ``bootstrap``, or start the local one there.

    Blocking (it may resolve Kafka's jars and start a JVM). Raises
    StackError when nothing answers at a non-local address.
    """
    if localkafka.broker_answers(bootstrap):
        return Broker(bootstrap, started=False)
    host, _, port = bootstrap.rpartition(":")
    if "," in bootstrap or host not in ("127.0.0.1", "localhost") or not port:
        raise StackError(f"no Kafka broker answers at {bootstrap}")
    local = localkafka.LocalKafka.from_env(port=int(port))
    try:
        started = localkafka.up(local)
    except localkafka.LocalKafkaError as exc:
        raise StackError(str(exc)) from None
    return Broker(local.bootstrap, started=started.started, local=local)


# --- child processes ------------------------------------------------------------


class Child:
    """One subprocess in its own process group, writing to ``log_path``."""

    def __init__(
        self, name: str, argv: list[str], env: Mapping[str, str], log_path: Path
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = dict(env)
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it; its output is appended to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, within: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM to its group, SIGKILL after ``within`` seconds; its exit status."""
        process = self.process
        if process is None:
            return None
        if process.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), within)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await process.wait()
        return process.returncode

    def kill(self) -> None:
        """SIGKILL to its group at once (a last resort that needs no event loop)."""
        if self.running:
            self._signal(signal.SIGKILL)

    def _signal(self, signum: signal.Signals) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines it printed."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def failed(self, message: str) -> StackError:
        """An error naming this child, with the end of its log."""
        return StackError(
            f"{self.name}: {message}\n--- last lines of {self.log_path}:\n"
            f"{self.log_tail()}"
        )


def free_port() -> int:
    """A TCP port nothing listens on right now, on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pushstream_argv(*args: str) -> list[str]:
    """The command line of a ``pushstream`` subcommand with this interpreter."""
    return [sys.executable, "-m", "pushstream", *args]


# --- the sandbox ------------------------------------------------------------------


def sandbox_argv(folder: Path) -> list[str]:
    """``pushstream sandbox`` with every listener on a free port, its files in
    ``folder``."""
    ports = ("--apns-port", "0", "--fcm-port", "0", "--wns-port", "0")
    return pushstream_argv(
        "sandbox", *ports, "--admin-port", "0", "--folder", str(folder)
    )


def sandbox_listening(folder: Path) -> tuple[dict[str, int], dict[str, str]] | None:
    """The ports a sandbox started with ``sandbox_argv(folder)`` listens on, and
    the settings of its env file; None until every listener is bound."""
    ports_file = folder / PORTS_FILE
    if not ports_file.exists():
        return None
    found = json.loads(ports_file.read_text())
    ports = {k: v for k, v in found.items() if isinstance(v, int)}
    return ports, parse_env((folder / ENV_FILE).read_text())


class SandboxAdmin:
    """The admin API of a running sandbox, for a class that holds its ``ports``.

    The calls block: run them in a thread from async code. A call the
    sandbox refuses raises StackError with its status and reason.
    """

    ports: dict[str, int]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """One admin API call; the answer's JSON."""
        url = f"http://127.0.0.1:{self.ports['admin']}{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise StackError(f"sandbox {method} {path}: {exc.code} {detail}") from None

    def wns_channel(
        self, package: str = "Contoso.Sandbox", scenario: str = "ok"
    ) -> str:
        """A new channel URI of one of the sandbox's WNS apps."""
        query = urllib.parse.urlencode({"package": package, "scenario": scenario})
        uri: str = self.call("GET", f"/wns-channel?{query}")["uri"]
        return uri

    def stats(self) -> dict[str, Any]:
        """Per platform: requests, token_requests, statuses, accepted, outage."""
        stats: dict[str, Any] = self.call("GET", "/stats")
        return stats

    def accepted(self, platform: str) -> list[dict[str, Any]]:
        """The pushes one stand-in accepted, oldest first."""
        query = urllib.parse.urlencode({"platform": platform})
        accepted: list[dict[str, Any]] = self.call("GET", f"/accepted?{query}")
        return accepted


class SandboxChild(Child, SandboxAdmin):
    """``pushstream sandbox`` with its ports, env file and admin API."""

    def __init__(self, folder: Path, env: Mapping[str, str] | None = None) -> None:
        super().__init__(
            "sandbox",
            sandbox_argv(folder),
            os.environ if env is None else env,
            folder / "sandbox.log",
        )
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PORTS_FILE).unlink(missing_ok=True)
        self.ports: dict[str, int] = {}
        self.worker_env: dict[str, str] = {}

    async def wait_listening(self, within: float) -> None:
        """Wait until every listener is bound; read the ports and the env file."""
        deadline = time.monotonic() + within
        while (listening := sandbox_listening(self.folder)) is None:
            if not self.running:
                raise self.failed("exited before it listened")
            if time.monotonic() > deadline:
                raise self.failed(f"not listening after {within:.0f}s")
            await asyncio.sleep(0.1)
        self.ports, self.worker_env = listening


async def start_sandbox(
    folder: Path, *, within: float = READY_TIMEOUT_S
) -> SandboxChild:
    """Start ``pushstream sandbox`` on free ports, its files in ``folder``."""
    sandbox = SandboxChild(folder)
    await sandbox.start()
    try:
        await sandbox.wait_listening(within)
    except BaseException:
        await sandbox.stop()
        raise
    return sandbox


# --- the worker ---------------------------------------------------------------------


def worker_env(
    settings: Settings, extra: Mapping[str, str] | None = None, **variables: str
) -> dict[str, str]:
    """The environment of a worker configured like ``settings``, plus ``extra``
    (the sandbox's settings, say) and ``variables``."""
    env = dict(os.environ)
    env.update(extra or {})
    env.update(
        PUSHSTREAM_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        PUSHSTREAM_TOPIC_PREFIX=settings.topic_prefix,
        PUSHSTREAM_APP_ID=settings.app_id,
        PUSHSTREAM_DATA_DIR=str(settings.data_dir),
        PUSHSTREAM_PARTITIONS=str(settings.partitions),
        PUSHSTREAM_SEND_PARTITIONS=str(settings.send_partitions),
    )
    env.update(variables)
    return env


class WorkerChild(Child):
    """``pushstream worker`` on a free web port."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.port = free_port()
        env = {**env, "PUSHSTREAM_WEB_PORT": str(self.port)}
        super().__init__("worker", pushstream_argv("worker"), env, log_path)

    async def wait_ready(self, within: float) -> None:
        """Poll ``GET /ready`` until it answers 200."""
        deadline = time.monotonic() + within
        url = f"http://127.0.0.1:{self.port}/ready"
        while True:
            if not self.running:
                raise self.failed("exited before it was ready")
            if await asyncio.to_thread(_status, url) == 200:
                return
            if time.monotonic() > deadline:
                raise self.failed(f"not ready after {within:.0f}s")
            await asyncio.sleep(POLL_S)


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def start_worker(
    env: Mapping[str, str], log_path: Path, *, within: float = READY_TIMEOUT_S
) -> WorkerChild:
    """Start ``pushstream worker`` and wait until it is ready."""
    worker = WorkerChild(env, log_path)
    await worker.start()
    try:
        await worker.wait_ready(within)
    except BaseException:
        await worker.stop()
        raise
    return worker


# --- Kafka positions ----------------------------------------------------------------


async def partitions(settings: Settings, names: Iterable[str]) -> list[Any]:
    """The TopicPartitions of pushstream topics (names before the prefix)."""
    from aiokafka import TopicPartition

    admin = topics.admin_client(settings)
    await admin.start()
    try:
        described = await admin.describe_topics([settings.topic(n) for n in names])
    finally:
        await admin.close()
    return [
        TopicPartition(t["topic"], p["partition"])
        for t in described
        if t["error_code"] == 0
        for p in t["partitions"]
    ]


async def end_offsets(settings: Settings, tps: list[Any]) -> dict[Any, int]:
    """Each partition's end offset now."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, **topics.kafka_security(settings)
    )
    await consumer.start()
    try:
        ends: dict[Any, int] = await consumer.end_offsets(tps)
        return ends
    finally:
        await consumer.stop()


async def wait_consumed(
    settings: Settings, names: Iterable[str], *, within: float
) -> None:
    """Wait until the worker's group has committed every record of ``names``.

    Committed offsets are read before end offsets, so when they are equal
    nothing was in flight: every record was handled and what it published
    is in Kafka (outputs to these same topics included). Raises StackError
    naming the lagging partitions after ``within`` seconds.
    """
    from aiokafka import AIOKafkaConsumer

    tps = await partitions(settings, names)
    admin = topics.admin_client(settings)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, **topics.kafka_security(settings)
    )
    await admin.start()
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        while True:
            committed = await admin.list_consumer_group_offsets(settings.app_id)
            ends = await consumer.end_offsets(tps)
            behind = {
                tp: (max(committed[tp].offset if tp in committed else 0, 0), ends[tp])
                for tp in tps
            }
            behind = {tp: pos for tp, pos in behind.items() if pos[0] < pos[1]}
            if not behind:
                return
            if time.monotonic() > deadline:
                lag = ", ".join(
                    f"{tp.topic}[{tp.partition}] {done}/{end}"
                    for tp, (done, end) in sorted(behind.items())
                )
                raise StackError(f"not consumed within {within:.0f}s: {lag}")
            await asyncio.sleep(POLL_S)
    finally:
        await consumer.stop()
        await admin.close()


async def delete_topics(settings: Settings) -> None:
    """Delete a run's topics: every topic whose name starts with the app id.

    That is the pushstream topics when the topic prefix begins with the app
    id (as a run's own prefix does), and the tables' changelogs, which Faust
    names after the app id.
    """
    admin = topics.admin_client(settings)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(settings.app_id)]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()
