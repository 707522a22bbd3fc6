"""Stopping a worker whose broker is gone: the stop ends, says why, and loses nothing.

A worker told to stop (SIGTERM, as Kubernetes does) while work is in flight
and its Kafka broker is unreachable can neither flush what it produced nor
commit its offsets, and Faust's last commit waits for the broker. The worker
must still exit within ``PUSHSTREAM_SHUTDOWN_TIMEOUT_S`` plus
:data:`~pushstream.worker.STOP_MARGIN_S`, with the status
:data:`~pushstream.worker.EXIT_UNCLEAN_STOP` and one log line that says why,
and whatever it had not committed must be done after a restart.

The broker is a private one (conftest's ``private_broker``), so it can be
stopped; the shared broker is never touched.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import test_chaos
from sandboxproc import SandboxProcess
from test_chaos import (
    check_nothing_lost,
    environment,
    mid_flow,
    publishing,
    registered,
)
from workerproc import WorkerProcess

from pushstream import localkafka
from pushstream.config import Settings
from pushstream.worker import EXIT_UNCLEAN_STOP, STOP_MARGIN_S, StopWatchdog

if TYPE_CHECKING:
    pass

# test_chaos's fixture, which the test here names: conftest's sandbox, reset.
stand_ins = test_chaos.stand_ins

SHUTDOWN_TIMEOUT_S = 4.0
# What the process itself needs after the watchdog fires, and the polling.
EXIT_SLACK_S = 2.0
BOUND_S = SHUTDOWN_TIMEOUT_S + STOP_MARGIN_S + EXIT_SLACK_S
LAST_LINE = f"did not stop within {SHUTDOWN_TIMEOUT_S + STOP_MARGIN_S:g}s of SIGTERM"
AT_LEAST_ONCE = "read again after a restart (at least once)"


def worker_env(settings: Settings, sandbox: SandboxProcess) -> dict[str, str]:
    """test_chaos's worker settings, with this file's shutdown timeout."""
    env = environment(settings, sandbox)
    env["PUSHSTREAM_SHUTDOWN_TIMEOUT_S"] = str(SHUTDOWN_TIMEOUT_S)
    return env


def stop_timed(worker: WorkerProcess) -> tuple[int, float]:
    """SIGTERM the worker; its exit status and the seconds it took to exit."""
    began = time.monotonic()
    code = worker.stop()
    return code, time.monotonic() - began


# --- the real stack -------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.timeout(240)
async def test_sigterm_mid_flow_while_the_broker_is_gone_exits_and_loses_nothing(
    private_broker: localkafka.LocalKafka,
    private_settings: Settings,
    stand_ins: SandboxProcess,
    tmp_path: Path,
) -> None:
    """A worker stopped mid-flow without a broker would hang, or lose pushes."""
    settings = private_settings
    env = worker_env(settings, stand_ins)
    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        load = await registered(settings, stand_ins, worker)
        publisher = publishing(settings, load)
        await mid_flow(settings, load)
        await asyncio.to_thread(localkafka.down, private_broker)

        code, took = await asyncio.to_thread(stop_timed, worker)

        assert took <= BOUND_S, f"{took:.1f}s to exit\n{worker.log_tail()}"
        assert code == EXIT_UNCLEAN_STOP, worker.log_tail()
        lines = [line for line in worker.log().splitlines() if LAST_LINE in line]
        assert len(lines) == 1, worker.log_tail()
        assert "Kafka is unreachable" in lines[0]
        assert AT_LEAST_ONCE in lines[0]

        await asyncio.to_thread(localkafka.up, private_broker)
        await asyncio.to_thread(worker.start)
        await publisher
        await check_nothing_lost(settings, stand_ins, load)


# --- the watchdog alone ---------------------------------------------------------------


def test_watchdog_ends_a_stop_that_outlives_the_bound(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stop past the bound would keep the pod until Kubernetes kills it."""
    ended = threading.Event()
    codes: list[int] = []

    def end(code: int) -> None:
        codes.append(code)
        ended.set()

    watchdog = StopWatchdog(
        0.2, margin_s=0.1, cause=lambda: "the broker is gone", end_process=end
    )
    with caplog.at_level(logging.ERROR, logger="pushstream.worker"):
        began = time.monotonic()
        watchdog.arm("SIGTERM")
        watchdog.arm("beginning to stop")  # the first trigger holds
        assert ended.wait(5)

    assert 0.3 <= time.monotonic() - began < 2
    assert codes == [EXIT_UNCLEAN_STOP]
    [line] = caplog.messages
    assert "did not stop within 0.3s of SIGTERM" in line
    assert "the broker is gone" in line
    assert AT_LEAST_ONCE in line


def test_watchdog_counts_a_thread_that_dies_while_stopping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop that broke a thread would pass for clean and exit 0."""
    monkeypatch.setattr(threading, "excepthook", lambda args: None)
    watchdog = StopWatchdog(60, end_process=lambda code: None)
    watchdog.arm("SIGTERM")

    def fail() -> None:
        raise asyncio.CancelledError

    thread = threading.Thread(target=fail, name="consumer")
    thread.start()
    thread.join()

    assert watchdog.failure == "consumer died (CancelledError)"
