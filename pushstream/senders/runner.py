"""The sender agents: from each platform's send topic to its provider and back.

One agent per platform reads ``sends.<platform>`` with concurrency 1. It
takes sends in batches (up to ``send_batch_size``, or what arrived within
``send_batch_within_s``) but does not wait for a batch to finish: each send
is handled by a task of its own, and the agent takes the next batch while
earlier sends are still in flight. Requests run at most ``max_in_flight`` at
a time (the HTTP/2 transport further bounds them by the server's stream
limit). Each send's result is published as soon as its own request is
answered, exactly one per send:

- a :class:`~pushstream.events.Delivery` (delivered, invalid_token, failed,
  dropped, or expired when its time to live passed before the request), plus
  a ``invalidated`` :class:`~pushstream.events.TokenEvent` for a dead token;
- or a :class:`~pushstream.events.RetryRequest` on the retries topic when the
  provider said "later", due after its Retry-After or after a backoff
  (:mod:`pushstream.retry`); after ``retry_max_attempts`` attempts the send
  fails with ``retries_exhausted`` and goes to dead-letters.

At least once: a message is acknowledged only after Kafka has confirmed every
result published for it, and only once every earlier message of its
partition is acknowledged too, because faust-streaming can commit past a
lone unacknowledged offset (see :meth:`PlatformSender._ack_ready`). So a
committed offset always has its outcome in Kafka. This is why the agent uses
``noack_take`` and acks itself: ``take()`` acknowledges a batch in a
``finally`` block, also when the body is left by an exception or a
cancellation, which would commit sends whose outcome was never published.

Bounded: the agent takes another batch only while at most ``max_in_flight``
messages are unacknowledged, so at most ``max_in_flight + send_batch_size``
are in hand. A slow provider, or one slow request at the head of a
partition (the messages behind it wait to be acknowledged in turn), slows
the reading of the topic instead of growing memory.

Each platform has a circuit breaker (:mod:`pushstream.senders.breaker`);
while it is open the sends are held, and try again at the breaker's next
probe time or once its probe is answered. Holding charges no attempt, so
no send may be held for ever: the half-open probe's answer is settled like
any other (a probe that fails again moves to the retries topic, one
attempt spent, and the next probe is another send), and a send whose
request met an outage is held at most ``UNCHARGED_HOLDS`` times before its
answer is settled too. A send that makes the provider fail (one that
closes the connection under the requests beside it, say) thus ends
``failed`` with ``retries_exhausted`` while the others flow.

On a rebalance or at shutdown the held sends, and those not yet started, go
back to the end of their send topic (unchanged, same attempt) and are
acknowledged; requests already in flight get ``shutdown_timeout_s / 2`` to
finish before they are abandoned the same way. An abandoned request may have
reached the provider: the retry can then deliver it twice, which
at-least-once allows. A send's task that fails unexpectedly crashes the
worker, as an error in the agent itself does; its message and those after
it stay unacknowledged and are read again.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from pydantic import ValidationError

from pushstream import app as pipeline_app
from pushstream import metrics, retry
from pushstream.config import Settings
from pushstream.events import (
    PLATFORMS,
    Delivery,
    Outcome,
    Platform,
    RetryRequest,
    Send,
    TokenEvent,
    describe_error,
    token_fingerprint,
)
from pushstream.senders.breaker import BreakerSnapshot, CircuitBreaker, is_outage
from pushstream.senders.result import SendResult

if TYPE_CHECKING:
    from pushstream.app import Pipeline

log = logging.getLogger(__name__)

NOT_CONFIGURED = "not_configured"
RETRIES_EXHAUSTED = "retries_exhausted"
EXPIRED = "expired"
CLIENT_ERROR = "client_error"
# How often a send whose request met an outage is held without being charged
# an attempt, the breaker having opened meanwhile: once is what an outage
# needs; a send met by the outage every time is the outage's likely cause.
UNCHARGED_HOLDS = 1

# Where each platform's client lives; imported only for configured platforms.
CLIENT_CLASSES: dict[Platform, tuple[str, str]] = {
    "apns": ("pushstream.senders.apns", "ApnsClient"),
    "fcm": ("pushstream.senders.fcm", "FcmClient"),
    "wns": ("pushstream.senders.wns", "WnsClient"),
}


class SenderClient(Protocol):
    """What the runner needs from a provider client."""

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def send(self, send: Send) -> SendResult: ...


class NotConfiguredClient:
    """The client of a platform with no app configured: every send fails."""

    async def start(self) -> None:
        """Nothing to start."""

    async def aclose(self) -> None:
        """Nothing to close."""

    async def send(self, send: Send) -> SendResult:
        """Fail without a request: pushstream has no credentials for it."""
        return SendResult("failed", NOT_CONFIGURED)


def make_client(settings: Settings, platform: Platform) -> SenderClient:
    """The platform's client built from the settings (ConfigError if invalid)."""
    if not getattr(settings, platform):
        log.warning(
            "no %s app is configured (PUSHSTREAM_%s): its sends fail with %s",
            platform,
            platform.upper(),
            NOT_CONFIGURED,
        )
        return NotConfiguredClient()
    module_name, class_name = CLIENT_CLASSES[platform]
    client_class = getattr(importlib.import_module(module_name), class_name)
    return cast(SenderClient, client_class.from_settings(settings))


# --- what to publish for a send (pure) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Settled:
    """What to publish for one send: a delivery, or a retry request; maybe more.

    ``dead_letter`` is the reason to keep the send on dead-letters, when it
    gave up on it.
    """

    delivery: Delivery | None = None
    retry: RetryRequest | None = None
    token_event: TokenEvent | None = None
    dead_letter: str | None = None


def is_expired(send: Send, now_ms: int) -> bool:
    """True once the send's expiry time has passed."""
    return send.expires_at_ms is not None and now_ms > send.expires_at_ms


def delivery_for(
    send: Send,
    outcome: Outcome,
    reason: str,
    *,
    now_ms: int,
    attempts: int,
    status: int | None = None,
    provider_id: str | None = None,
    sent_at_ms: int | None = None,
) -> Delivery:
    """The Delivery of a send, its latency counted from its acceptance."""
    return Delivery(
        notification_id=send.notification_id,
        send_id=send.send_id,
        user_id=send.user_id,
        device_id=send.device_id,
        platform=send.platform,
        app=send.app,
        outcome=outcome,
        reason=reason,
        status=status,
        provider_message_id=provider_id,
        attempts=attempts,
        accepted_at_ms=send.accepted_at_ms,
        sent_at_ms=sent_at_ms,
        completed_at_ms=now_ms,
        latency_ms=max(0, now_ms - send.accepted_at_ms),
        replay=send.replay,
    )


def expired(send: Send, now_ms: int) -> Settled:
    """A send whose time to live passed: no request, an ``expired`` delivery."""
    return Settled(
        delivery=delivery_for(
            send, "expired", EXPIRED, now_ms=now_ms, attempts=send.attempt - 1
        )
    )


def settle(
    send: Send,
    result: SendResult,
    *,
    settings: Settings,
    sent_at_ms: int,
    now_ms: int,
    jitter: float,
) -> Settled:
    """Turn a provider's answer to attempt ``send.attempt`` into what to publish."""
    if result.outcome != "retry":
        delivery = delivery_for(
            send,
            result.outcome,
            result.reason,
            now_ms=now_ms,
            attempts=send.attempt,
            status=result.status,
            provider_id=result.provider_id,
            sent_at_ms=sent_at_ms,
        )
        token_event = None
        if result.outcome == "invalid_token":
            token_event = invalidated(send, result, now_ms)
        return Settled(delivery=delivery, token_event=token_event)

    if send.attempt >= settings.retry_max_attempts:
        delivery = delivery_for(
            send,
            "failed",
            RETRIES_EXHAUSTED,
            now_ms=now_ms,
            attempts=send.attempt,
            status=result.status,
            sent_at_ms=sent_at_ms,
        )
        why = (
            f"{RETRIES_EXHAUSTED} after {send.attempt} attempts; "
            f"last: {result.reason} (status {result.status})"
        )
        return Settled(delivery=delivery, dead_letter=why)

    delay = retry.retry_delay_s(
        result.retry_after,
        send.attempt,
        base_s=settings.retry_base_s,
        max_s=settings.retry_max_s,
        jitter=jitter,
    )
    request = RetryRequest(
        send=send,
        due_at_ms=retry.due_at_ms(now_ms, delay),
        reason=result.reason,
        status=result.status,
    )
    return Settled(retry=request)


def invalidated(send: Send, result: SendResult, now_ms: int) -> TokenEvent:
    """The token event telling the registry (and upstream) a token is dead."""
    return TokenEvent(
        type="invalidated",
        user_id=send.user_id,
        device_id=send.device_id,
        platform=send.platform,
        app=send.app,
        token=send.token,
        reason=result.reason,
        provider_time_ms=result.invalidated_at_ms,
        event_time_ms=now_ms,
        notification_id=send.notification_id,
    )


def token_event_key(event: TokenEvent) -> str:
    """Token events are keyed by user id; a raw-token send by its token's hash."""
    return (
        event.user_id if event.user_id is not None else token_fingerprint(event.token)
    )


def decode_send(value: bytes | None, platform: Platform) -> Send:
    """A send from its topic's bytes; ValueError names what is wrong."""
    if value is None:
        raise ValueError("empty value")
    send = Send.model_validate_json(value)
    if send.platform != platform:
        raise ValueError(f"a {send.platform} send on the {platform} send topic")
    return send


# --- the agent ------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Taken:
    """One message taken from the send topic, in hand until acknowledged."""

    event: Any  # faust.EventT
    done: bool = False  # its outcome is in Kafka: it may be acknowledged in turn


@dataclass(eq=False, slots=True)
class _Item:
    event: Any  # faust.EventT
    send: Send
    holds: int = 0  # requests made whose outage answer was held, not settled
    attempts: int = 0  # requests started for it by this worker
    abandoned: bool = False  # its request was cancelled after the handover's grace


@dataclass(frozen=True, slots=True)
class _Answer:
    result: SendResult
    sent_at_ms: int
    done_at_ms: int


class PlatformSender:
    """The sending loop of one platform: sends, breaker, outcomes, acks."""

    def __init__(
        self,
        pipeline: Pipeline,
        platform: Platform,
        client: SenderClient,
        breaker: CircuitBreaker,
    ) -> None:
        self.pipeline = pipeline
        self.platform = platform
        self.client = client
        self.breaker = breaker
        self.release = retry.HoldRelease(pipeline.app)
        self._settings = pipeline.settings
        self._stage = f"sender.{platform}"
        self._stream: Any = None
        self._in_flight: asyncio.Semaphore | None = None
        self._in_hand: dict[Any, deque[_Taken]] = {}
        self._unacked = 0
        self._room = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        # The tasks waiting for a request, and the item each one requests for.
        self._requesting: dict[asyncio.Task[Any], _Item] = {}
        self._failure: BaseException | None = None
        self._crash: asyncio.Future[None] | None = None  # referenced while it runs
        self._probe_answer: asyncio.Future[None] | None = None
        self._put_back = 0
        self._abandoned = 0

    async def run(self, stream: Any) -> None:
        """The agent body: start the client, take sends while there is room."""
        settings = self._settings
        self._stream = stream
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        try:
            await self.client.start()
            async with self.release.watching():
                abandoning = asyncio.create_task(self._abandon_after_grace())
                try:
                    batches = stream.noack_take(
                        settings.send_batch_size, within=settings.send_batch_within_s
                    )
                    async for events in batches:
                        for event in events:
                            self._start(event)
                        if not await self._wait_for_room():
                            break
                finally:
                    abandoning.cancel()
        except Exception as exc:
            # An agent that dies keeps its unacknowledged sends; stopping the
            # worker hands them to the next one instead of stalling the topic.
            await self.pipeline.app.crash(exc)
        finally:
            await self._cancel_all()
            await self.client.aclose()

    def _start(self, event: Any) -> None:
        """Keep the message in hand, in its partition's order; handle it apart."""
        taken = _Taken(event)
        self._in_hand.setdefault(event.message.tp, deque()).append(taken)
        self._unacked += 1
        task = asyncio.create_task(self.handle(taken))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def _wait_for_room(self) -> bool:
        """Wait until another batch fits; False once a send's task has failed.

        The next batch is taken only while at most ``max_in_flight`` messages
        are unacknowledged, so never more than ``max_in_flight +
        send_batch_size`` are in hand: a slow provider, or one slow request
        at the head of a partition, slows the reading instead of growing
        memory.
        """
        while self._unacked > self._settings.max_in_flight and self._failure is None:
            self._room.clear()
            await self._room.wait()
        return self._failure is None

    def _finished(self, task: asyncio.Task[None]) -> None:
        """Crash the worker on a send's failure, as an error in the agent would."""
        self._tasks.discard(task)
        if task.cancelled() or self._failure is not None:
            return
        failure = task.exception()
        if failure is None:
            return
        self._failure = failure
        self._room.set()
        # The agent may be waiting for messages, not for this task: crash from
        # here, so that the worker stops and hands the partitions over.
        self._crash = asyncio.ensure_future(self.pipeline.app.crash(failure))

    async def _cancel_all(self) -> None:
        """Stop the sends still in hand: they stay unacknowledged, so are read again."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, taken: _Taken) -> None:
        """Settle one message, wait until Kafka has its outcome, acknowledge in turn."""
        event = taken.event
        try:
            item = _Item(event, decode_send(event.message.value, self.platform))
        except (ValidationError, ValueError) as exc:
            error = f"invalid send: {describe_error(exc)}"
            await self.pipeline.dead_letter_event(event, stage=self._stage, error=error)
        else:
            for published in await self._settle(item):
                await published
        taken.done = True
        await self._ack_ready(event.message.tp)

    async def _ack_ready(self, tp: Any) -> None:
        """Acknowledge the settled messages at the head of a partition, in order.

        faust-streaming 0.15 does not commit only consecutive acknowledged
        offsets: ``Consumer._new_offset`` (faust/transport/consumer.py)
        returns the end of the first run of consecutive acknowledged offsets,
        but its check for a gap before that run is
        ``min(acked) - committed_offset > 1`` and is skipped while the
        committed offset is None or 0. One unacknowledged offset right at the
        committed position (or at the start of a partition never committed)
        is thus committed past. So a message is acknowledged only once every
        earlier message of its partition is: none overtakes an unsettled one.
        ``Stream.ack`` does not suspend, so this loop acknowledges each
        message once and in order even when tasks finish together.
        """
        queue = self._in_hand.get(tp)
        while queue and queue[0].done:
            taken = queue.popleft()
            await self._stream.ack(taken.event)
            self._unacked -= 1
        if queue is not None and not queue:
            del self._in_hand[tp]
        self._room.set()
        if self._unacked == 0 and self._put_back:
            log.info(
                "%s: put back %d sends for after the handover "
                "(%d abandoned in flight after %.1fs)",
                self.platform,
                self._put_back,
                self._abandoned,
                self._settings.shutdown_timeout_s / 2,
            )
            self._put_back = self._abandoned = 0

    async def _settle(self, item: _Item) -> list[Awaitable[Any]]:
        """Make the send's request until it has an answer; publish what it means.

        Returns the publish futures: the send is done once Kafka has them.
        """
        while True:
            now = pipeline_app.now_ms()
            if is_expired(item.send, now):
                return await self._publish(item, expired(item.send, now))
            if self.release.active:
                return await self._requeue(item)
            answer = await self._attempt_or_abandon(item)
            if answer is not None:
                settled = settle(
                    item.send,
                    answer.result,
                    settings=self._settings,
                    sent_at_ms=answer.sent_at_ms,
                    now_ms=answer.done_at_ms,
                    jitter=retry.jitter(),
                )
                return await self._publish(item, settled)
            if not self.release.active:
                await self._hold()

    async def _hold(self) -> None:
        """Wait for the breaker: its next probe, its probe's answer, or a handover."""
        await asyncio.wait(
            (self.release.started(), self._probe_answered()),
            timeout=self.breaker.seconds_until_probe(),
            return_when=asyncio.FIRST_COMPLETED,
        )

    def _probe_answered(self) -> asyncio.Future[None]:
        """A future done when the current probe has its answer (or is given up)."""
        if self._probe_answer is None or self._probe_answer.done():
            self._probe_answer = asyncio.get_running_loop().create_future()
        return self._probe_answer

    def _end_probe(self) -> None:
        """Wake the held sends: the breaker has closed, or stays open longer."""
        if self._probe_answer is not None and not self._probe_answer.done():
            self._probe_answer.set_result(None)

    async def _attempt_or_abandon(self, item: _Item) -> _Answer | None:
        """The request, in the send's own task; None once abandoned on a handover.

        The request runs in the task that handles the send, with no task or
        waiter of its own: :meth:`_abandon_after_grace` cancels it when a
        handover's grace time runs out, and it then counts as not made.
        """
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a send's request runs in its own task")
        item.attempts += 1
        self._requesting[task] = item
        try:
            return await self._attempt(item)
        except asyncio.CancelledError:
            if not item.abandoned:
                raise
            task.uncancel()
            item.abandoned = False
            self._abandoned += 1
            return None
        finally:
            del self._requesting[task]

    async def _abandon_after_grace(self) -> None:
        """On each handover, give the requests in flight a grace time, then cancel them.

        The grace is ``shutdown_timeout_s / 2`` from the handover's start, for
        the requests in flight at that moment (no new one starts while the
        handover runs). The cancelled sends are put back on their topic. While
        a handover lasts, this repeats once per grace time, finding no request.
        """
        grace = self._settings.shutdown_timeout_s / 2
        while True:
            await self.release.started()
            in_flight = {item: item.attempts for item in self._requesting.values()}
            await asyncio.sleep(grace)
            for task, item in list(self._requesting.items()):
                if in_flight.get(item) == item.attempts and not item.abandoned:
                    item.abandoned = True
                    task.cancel()

    async def _attempt(self, item: _Item) -> _Answer | None:
        """One request, unless a handover or the breaker holds it (None).

        An outage answer while the breaker is not closed is held (None) too,
        at most ``UNCHARGED_HOLDS`` times per send, and never for the probe.
        """
        async with self._semaphore():
            if self.release.active:
                return None
            probe = self.breaker.state == "half_open"
            if not self.breaker.allow():
                return None

            sent_at = pipeline_app.now_ms()
            try:
                with metrics.ProviderRequest(self.platform):
                    result = await self.client.send(item.send)
            except asyncio.CancelledError:
                if probe:
                    self.breaker.cancel_probe()
                    self._end_probe()
                raise
            except Exception as exc:
                log.exception(
                    "%s client failed on send %s: %s",
                    self.platform,
                    item.send.send_id,
                    type(exc).__name__,
                )
                if probe:
                    self.breaker.cancel_probe()
                    self._end_probe()
                result = SendResult("retry", CLIENT_ERROR)
                return _Answer(result, sent_at, pipeline_app.now_ms())

        self.breaker.record(result)
        if probe:
            self._end_probe()
        answer = _Answer(result, sent_at, pipeline_app.now_ms())
        if probe or not is_outage(result) or self.breaker.state == "closed":
            return answer
        if item.holds >= UNCHARGED_HOLDS:
            return answer
        item.holds += 1
        return None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._in_flight is None:
            raise RuntimeError("the sender agent is not running")
        return self._in_flight

    async def _publish(self, item: _Item, settled: Settled) -> list[Awaitable[Any]]:
        """Hand a send's outcome to the producer; return the futures to await."""
        pipeline = self.pipeline
        send = item.send
        futures = []
        if settled.delivery is not None:
            metrics.delivery(settled.delivery)
            futures.append(
                await pipeline.publish(
                    pipeline_app.DELIVERIES, send.notification_id, settled.delivery
                )
            )
        if settled.retry is not None:
            metrics.retry_scheduled(self.platform, settled.retry.reason)
            futures.append(
                await pipeline.publish(
                    pipeline_app.RETRIES, send.send_id, settled.retry
                )
            )
        if settled.token_event is not None:
            key = token_event_key(settled.token_event)
            futures.append(
                await pipeline.publish(
                    pipeline_app.TOKEN_EVENTS, key, settled.token_event
                )
            )
        if settled.dead_letter is not None:
            futures.append(
                await pipeline.dead_letter_event(
                    item.event, stage=self._stage, error=settled.dead_letter
                )
            )
        log.debug(
            "%s send %s: %s",
            self.platform,
            send.send_id,
            settled.delivery.outcome if settled.delivery else "retry",
        )
        return futures

    async def _requeue(self, item: _Item) -> list[Awaitable[Any]]:
        """Put a send not made back at the end of its topic, unchanged."""
        topic = pipeline_app.SENDS[self.platform]
        self._put_back += 1
        return [await self.pipeline.publish(topic, item.send.send_id, item.send)]


class Senders:
    """The three platforms' senders of one worker."""

    def __init__(self, senders: dict[Platform, PlatformSender]) -> None:
        self.by_platform = senders

    def breakers(self) -> dict[Platform, BreakerSnapshot]:
        """Each platform's breaker state, for metrics and health checks."""
        return {p: s.breaker.snapshot() for p, s in self.by_platform.items()}


def attach(pipeline: Pipeline) -> Senders:
    """Add one sender agent per platform (concurrency 1) on its send topic.

    Builds the clients from the settings first, so a malformed credential
    stops the worker at start-up with a ConfigError naming the setting.
    """
    settings = pipeline.settings
    senders = {}
    for platform in PLATFORMS:
        breaker = CircuitBreaker(
            platform,
            failures=settings.breaker_failures,
            open_s=settings.breaker_open_s,
            max_open_s=max(settings.breaker_max_open_s, settings.breaker_open_s),
        )
        sender = PlatformSender(
            pipeline, platform, make_client(settings, platform), breaker
        )
        topic = pipeline.topics[pipeline_app.SENDS[platform]]
        pipeline.app.agent(topic, name=f"pushstream.send.{platform}", concurrency=1)(
            sender.run
        )
        senders[platform] = sender
    return Senders(senders)
