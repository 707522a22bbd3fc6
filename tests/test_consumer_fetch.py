"""The worker's Kafka consumer asks the broker for a short fetch wait.

With Faust's own 1,500 ms, a record could sit that long in a partition
before the worker read it, at each of the two stream hops a notification
takes (see :class:`pushstream.app.PipelineConsumerThread`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

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
