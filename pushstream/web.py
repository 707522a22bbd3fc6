"""The worker's HTTP pages on Faust's web server: health, readiness, metrics.

- ``GET /health``: 200 while the process runs and its event loop answers
  (the liveness probe).
- ``GET /ready``: 200 once the worker has its partitions and has recovered
  its tables from their changelogs; 503 with a short reason before that,
  while partitions move and while it stops (the readiness probe). JSON
  either way: ``{"ready", "reason", "assigned_partitions"}``.
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
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from pushstream import metrics
from pushstream.app import Pipeline

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"


def readiness(app: faust.App) -> tuple[bool, str]:
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
    return True, "ok"


def is_ready(app: faust.App) -> bool:
    """Partitions assigned (at least one rebalance done) and tables recovered."""
    return readiness(app)[0]


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
    """Add /health, /ready and /metrics, and the devices census timer."""
    app = pipeline.app
    metrics.configure(pipeline.settings)
    census = metrics.DeviceCensus(
        settled=lambda: is_ready(app), generation=lambda: app.rebalancing_count
    )
    metrics.watch_worker(
        metrics.WorkerState(
            ready=lambda: is_ready(app),
            assigned=lambda: assigned_partitions(app),
            rebalances=lambda: app.rebalancing_count,
            lag=lambda: consumer_lag(app),
            census=census,
        )
    )

    async def health(view: Any, request: Any) -> Any:
        return view.json({"alive": True})

    async def ready(view: Any, request: Any) -> Any:
        ok, reason = readiness(app)
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
    app.timer(metrics.CENSUS_INTERVAL_S, name="pushstream.metrics.census")(census_tick)
    return census
