"""pushstream's Prometheus metrics: one registry, labels of bounded cardinality.

Every metric lives in :data:`REGISTRY` and is served by the worker at
``GET /metrics`` (:mod:`pushstream.web`). The pipeline's modules count events
with the small functions below (:func:`delivery`, :func:`retry_scheduled`,
:func:`dead_letter`, ...) at the place the event happens; the state of the
Faust app (readiness, partitions, consumer lag) and the devices table census
are read when Prometheus scrapes.

No label ever holds a token, a user id, a device id or a notification id.
Labels are closed sets: platforms, outcomes, stages, topic names, the apps in
the configuration (any other app is counted as ``other``), and reason *codes*:
the first word of a reason, before any ``:`` (:func:`reason_code`); the full
reason is on the deliveries topic.

``docs/operations.md`` lists every metric with suggested alerts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pushstream import __version__
from pushstream.config import Settings
from pushstream.events import PLATFORMS, Delivery

log = logging.getLogger(__name__)

# The ``_created`` series prometheus-client adds to every counter double the
# number of series and are not used by any query here.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
REGISTRY = CollectorRegistry()
CONTENT_TYPE = CONTENT_TYPE_LATEST

# Label values for what has no platform or app (a notification for a user
# without devices), and for apps that are not configured.
NONE = "none"
OTHER = "other"
UNKNOWN = "unknown"
REASON_CODE_MAX = 40
_NOT_CODE = re.compile(r"[^A-Za-z0-9_.-]+")

# A request the provider takes longer than 10 s to answer already timed out
# (request_timeout_s); the buckets cover an HTTP/2 round trip to APNs (tens of
# milliseconds) up to that.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}

DELIVERIES = Counter(
    "pushstream_deliveries",
    "Outcomes published on the deliveries topic, one per send or per "
    "notification that was not sent; reason is a reason code.",
    ["platform", "app", "outcome", "reason"],
    registry=REGISTRY,
)
PROVIDER_LATENCY = Histogram(
    "pushstream_provider_request_duration_seconds",
    "Time from handing a send to the provider client to its answer "
    "(auth token and stream slot included).",
    ["platform"],
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "pushstream_sends_in_flight",
    "Provider requests made and not yet answered.",
    ["platform"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "pushstream_retries_scheduled",
    "Sends put on the retries topic after a 'try again later' or no answer.",
    ["platform", "reason"],
    registry=REGISTRY,
)
REPLAYED_SENDS = Counter(
    "pushstream_replayed_sends",
    "Sends the router made again because it handled a notification record "
    "a second time (a worker died before committing it).",
    ["platform"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "pushstream_dead_letters",
    "Messages put on the dead-letters topic, by the topic they came from "
    "and the stage that gave up on them.",
    ["source_topic", "stage"],
    registry=REGISTRY,
)
TOKEN_REFRESHES = Counter(
    "pushstream_token_refreshes",
    "Provider auth tokens made or fetched: APNs JWTs, FCM and WNS OAuth "
    "access tokens; outcome ok or error.",
    ["provider", "outcome"],
    registry=REGISTRY,
)
BREAKER_STATE = Gauge(
    "pushstream_circuit_breaker_state",
    "Each platform's circuit breaker: 0 closed, 1 half-open, 2 open.",
    ["platform"],
    registry=REGISTRY,
)
BREAKER_OPENS = Counter(
    "pushstream_circuit_breaker_opens",
    "Times a platform's circuit breaker opened.",
    ["platform"],
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "pushstream_build_info",
    "Always 1; the version label says which pushstream runs.",
    ["version"],
    registry=REGISTRY,
)
BUILD_INFO.labels(version=__version__).set(1)
for _platform in PLATFORMS:
    IN_FLIGHT.labels(platform=_platform).set(0)
    REPLAYED_SENDS.labels(platform=_platform)

_known_apps: frozenset[str] = frozenset()


def configure(settings: Settings) -> None:
    """Take the configured apps as the values the ``app`` label may have."""
    global _known_apps
    _known_apps = frozenset(
        [a.bundle_id for a in settings.apns]
        + [p.project_id for p in settings.fcm]
        + [w.package for w in settings.wns]
    )
    _delivery_counters.clear()


def app_label(app: str | None) -> str:
    """A configured app as is; no app is ``none``, any other app ``other``."""
    if not app:
        return NONE
    return app if app in _known_apps else OTHER


def platform_label(platform: str | None) -> str:
    """One of the platforms, or ``none``."""
    if platform in PLATFORMS:
        return str(platform)
    return NONE if not platform else OTHER


def reason_code(reason: str | None) -> str:
    """The code of a reason: its first word before any ``:``, made label-safe.

    ``"INVALID_ARGUMENT message.token"`` gives ``INVALID_ARGUMENT``,
    ``"oauth: invalid_grant"`` gives ``oauth``, ``"HTTP 418"`` gives
    ``HTTP_418`` (a status number is kept with its word). At most
    :data:`REASON_CODE_MAX` characters of ``[A-Za-z0-9_.-]``.
    """
    words = (reason or "").split(":", 1)[0].split()
    if not words:
        return UNKNOWN
    code = words[0]
    if len(words) > 1 and words[1].isdigit():
        code = f"{code}_{words[1]}"
    code = _NOT_CODE.sub("_", code).strip("_")[:REASON_CODE_MAX]
    return code or UNKNOWN


# --- counting events (called where they happen) -------------------------------


# Each send counts in these: the labelled series they hit, by what labels them.
# ``labels()`` validates and locks on every call, a few microseconds each.
# Cleared when full, as a provider's reasons may carry details that vary.
LABELLED_CACHE_MAX = 4096
_delivery_counters: dict[tuple[str | None, ...], Any] = {}
_request_series: dict[str, tuple[Gauge, Histogram]] = {}


def delivery(event: Delivery) -> None:
    """One outcome published on the deliveries topic."""
    key = (event.platform, event.app, event.outcome, event.reason)
    counter = _delivery_counters.get(key)
    if counter is None:
        counter = DELIVERIES.labels(
            platform=platform_label(event.platform),
            app=app_label(event.app),
            outcome=event.outcome,
            reason=reason_code(event.reason),
        )
        if len(_delivery_counters) >= LABELLED_CACHE_MAX:
            _delivery_counters.clear()
        _delivery_counters[key] = counter
    counter.inc()


def retry_scheduled(platform: str, reason: str) -> None:
    """One send put on the retries topic."""
    RETRIES.labels(platform=platform_label(platform), reason=reason_code(reason)).inc()


def replayed_send(platform: str) -> None:
    """One send made again for a notification record handled a second time."""
    REPLAYED_SENDS.labels(platform=platform_label(platform)).inc()


def dead_letter(source_topic: str, stage: str) -> None:
    """One message put on the dead-letters topic."""
    DEAD_LETTERS.labels(source_topic=source_topic, stage=stage).inc()


def token_refreshed(provider: str, *, ok: bool = True) -> None:
    """A provider auth token was made or fetched (or the fetch failed).

    ``provider`` may be a credential's display name such as ``"fcm my-project"``:
    only its first word, the platform, is kept.
    """
    name = provider.split(" ", 1)[0] if provider else ""
    TOKEN_REFRESHES.labels(
        provider=platform_label(name), outcome="ok" if ok else "error"
    ).inc()


def breaker_state(platform: str, state: str, *, opened: bool = False) -> None:
    """A circuit breaker changed state (``closed``, ``half_open``, ``open``)."""
    label = platform_label(platform)
    BREAKER_STATE.labels(platform=label).set(BREAKER_STATES.get(state, 0))
    if opened:
        BREAKER_OPENS.labels(platform=label).inc()


class ProviderRequest:
    """Times one provider request and counts it in flight while it runs::

    with metrics.ProviderRequest(platform):
        result = await client.send(send)
    """

    __slots__ = ("_in_flight", "_latency", "_started")

    def __init__(self, platform: str) -> None:
        series = _request_series.get(platform)
        if series is None:
            label = platform_label(platform)
            series = (
                IN_FLIGHT.labels(platform=label),
                PROVIDER_LATENCY.labels(platform=label),
            )
            _request_series[platform] = series
        self._in_flight: Gauge = series[0]
        self._latency: Histogram = series[1]
        self._started = 0.0

    def __enter__(self) -> ProviderRequest:
        self._in_flight.inc()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._in_flight.dec()
        self._latency.observe(time.monotonic() - self._started)


def exposition() -> bytes:
    """The registry in Prometheus' text format."""
    data: bytes = generate_latest(REGISTRY)
    return data


# --- the devices table census -------------------------------------------------------

# A census runs at most once per interval, and waits after each run at least
# this many times as long as the run took: it never takes more than about 1/20
# of the event loop, however big the table is.
CENSUS_INTERVAL_S = 10.0
CENSUS_BACKOFF = 20.0
CENSUS_CHUNK = 1000


def count_devices(values: Iterable[bytes | None]) -> Tally[tuple[str, str]]:
    """Devices by (platform, state) in devices-table values (UserDevices JSON).

    Values that are not such JSON are skipped; the registry never writes them.
    """
    counts: Tally[tuple[str, str]] = Tally()
    for raw in values:
        for platform, state in _devices_of(raw):
            counts[platform, state] += 1
    return counts


def _devices_of(raw: bytes | None) -> Iterator[tuple[str, str]]:
    if raw is None:
        return
    try:
        devices = json.loads(raw).get("devices") or ()
    except (ValueError, AttributeError):
        return
    for device in devices:
        if isinstance(device, dict):
            yield (
                platform_label(str(device.get("platform") or "")),
                str(device.get("state") or "active"),
            )


@dataclass
class DeviceCensus:
    """Devices in this worker's partitions of the devices table, counted by scans.

    :meth:`maybe_scan` is called by a timer every :data:`CENSUS_INTERVAL_S`;
    it scans the local partitions in chunks, yielding to the event loop between
    them, and stops early when a rebalance starts (the partitions it reads may
    be closed). The gauges show the last complete scan: at most one interval
    old, plus the scan's own time.
    """

    settled: Callable[[], bool]
    generation: Callable[[], int]
    clock: Callable[[], float] = time.monotonic
    counts: Tally[tuple[str, str]] = field(default_factory=Tally)
    users: int = 0
    scans: int = 0
    last_duration_s: float = 0.0
    _next_at: float = 0.0

    async def maybe_scan(self, items: Callable[[], Iterable[tuple[Any, Any]]]) -> bool:
        """Scan now unless the last scan was too recent or partitions move."""
        if self.clock() < self._next_at or not self.settled():
            return False
        started = self.clock()
        done = await self._scan(items)
        finished = self.clock()
        self.last_duration_s = finished - started
        self._next_at = finished + self.last_duration_s * CENSUS_BACKOFF
        return done

    async def _scan(self, items: Callable[[], Iterable[tuple[Any, Any]]]) -> bool:
        generation = self.generation()
        counts: Tally[tuple[str, str]] = Tally()
        users = 0
        for _, raw in items():
            users += 1
            for key in _devices_of(raw):
                counts[key] += 1
            if users % CENSUS_CHUNK == 0:
                await asyncio.sleep(0)
                if not self.settled() or self.generation() != generation:
                    log.debug("device census interrupted by a rebalance")
                    return False
        self.counts, self.users = counts, users
        self.scans += 1
        return True


# --- what is read at scrape time ------------------------------------------------------


@dataclass(frozen=True)
class WorkerState:
    """What the scrape-time collector reads from the running worker."""

    ready: Callable[[], bool]
    assigned: Callable[[], int]
    rebalances: Callable[[], int]
    lag: Callable[[], dict[str, int]]
    census: DeviceCensus


class _WorkerCollector(Collector):
    """Gauges read from the worker when Prometheus scrapes."""

    def __init__(self) -> None:
        self.state: WorkerState | None = None

    def describe(self) -> Iterable[Any]:
        return ()  # known only at collect time; the names are fixed below

    def collect(self) -> Iterable[Any]:
        state = self.state
        if state is None:
            return
        yield _gauge(
            "pushstream_ready",
            "1 when the worker is ready, else 0.",
            [((), float(state.ready()))],
        )
        yield _gauge(
            "pushstream_assigned_partitions",
            "Topic partitions assigned to this worker (changelogs included).",
            [((), float(state.assigned()))],
        )
        rebalances = CounterMetricFamily(
            "pushstream_rebalances",
            "Rebalances this worker took part in since it started.",
        )
        rebalances.add_metric([], float(state.rebalances()))
        yield rebalances
        yield _gauge(
            "pushstream_consumer_lag_records",
            "Records in this worker's partitions not yet committed, per topic: "
            "highwater (as of the last fetch) minus committed offset.",
            [((topic,), float(lag)) for topic, lag in sorted(state.lag().items())],
            ["topic"],
        )
        census = state.census
        if census.scans:
            yield _gauge(
                "pushstream_devices",
                "Devices in this worker's partitions of the devices table, by "
                "platform and state, as of the last census.",
                [((p, s), float(n)) for (p, s), n in sorted(census.counts.items())],
                ["platform", "state"],
            )
            yield _gauge(
                "pushstream_device_users",
                "Users in this worker's partitions of the devices table.",
                [((), float(census.users))],
            )
            yield _gauge(
                "pushstream_device_census_duration_seconds",
                "How long the last census of the devices table took.",
                [((), census.last_duration_s)],
            )


def _gauge(
    name: str,
    documentation: str,
    samples: list[tuple[tuple[str, ...], float]],
    labels: list[str] | None = None,
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels or [])
    for values, value in samples:
        family.add_metric(list(values), value)
    return family


_worker_collector = _WorkerCollector()
REGISTRY.register(_worker_collector)


def watch_worker(state: WorkerState) -> None:
    """Serve this worker's state at scrape time (the last one given wins)."""
    _worker_collector.state = state
