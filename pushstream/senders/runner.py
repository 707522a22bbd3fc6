"""The sender agents: from each platform's send topic to its provider and back.

One agent per platform reads ``sends.<platform>`` with concurrency 1 and
works in batches: it takes up to ``send_batch_size`` sends (or what arrived
within ``send_batch_within_s``), makes their requests concurrently, at most
``max_in_flight`` at a time (the HTTP/2 transport further bounds them by the
server's stream limit), and publishes exactly one result for each send:

- a :class:`~pushstream.events.Delivery` (delivered, invalid_token, failed,
  dropped, or expired when its time to live passed before the request), plus
  a ``invalidated`` :class:`~pushstream.events.TokenEvent` for a dead token;
- or a :class:`~pushstream.events.RetryRequest` on the retries topic when the
  provider said "later", due after its Retry-After or after a backoff
  (:mod:`pushstream.retry`); after ``retry_max_attempts`` attempts the send
  fails with ``retries_exhausted`` and goes to dead-letters.

At least once: a batch's messages are acknowledged, in order, only after
Kafka has every result published for them, so a committed offset always has
its outcome in Kafka. This is why the agent uses ``noack_take`` and acks
itself: ``take()`` acknowledges a batch in a ``finally`` block, also when the
body is left by an exception or a cancellation, which would commit sends
whose outcome was never published.

Each platform has a circuit breaker (:mod:`pushstream.senders.breaker`);
while it is open the agent holds its batch. Holding charges no attempt, so
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
at-least-once allows.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Sequence
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
class _Item:
    event: Any  # faust.EventT
    send: Send
    holds: int = 0  # requests made whose outage answer was held, not settled


@dataclass(frozen=True, slots=True)
class _Answer:
    result: SendResult
    sent_at_ms: int
    done_at_ms: int


class PlatformSender:
    """The sending loop of one platform: batches, breaker, outcomes, acks."""

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
        self._in_flight: asyncio.Semaphore | None = None
        self._released: asyncio.Event | None = None

    async def run(self, stream: Any) -> None:
        """The agent body: start the client, send batch after batch, close it."""
        settings = self._settings
        self._in_flight = asyncio.Semaphore(settings.max_in_flight)
        self._released = self.release.new_event()
        try:
            await self.client.start()
            async with self.release.watching():
                batches = stream.noack_take(
                    settings.send_batch_size, within=settings.send_batch_within_s
                )
                async for events in batches:
                    await self.handle(stream, events)
        except Exception as exc:
            # An agent that dies keeps its unacknowledged sends; stopping the
            # worker hands them to the next one instead of stalling the topic.
            await self.pipeline.app.crash(exc)
        finally:
            await self.client.aclose()

    async def handle(self, stream: Any, events: Sequence[Any]) -> None:
        """Send one batch and publish every outcome; then acknowledge it."""
        published: list[Awaitable[Any]] = []
        pending = []
        for event in events:
            try:
                pending.append(
                    _Item(event, decode_send(event.message.value, self.platform))
                )
            except (ValidationError, ValueError) as exc:
                error = f"invalid send: {describe_error(exc)}"
                published.append(
                    await self.pipeline.dead_letter_event(
                        event, stage=self._stage, error=error
                    )
                )

        while pending:
            pending = await self._expire(pending, published)
            if pending and self.release.active:
                await self._requeue(pending, published)
                break
            if pending:
                pending = await self._attempt_all(pending, published)
            if pending and not self.release.active:
                await retry.wait_event(
                    self._release_event(), self.breaker.seconds_until_probe()
                )

        await asyncio.gather(*published)
        for event in events:
            await stream.ack(event)

    def _release_event(self) -> asyncio.Event:
        if self._released is None:
            raise RuntimeError("the sender agent is not running")
        return self._released

    async def _expire(
        self, items: list[_Item], published: list[Awaitable[Any]]
    ) -> list[_Item]:
        """Publish ``expired`` for the sends past their expiry; return the rest."""
        now = pipeline_app.now_ms()
        live = []
        for item in items:
            if is_expired(item.send, now):
                published.extend(await self._publish(item, expired(item.send, now)))
            else:
                live.append(item)
        return live

    async def _attempt_all(
        self, items: list[_Item], published: list[Awaitable[Any]]
    ) -> list[_Item]:
        """Make the requests concurrently; return the sends held back."""
        tasks = [asyncio.ensure_future(self._attempt(item)) for item in items]
        await self._wait_or_abandon(tasks)

        held = []
        for item, task in zip(items, tasks, strict=True):
            answer = None if task.cancelled() else task.result()
            if answer is None:
                held.append(item)
                continue
            settled = settle(
                item.send,
                answer.result,
                settings=self._settings,
                sent_at_ms=answer.sent_at_ms,
                now_ms=answer.done_at_ms,
                jitter=retry.jitter(),
            )
            published.extend(await self._publish(item, settled))
        return held

    async def _wait_or_abandon(
        self, tasks: Sequence[asyncio.Future[_Answer | None]]
    ) -> None:
        """Wait for the attempts; on a handover give them a grace time, then cancel."""
        everything = asyncio.gather(*tasks, return_exceptions=True)
        event = self._release_event()
        while not everything.done() and not self.release.active:
            released = asyncio.ensure_future(event.wait())
            try:
                await asyncio.wait(
                    (everything, released), return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                released.cancel()
            event.clear()
        if everything.done():
            return

        grace = self._settings.shutdown_timeout_s / 2
        _, late = await asyncio.wait(tasks, timeout=grace)
        for task in late:
            task.cancel()
        if late:
            log.warning(
                "%s: abandoning %d requests still in flight after %.1fs",
                self.platform,
                len(late),
                grace,
            )
            await asyncio.wait(late)

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
                result = SendResult("retry", CLIENT_ERROR)
                return _Answer(result, sent_at, pipeline_app.now_ms())

        self.breaker.record(result)
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

    async def _requeue(
        self, items: list[_Item], published: list[Awaitable[Any]]
    ) -> None:
        """Put sends not made back at the end of their topic, unchanged."""
        topic = pipeline_app.SENDS[self.platform]
        for item in items:
            published.append(
                await self.pipeline.publish(topic, item.send.send_id, item.send)
            )
        log.info(
            "%s: put back %d sends for after the handover", self.platform, len(items)
        )


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
