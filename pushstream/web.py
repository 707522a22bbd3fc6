"""The worker's HTTP pages on Faust's web server: health, readiness, metrics.

- ``GET /health``: 200 while the process runs and its event loop answers
  (the liveness probe).
- ``GET /ready``: 200 once the worker has its partitions and has recovered
  its tables from their changelogs; 503 with a short reason before that,
  while partitions move, while it stops, and while it cannot reach the
  broker (the readiness probe). JSON either way: ``{"ready", "reason",
  "assigned_partitions"}``.
- ``GET /metrics``: :data:`pushstream.metrics.REGISTRY` in Prometheus' text
  format.

Faust's own Prometheus sensor (``faust.sensors.prometheus``) is not used: it
replaces the app's monitor, counts every table get and set, and names its
metrics after the app id with millisecond units, so dashboards would change
with each deployment's app id. What it would add that operators need
(rebalances, consumer lag) is read from Faust's state at scrape time instead.

Readiness, from Faust's source (faust-streaming 0.15): ``app.rebalancing`` is
set when a rebalance starts and cleared only by ``on_rebalance_end()``, which
the table recovery calls after the tables are recovered and the stream
partitions resumed; ``tables.recovery.completed`` is set the first time that
happens. ``rebalancing_count`` tells a worker that has not yet joined the
group from one that has. A worker that was assigned no partition (more
workers than partitions) is ready: it stands by for a rebalance.

Reaching the broker, from aiokafka's source (0.14): the consumer's group
coordinator drops ``coordinator_id`` ("marking coordinator dead") as soon
as a heartbeat, sent every second, or a commit cannot reach the
coordinator, and sets it again once the broker answers a lookup. Without a
coordinator the worker can neither commit nor keep its partitions, so
:class:`BrokerWatch` samples it every second and the worker counts as cut
off once it has had none for :data:`BROKER_GRACE_S` (a coordinator that
moves to another broker is looked up again within that).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import faust

from pushstream import metrics
from pushstream.app import Pipeline

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"

# Seconds the consumer may be without its group coordinator before the worker
# counts as cut off from the broker, and how often that is checked.
BROKER_GRACE_S = 5.0
BROKER_CHECK_S = 1.0


def coordinator_known(app: faust.App) -> bool | None:
    """Whether the consumer knows its group coordinator; None before it exists.

    Reads the attributes of Faust's aiokafka consumer thread: no public API
    tells whether the consumer reaches the broker. Reading them from the
    app's loop is safe (plain attributes, nothing is called on that thread).
    """
    try:
        thread = app.consumer._thread  # type: ignore[attr-defined]  # aiokafka driver
    except Exception:  # not created yet, or another transport
        return None
    consumer = getattr(thread, "_consumer", None)
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "coordinator_id"):
        return None
    return coordinator.coordinator_id is not None


class BrokerWatch:
    """Whether the worker reaches the broker: its consumer's group coordinator.

    :meth:`check` samples it (every :data:`BROKER_CHECK_S` from a timer, and
    on every readiness check); :meth:`cut_off_for` says for how long the
    coordinator has been unknown, once that is past the grace period. Logs a
    WARNING when the worker becomes cut off and INFO when it is back.
    """

    def __init__(
        self,
        known: Callable[[], bool | None],
        *,
        grace_s: float = BROKER_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._known = known
        self._grace_s = grace_s
        self._clock = clock
        self._lost_at: float | None = None
        self._warned = False

    def check(self) -> None:
        now = self._clock()
        if self._known() is False:
            if self._lost_at is None:
                self._lost_at = now
            elif not self._warned and now - self._lost_at >= self._grace_s:
                self._warned = True
                log.warning(
                    "the broker is unreachable: no consumer group coordinator "
                    "for %.0fs; /ready answers 503 until it is back",
                    now - self._lost_at,
                )
            return
        if self._warned and self._lost_at is not None:
            log.info("the broker is reachable again after %.0fs", now - self._lost_at)
        self._lost_at = None
        self._warned = False

    def cut_off_for(self) -> float | None:
        """Seconds without a coordinator, once past the grace period; else None."""
        if self._lost_at is None:
            return None
        lost_for = self._clock() - self._lost_at
        return lost_for if lost_for >= self._grace_s else None


def readiness(app: faust.App, broker: BrokerWatch | None = None) -> tuple[bool, str]:
    """Whether the worker is ready, and why not."""
    if app.should_stop:
        return False, "stopping"
    if app.rebalancing_count == 0:
        return False, "waiting for the first partition assignment"
    if app.rebalancing:
        return False, "rebalancing: partitions are moving or tables recovering"
    recovery: Any = getattr(app.tables, "recovery", None)
    if recovery is None or not recovery.completed.is_set():
        return False, "recovering tables from their changelogs"
    if broker is not None:
        broker.check()
        lost_for = broker.cut_off_for()
        if lost_for is not None:
            return False, f"the broker is unreachable (for {lost_for:.0f}s)"
    return True, "ok"


def is_ready(app: faust.App, broker: BrokerWatch | None = None) -> bool:
    """Partitions assigned, tables recovered, and the broker within reach."""
    return readiness(app, broker)[0]


def assigned_partitions(app: faust.App) -> int:
    """How many topic partitions the worker's consumer has (0 before it starts)."""
    try:
        return len(app.consumer.assignment())
    except Exception:  # the consumer is not started yet, or already stopped
        return 0


def consumer_lag(app: faust.App) -> dict[str, int]:
    """Per topic: highwater minus committed offset over this worker's partitions.

    The highwater is the one the consumer saw in its last fetch response; the
    committed offset is the one Faust committed or found at assignment.
    Partitions without either (table changelogs, which Faust does not commit;
    partitions not fetched yet) are left out.
    """
    lag: dict[str, int] = {}
    try:
        consumer = app.consumer
        assignment = consumer.assignment()
        # Faust keeps no public map of committed offsets; this one is kept
        # up to date on every commit and assignment (faust/transport/consumer.py).
        committed_offsets = getattr(consumer, "_committed_offset", {})
    except Exception:  # not started yet, or stopping
        return lag
    for tp in assignment:
        try:
            highwater = consumer.highwater(tp)
        except Exception:  # revoked since assignment() was read
            continue
        committed = committed_offsets.get(tp)
        if highwater is None or committed is None:
            continue
        lag[tp.topic] = lag.get(tp.topic, 0) + max(0, highwater - committed)
    return lag


def attach(pipeline: Pipeline) -> metrics.DeviceCensus:
    """Add /health, /ready and /metrics, the devices census and broker timers."""
    app = pipeline.app
    broker = BrokerWatch(lambda: coordinator_known(app))
    metrics.configure(pipeline.settings)
    census = metrics.DeviceCensus(
        settled=lambda: is_ready(app), generation=lambda: app.rebalancing_count
    )
    metrics.watch_worker(
        metrics.WorkerState(
            ready=lambda: is_ready(app, broker),
            assigned=lambda: assigned_partitions(app),
            rebalances=lambda: app.rebalancing_count,
            lag=lambda: consumer_lag(app),
            census=census,
        )
    )

    async def health(view: Any, request: Any) -> Any:
        return view.json({"alive": True})

    async def ready(view: Any, request: Any) -> Any:
        ok, reason = readiness(app, broker)
        body = {
            "ready": ok,
            "reason": reason,
            "assigned_partitions": assigned_partitions(app),
        }
        return view.json(body, status=200 if ok else 503)

    async def metrics_page(view: Any, request: Any) -> Any:
        # In a header: aiohttp refuses a content_type argument with a charset.
        headers = {"Content-Type": metrics.CONTENT_TYPE}
        return view.bytes(metrics.exposition(), headers=headers)

    async def census_tick() -> None:
        devices = pipeline.devices
        await census.maybe_scan(devices.items)

    app.page(HEALTH_PATH, name="health")(health)
    app.page(READY_PATH, name="ready")(ready)
    app.page(METRICS_PATH, name="metrics")(metrics_page)

    async def broker_tick() -> None:
        broker.check()

    app.timer(metrics.CENSUS_INTERVAL_S, name="pushstream.metrics.census")(census_tick)
    app.timer(BROKER_CHECK_S, name="pushstream.web.broker")(broker_tick)
    return census
