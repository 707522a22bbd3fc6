"""Metrics: label rules and the census as units; /metrics around a real run.

The end-to-end part runs one ``pushstream worker`` against the broker and a
``pushstream sandbox``, scrapes ``/metrics`` before and after a known set of
registrations and notifications, and checks that every counter moved by
exactly what the run did. The same run's log (JSON lines at DEBUG) and the
scraped text are then searched for tokens and secrets.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import faust
import pytest
from conftest import Kafka, module_topics, run_sync
from prometheus_client.parser import text_string_to_metric_families
from sandboxproc import SandboxProcess
from workerproc import WorkerProcess, wait_consumed

from pushstream import localstack, metrics, topics, web
from pushstream.config import FcmProject, Settings, WnsApp
from pushstream.events import Delivery

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

FORBIDDEN_LABELS = {"token", "user", "user_id", "device", "device_id", "notification"}


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text: str = r.read().decode()
        return text


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


# --- label rules ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        ("Unregistered", "Unregistered"),
        ("INVALID_ARGUMENT message.token", "INVALID_ARGUMENT"),
        ("INVALID_ARGUMENT android.ttl, apns.payload", "INVALID_ARGUMENT"),
        ("oauth: invalid_grant (Invalid JWT Signature.)", "oauth"),
        ("access_token: the endpoint refused abc123", "access_token"),
        ("http_418", "http_418"),
        ("HTTP 418", "HTTP_418"),
        ("retries_exhausted", "retries_exhausted"),
        ("", "unknown"),
        ("  ", "unknown"),
        ("Ünïcode/with*stars", "n_code_with_stars"),
        ("x" * 200, "x" * metrics.REASON_CODE_MAX),
    ],
)
def test_reason_code_is_the_first_word_before_a_colon(reason: str, code: str) -> None:
    """A provider's free-text detail would make a new time series per message."""
    assert metrics.reason_code(reason) == code


def test_app_label_is_a_configured_app_or_other() -> None:
    """An app name from an upstream registration must not create series at will."""
    settings = Settings(
        fcm=(FcmProject(project_id="proj-1", service_account_json="{}"),),
        wns=(WnsApp(package="Contoso.App", client_id="c", client_secret="s"),),
    )
    metrics.configure(settings)
    try:
        assert metrics.app_label("proj-1") == "proj-1"
        assert metrics.app_label("Contoso.App") == "Contoso.App"
        assert metrics.app_label("made-up-by-a-client") == metrics.OTHER
        assert metrics.app_label(None) == metrics.NONE
    finally:
        metrics.configure(Settings())


def test_delivery_counter_labels_hold_no_ids() -> None:
    """A notification, user or device id in a label is one series per message."""
    event = Delivery(
        notification_id="n-secret-id",
        send_id="n-secret-id:dev-1",
        user_id="user-42",
        device_id="dev-1",
        platform="apns",
        app="com.example.unconfigured",
        outcome="failed",
        reason="BadDeviceToken: token abcdef0123456789 rejected",
        accepted_at_ms=1,
        completed_at_ms=2,
        latency_ms=1,
    )
    metrics.delivery(event)
    text = metrics.exposition().decode()
    line = next(
        row
        for row in text.splitlines()
        if row.startswith("pushstream_deliveries_total{") and "BadDeviceToken" in row
    )
    for secret in ("n-secret-id", "user-42", "dev-1", "abcdef0123456789"):
        assert secret not in line
    assert 'app="other"' in line


def test_delivery_counter_follows_the_configured_apps() -> None:
    """Each outcome counts once, under the app label the configuration gives."""

    def count(app: str) -> float:
        sample = metrics.REGISTRY.get_sample_value(
            "pushstream_deliveries_total",
            {"platform": "fcm", "app": app, "outcome": "delivered", "reason": "ok"},
        )
        return sample or 0.0

    event = Delivery(
        notification_id="n",
        platform="fcm",
        app="proj-late",
        outcome="delivered",
        reason="ok",
        accepted_at_ms=1,
        completed_at_ms=2,
        latency_ms=1,
    )
    other, late = count(metrics.OTHER), count("proj-late")
    metrics.delivery(event)
    metrics.delivery(event)
    assert (count(metrics.OTHER), count("proj-late")) == (other + 2, late)

    project = FcmProject(project_id="proj-late", service_account_json="{}")
    metrics.configure(Settings(fcm=(project,)))
    try:
        metrics.delivery(event)
    finally:
        metrics.configure(Settings())
    assert (count(metrics.OTHER), count("proj-late")) == (other + 2, late + 1)


def test_replayed_sends_are_counted_per_platform() -> None:
    """Repeated sends after a crash would go uncounted, or count as new ones."""

    def value(platform: str) -> float:
        sample = metrics.REGISTRY.get_sample_value(
            "pushstream_replayed_sends_total", {"platform": platform}
        )
        return sample or 0.0

    before = {platform: value(platform) for platform in ("apns", "fcm", "wns")}
    metrics.replayed_send("fcm")
    metrics.replayed_send("fcm")

    assert value("fcm") == before["fcm"] + 2
    assert (value("apns"), value("wns")) == (before["apns"], before["wns"])


def test_metric_names_follow_prometheus_conventions() -> None:
    """Dashboards and alerts rely on _total counters and base units."""
    metrics.delivery(
        Delivery(
            notification_id="n",
            outcome="dropped",
            reason="no_devices",
            accepted_at_ms=1,
            completed_at_ms=1,
            latency_ms=0,
        )
    )
    with metrics.ProviderRequest("apns"):
        pass
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    assert families
    for family in families:
        assert family.name.startswith("pushstream_"), family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert not FORBIDDEN_LABELS & set(sample.labels), sample


def test_provider_request_counts_in_flight_and_latency() -> None:
    """Sends in flight must go back down, or the gauge would only ever grow."""
    before = parse(metrics.exposition().decode())
    with metrics.ProviderRequest("wns"):
        during = parse(metrics.exposition().decode())
    after = parse(metrics.exposition().decode())
    name = "pushstream_sends_in_flight"
    assert (
        value(during, name, platform="wns") == value(before, name, platform="wns") + 1
    )
    assert value(after, name, platform="wns") == value(before, name, platform="wns")
    count = "pushstream_provider_request_duration_seconds_count"
    assert (
        value(after, count, platform="wns") == value(before, count, platform="wns") + 1
    )


# --- the devices census ------------------------------------------------------------


def _user(*devices: tuple[str, str]) -> bytes:
    return json.dumps(
        {
            "devices": [
                {"device_id": f"d{i}", "platform": p, "state": s, "token": "t" * 64}
                for i, (p, s) in enumerate(devices)
            ]
        }
    ).encode()


def test_count_devices_by_platform_and_state() -> None:
    """The devices gauge is what capacity planning and token hygiene look at."""
    counts = metrics.count_devices(
        [
            _user(("apns", "active"), ("fcm", "active")),
            _user(("apns", "invalid")),
            b"not json",
            None,
            _user(),
        ]
    )
    assert counts == {
        ("apns", "active"): 1,
        ("fcm", "active"): 1,
        ("apns", "invalid"): 1,
    }


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


async def test_census_waits_in_proportion_to_its_own_cost() -> None:
    """A census of a huge table must not take the event loop from the agents."""
    clock = FakeClock()
    census = metrics.DeviceCensus(
        settled=lambda: True, generation=lambda: 1, clock=clock
    )
    rows = [(b"u1", _user(("apns", "active")))]

    def slow_items() -> list[tuple[bytes, bytes]]:
        clock.now += 2.0  # the scan "takes" two seconds
        return rows

    assert await census.maybe_scan(slow_items)
    assert census.counts == {("apns", "active"): 1}
    assert census.users == 1
    clock.now += metrics.CENSUS_INTERVAL_S
    assert not await census.maybe_scan(slow_items), "ran again after one interval"
    clock.now += 2.0 * metrics.CENSUS_BACKOFF
    assert await census.maybe_scan(slow_items)
    assert census.scans == 2


async def test_census_stops_when_partitions_move() -> None:
    """Reading partitions that a rebalance is closing could crash the worker."""
    generation = [1]
    census = metrics.DeviceCensus(
        settled=lambda: True, generation=lambda: generation[0]
    )

    def items() -> Iterator[tuple[bytes, bytes]]:
        for i in range(metrics.CENSUS_CHUNK * 3):
            if i == metrics.CENSUS_CHUNK // 2:
                generation[0] = 2
            yield f"u{i}".encode(), _user(("fcm", "active"))

    assert not await census.maybe_scan(items)
    assert census.scans == 0
    assert not census.counts

    unsettled = metrics.DeviceCensus(settled=lambda: False, generation=lambda: 1)
    assert not await unsettled.maybe_scan(items)


def test_a_worker_that_has_not_joined_is_not_ready() -> None:
    """Kubernetes would send a rolling update on before the tables are back."""
    app = faust.App(f"t-ready-{uuid.uuid4().hex[:8]}", broker="kafka://127.0.0.1:1")
    ok, reason = web.readiness(app)
    assert not ok
    assert "assignment" in reason
    assert web.consumer_lag(app) == {}


# --- a real run ----------------------------------------------------------------------

APNS_APP = "com.example.sandbox"
FCM_APP = "sandbox-project"
WNS_APP = "Contoso.Sandbox"
INPUTS = (
    topics.REGISTRATIONS,
    topics.TOKEN_EVENTS,
    topics.TOKEN_OWNERS,
    topics.NOTIFICATIONS,
    topics.SENDS_APNS,
    topics.SENDS_FCM,
    topics.SENDS_WNS,
    topics.RETRIES,
)


@dataclass(frozen=True)
class Run:
    """What the run did and what it left: scrapes, log, tokens, secrets."""

    settings: Settings
    before: Samples
    after: Samples
    after_text: str
    devices: Samples
    log: str
    tokens: tuple[str, ...]
    secrets: tuple[str, ...]


def _register(user: str, platform: str, token: str, app: str, i: int) -> Any:
    when = datetime.now(UTC) + timedelta(milliseconds=i)
    return user, {
        "type": "register",
        "user_id": user,
        "platform": platform,
        "token": token,
        "app": app,
        "event_time": when.isoformat(),
    }


def _secrets(env: dict[str, str]) -> tuple[str, ...]:
    """Every secret the sandbox made: key material lines, client secrets."""
    found: list[str] = []

    def pem_lines(pem: str) -> None:
        found.extend(
            line for line in pem.splitlines() if line and not line.startswith("-----")
        )

    for app in json.loads(env["PUSHSTREAM_APNS"]):
        pem_lines(Path(app["key_file"]).read_text())
    for project in json.loads(env["PUSHSTREAM_FCM"]):
        account = json.loads(Path(project["service_account_file"]).read_text())
        pem_lines(account["private_key"])
        found.append(account["private_key_id"])
    for app in json.loads(env["PUSHSTREAM_WNS"]):
        if "client_secret_file" in app:
            found.append(Path(app["client_secret_file"]).read_text().strip())
        elif "client_secret" in app:
            found.append(app["client_secret"])
    return tuple(s for s in found if len(s) >= 12)


def _wait_for(check: Any, port: int, within: float = 60.0) -> Samples:
    deadline = time.monotonic() + within
    samples = parse(scrape_text(port))
    while not check(samples) and time.monotonic() < deadline:
        time.sleep(0.5)
        samples = parse(scrape_text(port))
    return samples


@pytest.fixture(scope="module")
def run(kafka: Kafka, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """One worker and one sandbox; a known mix of events; scrapes around it."""
    folder = tmp_path_factory.mktemp("metrics")
    with (
        module_topics(kafka, folder, "metrics") as settings,
        SandboxProcess(folder / "sandbox") as sandbox,
    ):
        yield _run(kafka, settings, sandbox, folder)


def _run(
    kafka: Kafka, settings: Settings, sandbox: SandboxProcess, folder: Path
) -> Run:
    env = localstack.worker_env(
        settings,
        sandbox.env,
        PUSHSTREAM_LOG_LEVEL="DEBUG",
        PUSHSTREAM_LOG_JSON="true",
        PUSHSTREAM_RETRY_MAX_ATTEMPTS="2",
        PUSHSTREAM_RETRY_BASE_S="0.2",
        PUSHSTREAM_RETRY_MAX_S="0.5",
    )
    tokens = {
        "ok": "0a" * 32,
        "dead": "dead" + "0" * 4 + "ab" * 28,  # APNs stand-in: 410 Unregistered
        "busy": "f100d" + "0" * 3 + "cd" * 28,  # APNs stand-in: 429 every time
        "fcm": "fcm-token-00000001:APA91b" + "x" * 40,
        "wns": sandbox.wns_channel(WNS_APP),
    }
    registrations = [
        _register("u-ok", "apns", tokens["ok"], APNS_APP, 0),
        _register("u-dead", "apns", tokens["dead"], APNS_APP, 1),
        _register("u-busy", "apns", tokens["busy"], APNS_APP, 2),
        _register("u-fcm", "fcm", tokens["fcm"], FCM_APP, 3),
        _register("u-wns", "wns", tokens["wns"], WNS_APP, 4),
        ("u-bad", b"{not json"),
    ]
    notes = [
        (user, {"id": f"n-{user}", "title": "Hi", "body": "there"})
        for user in ("u-ok", "u-dead", "u-busy", "u-fcm", "u-wns", "u-nobody")
    ]
    notes += [
        ("u-ok", {"id": "n-u-ok", "title": "again", "body": "same id"}),
        ("u-bad", b"[]"),
    ]

    with WorkerProcess(env, log_path=folder / "worker.log") as worker:
        before = parse(scrape_text(worker.port))
        prefix = settings.topic_prefix
        run_sync(lambda: kafka.produce(prefix + topics.REGISTRATIONS, registrations))
        run_sync(lambda: wait_consumed(settings, INPUTS))
        run_sync(lambda: kafka.produce(prefix + topics.NOTIFICATIONS, notes))
        run_sync(lambda: wait_consumed(settings, INPUTS))
        after_text = scrape_text(worker.port)

        def census_done(samples: Samples) -> bool:
            invalid = value(
                samples, "pushstream_devices", platform="apns", state="invalid"
            )
            return invalid == 1

        devices = _wait_for(census_done, worker.port)
        assert worker.stop() == 0
        log = worker.log()

    return Run(
        settings=settings,
        before=before,
        after=parse(after_text),
        after_text=after_text,
        devices=devices,
        log=log,
        tokens=tuple(tokens.values()),
        secrets=_secrets(sandbox.env),
    )


def delta(run: Run, name: str, **labels: str) -> float:
    return total(run.after, name, **labels) - total(run.before, name, **labels)


@pytest.mark.kafka
def test_delivery_counters_move_by_what_the_run_did(run: Run) -> None:
    """An operator's delivery-rate dashboard would show sends that never happened."""
    name = "pushstream_deliveries_total"
    apns = {"platform": "apns", "app": APNS_APP}
    assert delta(run, name, **apns, outcome="delivered", reason="delivered") == 1
    assert delta(run, name, **apns, outcome="invalid_token", reason="Unregistered") == 1
    assert delta(run, name, **apns, outcome="failed", reason="retries_exhausted") == 1
    assert delta(run, name, **apns, outcome="duplicate", reason="already_sent") == 1
    assert delta(run, name, platform="fcm", app=FCM_APP, outcome="delivered") == 1
    assert delta(run, name, platform="wns", app=WNS_APP, outcome="delivered") == 1
    none = {"platform": "none", "app": "none"}
    assert delta(run, name, **none, outcome="dropped", reason="no_devices") == 1
    assert delta(run, name) == 7


@pytest.mark.kafka
def test_provider_retry_and_dead_letter_counters(run: Run) -> None:
    """Alerts on retries, dead letters and provider latency need exact counts."""
    prefix = run.settings.topic_prefix
    retries = "pushstream_retries_scheduled_total"
    assert delta(run, retries, platform="apns", reason="TooManyRequests") == 1
    assert delta(run, retries) == 1

    letters = "pushstream_dead_letters_total"
    registry = {"source_topic": prefix + topics.REGISTRATIONS, "stage": "registry"}
    router = {"source_topic": prefix + topics.NOTIFICATIONS, "stage": "router"}
    sender = {"source_topic": prefix + topics.SENDS_APNS, "stage": "sender.apns"}
    assert delta(run, letters, **registry) == 1
    assert delta(run, letters, **router) == 1
    assert delta(run, letters, **sender) == 1
    assert delta(run, letters) == 3

    count = "pushstream_provider_request_duration_seconds_count"
    assert delta(run, count, platform="apns") == 4  # ok, dead, busy twice
    assert delta(run, count, platform="fcm") == 1
    assert delta(run, count, platform="wns") == 1
    for platform in ("apns", "fcm", "wns"):
        assert value(run.after, "pushstream_sends_in_flight", platform=platform) == 0

    refreshes = "pushstream_token_refreshes_total"
    assert delta(run, refreshes, provider="apns", outcome="ok") == 1
    assert delta(run, refreshes, provider="fcm", outcome="ok") == 1
    assert delta(run, refreshes, provider="wns", outcome="ok") == 1
    assert delta(run, refreshes, outcome="error") == 0


@pytest.mark.kafka
def test_worker_state_gauges(run: Run) -> None:
    """Readiness, breaker, lag and table gauges are what the alerts are built on."""
    after = run.after
    assert value(after, "pushstream_ready") == 1
    assert value(after, "pushstream_assigned_partitions") > 0
    for platform in ("apns", "fcm", "wns"):
        assert value(after, "pushstream_circuit_breaker_state", platform=platform) == 0
    lag = "pushstream_consumer_lag_records"
    notifications = run.settings.topic(topics.NOTIFICATIONS)
    assert (lag, frozenset({("topic", notifications)})) in after
    assert total(after, lag) == 0

    devices = run.devices
    assert value(devices, "pushstream_devices", platform="apns", state="active") == 2
    assert value(devices, "pushstream_devices", platform="apns", state="invalid") == 1
    assert value(devices, "pushstream_devices", platform="fcm", state="active") == 1
    assert value(devices, "pushstream_devices", platform="wns", state="active") == 1
    assert value(devices, "pushstream_device_users") == 5


@pytest.mark.kafka
def test_no_token_or_secret_in_the_log_or_the_metrics(run: Run) -> None:
    """A log shipper or a metrics store would hold device tokens and keys."""
    assert run.log, "the worker logged nothing"
    assert '"level": "DEBUG"' in run.log, "the run was not logged at DEBUG"
    for token in run.tokens:
        assert token not in run.log
        assert token not in run.after_text
    assert len(run.secrets) >= 5
    for secret in run.secrets:
        assert secret not in run.log
        assert secret not in run.after_text


@pytest.mark.kafka
def test_worker_log_is_json_lines(run: Run) -> None:
    """A log pipeline set to JSON would drop or mangle lines that are not."""
    lines = [line for line in run.log.splitlines() if not line.startswith("--- ")]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry)
