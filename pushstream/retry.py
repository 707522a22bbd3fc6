"""Retry scheduling: how long to wait before a send is tried again, and the
agent that holds retry requests until they are due.

A sender that gets a "try again later" answer publishes a
:class:`~pushstream.events.RetryRequest` to the retries topic: the send as it
was made, the reason, and the time it is due. The retry agent reads that topic
only, so a long wait never blocks the send topics. It keeps each request in
memory until it is due, then publishes the send, with its attempt number
raised by one, to its platform's send topic.

The delay is the provider's Retry-After when it gave one, else exponential
backoff with full jitter: a uniformly random time between zero and
``retry_base_s * 2 ** (attempt - 1)``, capped at ``retry_max_s``. Full jitter
spreads the retries of a burst of failures evenly instead of sending them
back in waves.

Nothing is lost when the worker dies while it holds requests: a request is
acknowledged only once its send is published, and offsets are acknowledged
in order within each partition (faust-streaming commits past a lone unacked
offset at the head of a partition, faust #606, so an ack must never
overtake an earlier unacked one). The memory used is bounded by
:data:`HOLD_CAPACITY` requests. On a rebalance or at shutdown, Faust waits
for every message in hand to be acknowledged; the agent then puts the
requests that are not yet due back at the end of the retries topic, with the
same due time, and acknowledges them, so partitions are handed over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import faust

from pushstream import app as pipeline_app
from pushstream.events import RetryRequest, describe_error

if TYPE_CHECKING:
    from pushstream.app import Pipeline

log = logging.getLogger(__name__)

# A Retry-After longer than this is not honoured as given: six hours is longer
# than any provider asks for, and a send's expiry usually comes first.
MAX_RETRY_AFTER_S = 6 * 3600.0

# Retry requests held in memory at most, per worker; past this the agent stops
# reading the retries topic until some are due.
HOLD_CAPACITY = 10_000

# Read the retries topic in batches of this size, waiting at most this long.
TAKE_BATCH = 500
TAKE_WITHIN_S = 0.1


# --- delays (pure) ----------------------------------------------------------------


def backoff_s(attempt: int, *, base_s: float, max_s: float, jitter: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first).

    Full jitter: ``jitter`` (uniform in [0, 1]) times the exponential ceiling
    ``base_s * 2 ** (attempt - 1)``, which is capped at ``max_s``.
    """
    exponent = min(max(attempt - 1, 0), 64)
    ceiling = min(max_s, base_s * 2.0**exponent)
    return min(max(jitter, 0.0), 1.0) * ceiling


def retry_delay_s(
    retry_after: float | None,
    attempt: int,
    *,
    base_s: float,
    max_s: float,
    jitter: float,
) -> float:
    """Seconds before the next attempt: the provider's Retry-After, else backoff.

    A Retry-After is honoured even when longer than ``max_s`` (the provider
    asked for it), up to :data:`MAX_RETRY_AFTER_S`.
    """
    if retry_after is not None:
        return min(max(retry_after, 0.0), MAX_RETRY_AFTER_S)
    return backoff_s(attempt, base_s=base_s, max_s=max_s, jitter=jitter)


def due_at_ms(now_ms: int, delay_s: float) -> int:
    """The epoch milliseconds ``delay_s`` seconds after ``now_ms``."""
    return now_ms + round(delay_s * 1000)


def jitter() -> float:
    """A uniform random number in [0, 1) for :func:`backoff_s`."""
    return random.random()  # jitter, not cryptography


# --- handing held messages back -------------------------------------------------------


class _RebalanceSensor(faust.Sensor):
    """Calls back when a rebalance starts (from the consumer's own thread)."""

    def __init__(self, callback: Callable[[], None]) -> None:
        super().__init__()
        self._callback = callback

    def on_rebalance_start(self, app: Any) -> dict[str, Any]:
        state: dict[str, Any] = super().on_rebalance_start(app)
        self._callback()
        return state


class HoldRelease:
    """Says when an agent must hand back the messages it holds unacknowledged.

    Faust waits, on a rebalance and at shutdown, until every message in hand
    is acknowledged (``stream_wait_empty``). An agent that holds messages for
    a while (retry requests not yet due, sends waiting for a breaker) checks
    :attr:`active` and wakes up on the events from :meth:`new_event` (or when
    the future of :meth:`started` is done), then finishes or re-queues what
    it holds.
    """

    def __init__(self, app: faust.App) -> None:
        self._app = app
        self._events: list[asyncio.Event] = []
        self._started: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        app.sensors.add(_RebalanceSensor(self._notify_threadsafe))

    @property
    def active(self) -> bool:
        """True while a rebalance runs or the worker stops."""
        return bool(self._app.should_stop or self._app.rebalancing)

    def new_event(self) -> asyncio.Event:
        """An event set whenever a rebalance starts or the worker begins to stop."""
        event = asyncio.Event()
        self._events.append(event)
        return event

    def started(self) -> asyncio.Future[None]:
        """A future done once a handover starts (at once while one runs).

        Shared by every waiter, unlike :meth:`new_event`, so that many tasks
        can wait for a handover without one task or event each.
        """
        if self._started is None or (self._started.done() and not self.active):
            self._started = asyncio.get_running_loop().create_future()
        if self.active and not self._started.done():
            self._started.set_result(None)
        return self._started

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Deliver the notifications while the body runs (inside the agent)."""
        self._loop = asyncio.get_running_loop()
        watcher = asyncio.create_task(self._watch_stop())
        try:
            yield
        finally:
            watcher.cancel()
            self._loop = None

    async def _watch_stop(self) -> None:
        await self._app.wait_until_stopped()
        self._notify()

    def _notify_threadsafe(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._notify)

    def _notify(self) -> None:
        for event in self._events:
            event.set()
        if self._started is not None and not self._started.done():
            self._started.set_result(None)


async def wait_event(event: asyncio.Event, seconds: float | None) -> None:
    """Wait until ``event`` is set or ``seconds`` pass (None: no limit); clear it."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    event.clear()


# --- the retry agent ----------------------------------------------------------------


@dataclass(eq=False)
class _Held:
    """One message of the retries topic, in hand until acknowledged.

    ``request`` is None for a message that was dead-lettered: it only waits
    for its turn to be acknowledged. ``busy`` marks a request being forwarded
    or re-queued, so that it is published once.
    """

    event: Any  # faust.EventT
    request: RetryRequest | None
    busy: bool = False
    done: bool = False


@dataclass
class RetryScheduler:
    """Holds retry requests until due; forwards and acknowledges them in order.

    The agent calls ``hold()`` for every message it reads; it waits while
    ``capacity`` messages are in hand. ``run()`` is the task that forwards
    what is due and re-queues what is held when :class:`HoldRelease` says so.
    """

    pipeline: Pipeline
    stream: Any  # faust.StreamT
    release: HoldRelease
    capacity: int = HOLD_CAPACITY
    clock_ms: Callable[[], int] = pipeline_app.now_ms
    _queues: dict[Any, deque[_Held]] = field(default_factory=dict)
    _due: list[tuple[int, int, _Held]] = field(default_factory=list)
    _order: itertools.count[int] = field(default_factory=itertools.count)
    _in_hand: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _room: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._release_event = self.release.new_event()

    @property
    def in_hand(self) -> int:
        """Messages read and not yet acknowledged."""
        return self._in_hand

    async def hold(self, event: Any, request: RetryRequest | None) -> None:
        """Keep a message until its send is forwarded (``None``: ack in turn)."""
        held = _Held(event, request, done=request is None)
        self._queues.setdefault(event.message.tp, deque()).append(held)
        self._in_hand += 1
        if request is None:
            await self._ack_ready(event.message.tp)
        else:
            heapq.heappush(self._due, (request.due_at_ms, next(self._order), held))
            self._wake.set()

        while self._in_hand >= self.capacity:
            if not await self._unblock_heads():
                await wait_event(self._room, None)

    async def run(self) -> None:
        """Forward requests as they fall due; re-queue them on a handover."""
        while True:
            if self.release.active:
                await self._requeue(self._pop_due(None))
            await self._forward(self._pop_due(self.clock_ms()))

            timeout = None
            if self._due:
                timeout = max(0.0, (self._due[0][0] - self.clock_ms()) / 1000)
            await self._sleep(timeout)

    async def _sleep(self, seconds: float | None) -> None:
        wake = asyncio.ensure_future(self._wake.wait())
        released = asyncio.ensure_future(self._release_event.wait())
        try:
            await asyncio.wait(
                (wake, released), timeout=seconds, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            wake.cancel()
            released.cancel()
        self._wake.clear()
        self._release_event.clear()

    def _pop_due(self, now_ms: int | None) -> list[tuple[_Held, RetryRequest]]:
        """Take the requests due at ``now_ms`` (all of them for None)."""
        ready = []
        while self._due and (now_ms is None or self._due[0][0] <= now_ms):
            held = heapq.heappop(self._due)[2]
            if held.busy or held.request is None:
                continue
            held.busy = True
            ready.append((held, held.request))
        return ready

    async def _forward(self, ready: list[tuple[_Held, RetryRequest]]) -> None:
        """Publish each send again, attempt number raised by one."""
        futures = []
        for _, request in ready:
            send = request.send
            again = send.model_copy(update={"attempt": send.attempt + 1})
            topic = pipeline_app.SENDS[send.platform]
            futures.append(await self.pipeline.publish(topic, send.send_id, again))
        await self._finish(ready, futures)
        if ready:
            log.debug("forwarded %d retries", len(ready))

    async def _requeue(self, waiting: list[tuple[_Held, RetryRequest]]) -> None:
        """Put requests back at the end of the retries topic, unchanged."""
        futures = []
        for _, request in waiting:
            key = request.send.send_id
            futures.append(
                await self.pipeline.publish(pipeline_app.RETRIES, key, request)
            )
        await self._finish(waiting, futures)
        if waiting:
            log.info("put back %d retries not yet due", len(waiting))

    async def _unblock_heads(self) -> bool:
        """Re-queue the requests that keep forwarded ones from being acknowledged.

        A request due late at the head of a partition would keep every later,
        already forwarded message of that partition in hand. Returns whether
        anything was re-queued.
        """
        blocking = []
        for queue in self._queues.values():
            if not any(held.done for held in queue):
                continue
            for held in queue:
                if held.done:
                    break
                if not held.busy and held.request is not None:
                    held.busy = True
                    blocking.append((held, held.request))
        await self._requeue(blocking)
        return bool(blocking)

    async def _finish(
        self, entries: list[tuple[_Held, RetryRequest]], futures: list[Any]
    ) -> None:
        """Once Kafka has the published messages, acknowledge what they free."""
        await asyncio.gather(*futures)
        partitions = set()
        for held, _ in entries:
            held.done = True
            partitions.add(held.event.message.tp)
        for tp in partitions:
            await self._ack_ready(tp)

    async def _ack_ready(self, tp: Any) -> None:
        """Acknowledge the finished messages at the head of a partition, in order."""
        queue = self._queues.get(tp)
        while queue and queue[0].done:
            held = queue.popleft()
            await self.stream.ack(held.event)
            self._in_hand -= 1
        if self._in_hand < self.capacity:
            self._room.set()


def decode_request(value: bytes | None) -> RetryRequest:
    """A retry request from the topic's bytes (raises ValueError when invalid)."""
    if value is None:
        raise ValueError("empty value")
    return RetryRequest.model_validate_json(value)


def attach(pipeline: Pipeline) -> None:
    """Add the retry agent (concurrency 1) on the retries topic."""
    release = HoldRelease(pipeline.app)
    topic = pipeline.topics[pipeline_app.RETRIES]

    async def retry_agent(stream: Any) -> None:
        scheduler = RetryScheduler(pipeline, stream, release)
        async with release.watching(), _supervised(scheduler.run()) as runner:
            async for events in stream.noack_take(TAKE_BATCH, within=TAKE_WITHIN_S):
                for event in events:
                    runner.check()
                    await scheduler.hold(event, await _decode(pipeline, event))

    pipeline.app.agent(topic, name="pushstream.retry", concurrency=1)(retry_agent)


async def _decode(pipeline: Pipeline, event: Any) -> RetryRequest | None:
    """The request in an event; a bad one goes to dead-letters and gives None."""
    try:
        return decode_request(event.message.value)
    except ValueError as exc:
        future = await pipeline.dead_letter_event(
            event, stage="retry", error=f"invalid retry request: {describe_error(exc)}"
        )
        await future
        return None


class _Task:
    """A background task whose failure is raised in the agent that owns it."""

    def __init__(self, task: asyncio.Task[None]) -> None:
        self._task = task

    def check(self) -> None:
        if self._task.done() and not self._task.cancelled():
            self._task.result()


@contextlib.asynccontextmanager
async def _supervised(coro: Any) -> AsyncIterator[_Task]:
    task: asyncio.Task[None] = asyncio.create_task(coro)
    try:
        yield _Task(task)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
