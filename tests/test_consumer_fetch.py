"""The worker's Kafka consumer asks the broker for a short fetch wait.

With Faust's own 1,500 ms, a record could sit that long in a partition
before the worker read it, at each of the two stream hops a notification
takes (see :class:`pushstream.app.PipelineConsumerThread`).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from pushstream.app import FETCH_MAX_WAIT_MS, Pipeline
from pushstream.config import Settings


async def test_the_worker_consumer_waits_briefly_for_records(tmp_path: Path) -> None:
    pipeline = Pipeline(Settings(data_dir=tmp_path))
    # The path Faust takes when the worker's consumer starts.
    thread = pipeline.app.consumer._thread
    consumer = thread._create_consumer(loop=asyncio.get_running_loop())
    assert consumer._fetch_max_wait_ms == FETCH_MAX_WAIT_MS
    assert FETCH_MAX_WAIT_MS < 1500
    assert consumer._group_id == pipeline.settings.app_id


async def test_a_blocked_handoff_is_given_up_when_the_flow_stops(
    tmp_path: Path,
) -> None:
    """A rebalance must not wait behind a record whose hand-off blocks."""
    consumer = Pipeline(Settings(data_dir=tmp_path)).app.consumer
    blocked = asyncio.Event()
    cancelled = asyncio.Event()

    async def handoff() -> None:
        blocked.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    waiting = asyncio.create_task(
        consumer.wait_first(handoff(), consumer.suspend_flow.wait())
    )
    await blocked.wait()
    consumer.stop_flow()
    result = await asyncio.wait_for(waiting, 5)
    assert result.stopped
    assert cancelled.is_set()
    consumer.resume_flow()


async def test_a_handoff_gives_its_result_or_its_error(tmp_path: Path) -> None:
    consumer = Pipeline(Settings(data_dir=tmp_path)).app.consumer

    async def handoff(value: int) -> int:
        await asyncio.sleep(0)
        if value < 0:
            raise ValueError("refused")
        return value

    result = await consumer.wait_first(handoff(7), consumer.suspend_flow.wait())
    assert (result.results, result.stopped) == ([7], False)
    with pytest.raises(ValueError, match="refused"):
        await consumer.wait_first(handoff(-1), consumer.suspend_flow.wait())


async def test_a_crash_reported_from_another_thread_ends_the_handoff(
    tmp_path: Path,
) -> None:
    """The consumer's own thread may report a crash; the fetch loop must not hang."""
    consumer = Pipeline(Settings(data_dir=tmp_path)).app.consumer
    blocked = asyncio.Event()

    async def handoff() -> None:
        blocked.set()
        await asyncio.Event().wait()

    waiting = asyncio.create_task(
        consumer.wait_first(handoff(), consumer.suspend_flow.wait())
    )
    await blocked.wait()
    crash = threading.Thread(target=consumer._crash, args=(RuntimeError("thread"),))
    crash.start()
    crash.join()
    result = await asyncio.wait_for(waiting, 5)
    assert result.stopped
