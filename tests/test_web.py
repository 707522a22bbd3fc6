"""The worker's /ready page while the broker goes away and comes back.

The pure part checks :class:`pushstream.web.BrokerWatch` with a hand-driven
clock; the end-to-end test runs a worker against a broker of the test's own
(its own port and data folder, never the shared one), stops that broker,
and watches /ready and the log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from workerproc import WorkerProcess

from pushstream import localkafka, localstack, web
from pushstream.config import Settings

OUTAGE_DETECTED_WITHIN_S = 60.0
RECOVERED_WITHIN_S = 120.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_short_coordinator_gap_keeps_the_worker_ready() -> None:
    """A coordinator moving to another broker would flap /ready and drop traffic."""
    clock, known = Clock(), [True]
    watch = web.BrokerWatch(lambda: known[0], grace_s=5, clock=clock)
    watch.check()
    known[0] = False
    watch.check()
    clock.now += 4
    watch.check()
    assert watch.cut_off_for() is None
    known[0] = True
    watch.check()
    clock.now += 10
    assert watch.cut_off_for() is None


def test_no_coordinator_past_the_grace_is_cut_off_until_it_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A worker cut off from Kafka would still be sent traffic by Kubernetes."""
    clock, known = Clock(), [False]
    watch = web.BrokerWatch(lambda: known[0], grace_s=5, clock=clock)
    with caplog.at_level(logging.INFO, logger="pushstream.web"):
        for _ in range(20):
            watch.check()
            clock.now += 1
        assert watch.cut_off_for() == pytest.approx(20)
        known[0] = True
        watch.check()
    assert watch.cut_off_for() is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unreachable" in warnings[0].getMessage()
    assert "reachable again" in caplog.records[-1].getMessage()


def test_a_worker_without_a_consumer_has_no_coordinator_to_miss() -> None:
    """A worker still starting would be reported cut off instead of starting."""
    import faust

    app = faust.App("t-web-no-consumer", broker="kafka://127.0.0.1:1")
    assert web.coordinator_known(app) is None


# --- a real worker and a broker of its own ---------------------------------------


def wait_for_status(
    worker: WorkerProcess, status: int, within: float
) -> dict[str, Any]:
    """Poll /ready until it answers ``status``; fail the test otherwise."""
    deadline = time.monotonic() + within
    seen: tuple[int, dict[str, Any]] = (0, {})
    while time.monotonic() < deadline:
        seen = worker.ready()
        if seen[0] == status:
            return seen[1]
        time.sleep(0.5)
    pytest.fail(f"/ready did not answer {status} within {within:.0f}s: {seen}")


@pytest.mark.kafka
async def test_ready_answers_503_while_the_broker_is_down_and_200_after(
    private_broker: localkafka.LocalKafka, private_settings: Settings, tmp_path: Path
) -> None:
    """Kubernetes would route to a worker cut off from Kafka; the log would flood."""
    env = localstack.worker_env(private_settings)
    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        before = len(worker.log().splitlines())
        await asyncio.to_thread(localkafka.down, private_broker)
        outage_started = time.monotonic()
        body = await asyncio.to_thread(
            wait_for_status, worker, 503, OUTAGE_DETECTED_WITHIN_S
        )
        assert "broker is unreachable" in body["reason"]
        # Stay down a while longer: every failed attempt would log a line.
        await asyncio.sleep(max(0.0, 20 - (time.monotonic() - outage_started)))
        during = worker.log().splitlines()[before:]

        await asyncio.to_thread(localkafka.up, private_broker)
        body = await asyncio.to_thread(wait_for_status, worker, 200, RECOVERED_WITHIN_S)
        assert body["reason"] == "ok"
        assert worker.running
        log = worker.log()

    kafka_lines = [line for line in during if " aiokafka" in line and " ERROR " in line]
    assert kafka_lines, "the outage left no trace in the log"
    assert len(kafka_lines) <= 20, "\n".join(kafka_lines[:40])
    assert sum("broker is unreachable" in line for line in during) == 1
    assert "the broker is reachable again" in log
