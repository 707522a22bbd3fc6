"""A second worker joins and leaves the group, twice, while a backlog drains.

Each change of members is a rebalance: every worker gives up its partitions,
gets an assignment, recovers the tables of the new ones, seeks them to the
group's committed offsets and clears the streams' buffers. A worker that goes
on handing out records fetched before the seek moves the partition's read
position past the records the seek was meant to bring back: they are dropped
unread, and the partition's committed offset then stalls for good or skips
them (the notifications are lost).

The workload is :mod:`test_chaos`'s, with a backlog published at once; the
check is its audit (every send has its one right outcome) and the group's
committed offset reaching the end of every partition the worker reads.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sandboxproc import SandboxProcess
from test_chaos import (
    OUTCOMES_WITHIN_S,
    Workload,
    check_nothing_lost,
    environment,
    produce,
    registered,
    stand_ins,
)
from workerproc import WorkerProcess, wait_consumed

from pushstream import localstack, topics
from pushstream.chaos_audit import WORKER_INPUTS, plan
from pushstream.config import Settings

if TYPE_CHECKING:
    from conftest import Kafka

KNOWN_LOSS = (
    "known loss at rebalances (docs/limitations.md, Kafka and Faust): the worker "
    "consumer still lets a batch fetched while a rebalance's seek ran move the "
    "read offset; this test fails about one run in three until that is fixed"
)

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.timeout(240),
    pytest.mark.skip(reason=KNOWN_LOSS),
]
__all__ = ["stand_ins"]  # the fixture, from test_chaos

BACKLOG = 2000  # notifications, published at once
# The second worker starts, stops, starts and stops again once this share of
# the sends has an outcome: four rebalances while work is queued, each after
# the workers have handed out records for a while.
CHANGES = (0.05, 0.25, 0.45, 0.65)


async def outcomes_published(settings: Settings) -> int:
    """How many delivery records the workers have published so far."""
    tps = await localstack.partitions(settings, [topics.DELIVERIES])
    return sum((await localstack.end_offsets(settings, tps)).values())


async def wait_for_progress(settings: Settings, load: Workload, share: float) -> None:
    """Wait until ``share`` of the sends have an outcome (by count of records)."""
    deadline = time.monotonic() + OUTCOMES_WITHIN_S
    while await outcomes_published(settings) < share * len(load.expected):
        if time.monotonic() > deadline:
            pytest.fail(f"not {share:.0%} of the sends had an outcome in time")
        await asyncio.sleep(0.2)


async def test_workers_joining_and_leaving_mid_backlog_lose_nothing(
    kafka: Kafka, settings: Settings, stand_ins: SandboxProcess, tmp_path: Path
) -> None:
    """Scaling out or in while work is queued would lose notifications, or leave
    a partition's committed offset stuck so that its lag never drains."""
    await kafka.create_topics(settings)
    env = environment(settings, stand_ins)
    with WorkerProcess(env, log_path=tmp_path / "first.log") as first:
        people = (await registered(settings, stand_ins, first)).population
        load = Workload(people, plan(people, BACKLOG, uuid.uuid4().hex[:8]))
        records = [(n.key, n.value) for n in load.notifications]
        await produce(settings, topics.NOTIFICATIONS, records)

        second_env = env | {"PUSHSTREAM_DATA_DIR": str(tmp_path / "second")}
        log = tmp_path / "second.log"
        with WorkerProcess(second_env, log_path=log, start=False) as second:
            for share in CHANGES:
                await wait_for_progress(settings, load, share)
                if second.running:
                    assert await asyncio.to_thread(second.stop) == 0
                else:
                    await asyncio.to_thread(second.start)

        await wait_consumed(settings, WORKER_INPUTS, within=OUTCOMES_WITHIN_S)
        await check_nothing_lost(settings, stand_ins, load)
        assert first.running, first.log_tail()
