"""A local, single-node Apache Kafka broker for development, tests and the demo.

The broker is the real Apache Kafka (KRaft mode, broker and controller in one
JVM) run from its Maven Central jars: ``org.apache.kafka:kafka_2.13`` and its
runtime dependencies, plus a log4j2 binding so the broker writes a log file.
Maven resolves them once into ``<cache>/kafka/<version>/lib``; later starts
reuse that folder. It needs ``java`` (17 or newer) and ``mvn`` on PATH.

Everything a broker owns lives in one data folder::

    server.properties   written on every start from the options
    log4j2.properties   the broker's logging
    kraft/              log.dirs: meta.properties, the metadata log, topic data
    logs/server.log     the broker's own log
    broker.out          the JVM's stdout and stderr
    broker.json         pid, ports and version of the running broker

The folder is formatted (``kafka.tools.StorageTool``) only when it holds no
``meta.properties``, so a broker stopped with ``kill -9`` restarts on its data.
The broker runs in its own session, detached from the shell that started it;
:func:`down` stops it with SIGTERM (a controlled shutdown) and SIGKILL after a
timeout.

Failures raise :class:`LocalKafkaError` with a message meant for a person,
including the tail of the broker's log when it did not come up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_VERSION = "4.1.1"
# The log4j2 release Kafka 4.1 itself depends on; log4j-slf4j-impl binds the
# slf4j 1.7 API that Kafka 4.x logs through.
LOG4J_VERSION = "2.24.3"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
DEFAULT_PORT = 9092
DEFAULT_HEAP = "-Xms256m -Xmx512m"
TOOL_HEAP = "-Xms64m -Xmx256m"  # StorageTool needs far less than a broker
DEFAULT_START_TIMEOUT_S = 90.0
DEFAULT_STOP_TIMEOUT_S = 30.0
MIN_JAVA = 17
PORT_RELEASE_S = 3.0

ENV_PORT = "PUSHSTREAM_KAFKA_PORT"
ENV_DATA = "PUSHSTREAM_KAFKA_DATA"
ENV_VERSION = "PUSHSTREAM_KAFKA_VERSION"
ENV_CACHE = "PUSHSTREAM_KAFKA_CACHE"
ENV_HEAP = "PUSHSTREAM_KAFKA_HEAP"

_JVM_OPTS = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:MaxDirectMemorySize=256m",
    "-Djava.awt.headless=true",
)


class LocalKafkaError(Exception):
    """The local broker could not be resolved, started, reached or stopped."""


@dataclass(frozen=True)
class LocalKafka:
    """Where and how the local broker runs.

    ``port`` is the client (PLAINTEXT) port on 127.0.0.1; the controller
    listens on ``controller_port``, or on a free port picked at each start
    when that is 0. ``cache_dir`` holds the jars, ``data_dir`` the broker.
    """

    version: str = DEFAULT_VERSION
    port: int = DEFAULT_PORT
    data_dir: Path = Path(".cache/kafka-data")
    cache_dir: Path = Path(".cache")
    controller_port: int = 0
    heap: str = DEFAULT_HEAP
    extra_config: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> LocalKafka:
        """Read PUSHSTREAM_KAFKA_{PORT,DATA,VERSION,CACHE,HEAP}; None overrides
        are ignored, so CLI options can be passed straight through."""
        env = os.environ if env is None else env
        root = project_root()
        cache = Path(env.get(ENV_CACHE) or root / ".cache")
        found = cls(
            version=env.get(ENV_VERSION) or DEFAULT_VERSION,
            port=_port(env.get(ENV_PORT), ENV_PORT) or DEFAULT_PORT,
            data_dir=Path(env.get(ENV_DATA) or root / ".cache" / "kafka-data"),
            cache_dir=cache,
            heap=env.get(ENV_HEAP) or DEFAULT_HEAP,
        )
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(found, **given)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def lib_dir(self) -> Path:
        return self.cache_dir / "kafka" / self.version / "lib"

    @property
    def log_dirs(self) -> Path:
        return self.data_dir / "kraft"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    @property
    def out_file(self) -> Path:
        return self.data_dir / "broker.out"

    @property
    def state_file(self) -> Path:
        return self.data_dir / "broker.json"


@dataclass(frozen=True)
class Status:
    """What :func:`status` found: a running broker's pid, port and version."""

    running: bool
    pid: int | None = None
    port: int | None = None
    version: str | None = None
    data_dir: Path | None = None
    started_at: float | None = None

    def describe(self) -> str:
        if not self.running:
            return f"not running (data {self.data_dir})"
        return (
            f"running: pid {self.pid}, 127.0.0.1:{self.port}, "
            f"Kafka {self.version}, data {self.data_dir}"
        )


@dataclass(frozen=True)
class Started:
    """What :func:`up` did: ``started`` is False when a broker already ran;
    ``foreign`` when that broker answers on the port but belongs to another
    data folder (it is used, and left alone)."""

    status: Status
    started: bool
    seconds: float
    resolved_jars: bool = False
    foreign: bool = False


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) that holds a
    pyproject.toml, or ``start`` itself; the default cache lives there."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here


# --- jars ---------------------------------------------------------------------


def pom_xml(version: str, log4j_version: str = LOG4J_VERSION) -> str:
    """A throwaway POM whose runtime dependencies are a runnable broker."""
    deps = [
        ("org.apache.kafka", "kafka_2.13", version),
        ("org.apache.logging.log4j", "log4j-api", log4j_version),
        ("org.apache.logging.log4j", "log4j-core", log4j_version),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", log4j_version),
    ]
    items = "".join(
        f"    <dependency><groupId>{g}</groupId><artifactId>{a}</artifactId>"
        f"<version>{v}</version></dependency>\n"
        for g, a, v in deps
    )
    return (
        '<project xmlns="http://maven.apache.org/POM/4.0.0">\n'
        "  <modelVersion>4.0.0</modelVersion>\n"
        "  <groupId>local.pushstream</groupId>\n"
        "  <artifactId>kafka-runtime</artifactId>\n"
        f"  <version>{version}</version>\n"
        "  <packaging>pom</packaging>\n"
        f"  <dependencies>\n{items}  </dependencies>\n"
        "</project>\n"
    )


def ensure_jars(kafka: LocalKafka) -> bool:
    """Resolve the broker's jars into ``kafka.lib_dir`` unless already there.

    Returns True when Maven ran. The folder appears only once complete (it is
    renamed into place), so an interrupted download is retried next time.
    """
    if _has_jars(kafka.lib_dir):
        return False
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            "Maven (mvn) is not on PATH; it resolves Kafka's jars "
            "(Debian/Ubuntu: apt-get install maven)"
        )
    work = kafka.lib_dir.parent
    work.mkdir(parents=True, exist_ok=True)
    with _locked(work / ".lock"):
        if _has_jars(kafka.lib_dir):
            return False
        log.info("resolving Kafka %s jars with Maven into %s", kafka.version, work)
        (work / "pom.xml").write_text(pom_xml(kafka.version))
        staging = work / "lib.partial"
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(work / "pom.xml"),
            f"{DEPENDENCY_PLUGIN}:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={staging}",
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0 or not _has_jars(staging):
            output = (done.stdout + done.stderr).strip()
            raise LocalKafkaError(
                f"Maven could not resolve org.apache.kafka:kafka_2.13:"
                f"{kafka.version}:\n{_tail_text(output, 40)}"
            )
        staging.rename(kafka.lib_dir)
    return True


def _has_jars(lib: Path) -> bool:
    return lib.is_dir() and any(lib.glob("kafka_2.13-*.jar"))


# --- configuration ------------------------------------------------------------


def server_properties(kafka: LocalKafka, controller_port: int) -> dict[str, str]:
    """The broker's settings: one KRaft node on loopback, sized for a laptop.

    Topics are never created implicitly (pushstream creates each one with its
    partition count), internal topics have one partition and one replica, and
    the first consumer-group rebalance is not delayed.
    """
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
        "listeners": (
            f"PLAINTEXT://127.0.0.1:{kafka.port},"
            f"CONTROLLER://127.0.0.1:{controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{kafka.port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        "log.dirs": str(kafka.log_dirs.resolve()),
        "num.partitions": "1",
        "default.replication.factor": "1",
        "auto.create.topics.enable": "false",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "group.initial.rebalance.delay.ms": "0",
        # After a kill -9 the new JVM can register only once the old session
        # expired; the default (9 s) makes that restart needlessly slow.
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "6000",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "num.recovery.threads.per.data.dir": "1",
        "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
        "log.segment.bytes": str(16 * 1024 * 1024),
    }
    props.update(kafka.extra_config)
    return props


LOG4J2_PROPERTIES = """\
# Written by pushstream.localkafka on every start.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.filePattern = ${sys:kafka.logs.dir}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.clients.name = org.apache.kafka.clients
logger.clients.level = WARN
"""


def render_properties(props: Mapping[str, str]) -> str:
    lines = ["# Written by pushstream.localkafka on every start."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


# --- status -------------------------------------------------------------------


def status(kafka: LocalKafka) -> Status:
    """Whether the broker of ``kafka.data_dir`` runs; stale state is ignored."""
    state = _read_state(kafka)
    pid = state.get("pid")
    if isinstance(pid, int) and _is_our_broker(pid, kafka):
        return Status(
            running=True,
            pid=pid,
            port=state.get("port"),
            version=state.get("version"),
            data_dir=kafka.data_dir,
            started_at=state.get("started_at"),
        )
    return Status(running=False, data_dir=kafka.data_dir)


def in_use(kafka: LocalKafka) -> bool:
    """True when :func:`up` would start nothing: the broker of this data folder
    runs (perhaps still starting), or another broker answers on the port."""
    return status(kafka).running or broker_answers(kafka.bootstrap)


def _read_state(kafka: LocalKafka) -> dict[str, Any]:
    try:
        state = json.loads(kafka.state_file.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _is_our_broker(pid: int, kafka: LocalKafka) -> bool:
    """True when ``pid`` lives and is the Kafka JVM of this data folder
    (a recycled pid of another program does not count)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _pid_alive(pid)
    args = raw.decode(errors="replace").split("\0")
    config = str((kafka.data_dir / "server.properties").resolve())
    return "kafka.Kafka" in args and config in args


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- up -----------------------------------------------------------------------


def up(kafka: LocalKafka, timeout: float = DEFAULT_START_TIMEOUT_S) -> Started:
    """Start the broker and return once it answers a metadata request.

    A broker already running for this data folder is left alone (and waited
    for, in case it is still starting); so is another Kafka broker that
    already answers on the port (``Started.foreign``). Raises LocalKafkaError
    with the tail of the broker's log when it exits or does not answer within
    ``timeout``.
    """
    began = time.monotonic()
    kafka.data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(kafka.data_dir / ".lock"):
        current = status(kafka)
        if current.running:
            if current.port != kafka.port:
                raise LocalKafkaError(
                    f"the broker in {kafka.data_dir} already runs on port "
                    f"{current.port}, not {kafka.port}; stop it first"
                )
            _wait_ready(kafka, current.pid, began + timeout)
            return Started(current, started=False, seconds=time.monotonic() - began)

        if not _port_free(kafka.port) and broker_answers(kafka.bootstrap):
            # Another checkout's broker, say: usable, but not ours to manage.
            other = Status(running=True, port=kafka.port)
            return Started(other, False, time.monotonic() - began, foreign=True)
        if not _wait_port_free(kafka.port, PORT_RELEASE_S):
            raise LocalKafkaError(
                f"127.0.0.1:{kafka.port} is in use by another program; choose "
                f"another port with --port or {ENV_PORT}"
            )
        resolved = ensure_jars(kafka)
        _check_java()
        controller_port = kafka.controller_port or _free_port()
        _write_config(kafka, controller_port)
        if not (kafka.log_dirs / "meta.properties").is_file():
            _format(kafka)
        pid = _spawn(kafka)
        state = {
            "pid": pid,
            "port": kafka.port,
            "controller_port": controller_port,
            "version": kafka.version,
            "started_at": time.time(),
        }
        kafka.state_file.write_text(json.dumps(state, indent=2) + "\n")
        try:
            _wait_ready(kafka, pid, began + timeout)
        except LocalKafkaError:
            _stop_pid(pid, DEFAULT_STOP_TIMEOUT_S)
            raise
        seconds = time.monotonic() - began
        log.info("Kafka %s up on %s in %.1fs", kafka.version, kafka.bootstrap, seconds)
        return Started(status(kafka), True, seconds, resolved_jars=resolved)


def _check_java() -> None:
    java = shutil.which("java")
    if java is None:
        raise LocalKafkaError(
            f"java is not on PATH; Kafka needs Java {MIN_JAVA} or newer"
        )
    done = subprocess.run(
        [java, "-version"], capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    words = (done.stderr + done.stdout).replace('"', " ").split()
    for word in words:
        head = word.split(".")[0].split("-")[0]
        if head.isdigit() and "." in word:
            if int(head) < MIN_JAVA:
                raise LocalKafkaError(
                    f"Kafka needs Java {MIN_JAVA} or newer, found {word}"
                )
            return


def _write_config(kafka: LocalKafka, controller_port: int) -> None:
    (kafka.data_dir / "logs").mkdir(parents=True, exist_ok=True)
    props = server_properties(kafka, controller_port)
    (kafka.data_dir / "server.properties").write_text(render_properties(props))
    (kafka.data_dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)


def _java_command(kafka: LocalKafka, heap: str, main: str, *args: str) -> list[str]:
    data = kafka.data_dir.resolve()
    return [
        "java",
        *heap.split(),
        *_JVM_OPTS,
        f"-Dlog4j2.configurationFile={data / 'log4j2.properties'}",
        f"-Dkafka.logs.dir={data / 'logs'}",
        "-cp",
        str(kafka.lib_dir.resolve() / "*"),
        main,
        *args,
    ]


def _format(kafka: LocalKafka) -> None:
    """Format an empty log folder as a new single-node cluster."""
    shutil.rmtree(kafka.log_dirs, ignore_errors=True)
    cluster_id = _cluster_id()
    config = str((kafka.data_dir / "server.properties").resolve())
    # "=": a random id may begin with "-", which would read as an option.
    args = ("format", f"--cluster-id={cluster_id}", "-c", config)
    command = _java_command(kafka, TOOL_HEAP, "kafka.tools.StorageTool", *args)
    done = subprocess.run(
        command, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise LocalKafkaError(
            "formatting the broker's storage failed:\n"
            + _tail_text(done.stdout + done.stderr, 30)
        )
    log.info("formatted %s as cluster %s", kafka.log_dirs, cluster_id)


def _cluster_id() -> str:
    """A random cluster id in Kafka's form: 16 bytes, URL-safe base64, no padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def _spawn(kafka: LocalKafka) -> int:
    """Start the broker JVM in its own session; its output goes to broker.out."""
    config = str((kafka.data_dir / "server.properties").resolve())
    command = _java_command(kafka, kafka.heap, "kafka.Kafka", config)
    with kafka.out_file.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            cwd=kafka.data_dir,
        )
    return process.pid


def _wait_ready(kafka: LocalKafka, pid: int | None, deadline: float) -> None:
    """Poll until a metadata request lists the broker, the JVM exits, or the
    deadline passes (then raise with the log's tail)."""
    while True:
        if pid is not None:
            _reap(pid)  # a JVM that exited is our zombie until reaped
        if pid is not None and not _pid_alive(pid):
            raise LocalKafkaError(
                f"the Kafka broker exited while starting\n{_log_tails(kafka)}"
            )
        if broker_answers(kafka.bootstrap):
            return
        if time.monotonic() > deadline:
            raise LocalKafkaError(
                f"the Kafka broker did not answer on {kafka.bootstrap} in time\n"
                f"{_log_tails(kafka)}"
            )
        time.sleep(0.25)


def broker_answers(bootstrap: str) -> bool:
    """True when the first server of ``bootstrap`` answers a metadata request
    that names at least one broker. Does not raise; never takes long."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    if not port.isdigit() or not _port_open(host or "127.0.0.1", int(port)):
        return False
    return asyncio.run(_metadata_ok(bootstrap))


async def _metadata_ok(bootstrap: str) -> bool:
    """True when the broker answers a metadata request naming itself."""
    from aiokafka.admin import AIOKafkaAdminClient

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=3000, metadata_max_age_ms=1000
    )
    try:
        await asyncio.wait_for(admin.start(), 5)
        cluster = await asyncio.wait_for(admin.describe_cluster(), 5)
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
        quiet.setLevel(level)
    return bool(cluster.get("brokers"))


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_port_free(port: int, seconds: float) -> bool:
    """A JVM killed a moment ago may still hold its sockets while it exits."""
    deadline = time.monotonic() + seconds
    while not _port_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# --- down ---------------------------------------------------------------------


def down(kafka: LocalKafka, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> Status:
    """Stop the broker of ``kafka.data_dir``; returns what ran (or not).

    SIGTERM lets Kafka shut down cleanly; SIGKILL follows after ``timeout``.
    """
    kafka.data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(kafka.data_dir / ".lock"):
        current = status(kafka)
        if current.running and current.pid is not None:
            _stop_pid(current.pid, timeout)
            log.info("stopped Kafka (pid %d)", current.pid)
        kafka.state_file.unlink(missing_ok=True)
        return current


def _stop_pid(pid: int, timeout: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.1)
    if _pid_alive(pid):
        log.warning(
            "Kafka (pid %d) ignored SIGTERM for %.0fs; killing it", pid, timeout
        )
        _signal_group(pid, signal.SIGKILL)
        while _pid_alive(pid):
            _reap(pid)
            time.sleep(0.05)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the broker's process group (it leads its own session)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _reap(pid: int) -> None:
    """Collect our own child's exit status, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


# --- helpers ------------------------------------------------------------------


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so two `up`s never start two brokers."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _tail_text(text: str, lines: int) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _log_tails(kafka: LocalKafka, lines: int = 30) -> str:
    parts = []
    for path in (kafka.out_file, kafka.server_log):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if text.strip():
            parts.append(f"--- last lines of {path} ---\n{_tail_text(text, lines)}")
    return "\n".join(parts) or f"(no broker log in {kafka.data_dir})"


def _port(value: str | None, name: str) -> int | None:
    if not value:
        return None
    try:
        port = int(value)
    except ValueError:
        raise LocalKafkaError(f"{name}: not a port number: {value!r}") from None
    if not 0 < port < 65536:
        raise LocalKafkaError(f"{name}: not a port number: {value!r}")
    return port
