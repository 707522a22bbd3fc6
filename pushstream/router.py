"""Routing: one notification in, one rendered send per live device out.

The router agent reads ``notifications`` (key: the user id) and, for each:

1. decodes and validates it; a bad one goes to dead-letters (stage
   ``router``) and the stream goes on;
2. drops it as ``expired`` when its ``expires_at`` (or ``ttl``) has passed;
3. splits an ``audience`` into one notification per user, re-published on
   ``notifications`` keyed by that user, so that each copy arrives on the
   partition that holds the user's devices (see :func:`per_user`);
4. finds its targets: the raw ``tokens`` it names, or the user's live devices
   in the devices table (a lookup sees only the partition of the notification
   in hand, which is why the key must be the user id);
5. keeps the targets its ``platforms`` and ``apps`` filters allow, skips those
   already sent this notification, renders the rest with their platform's
   ``render()`` and publishes one :class:`~pushstream.events.Send` per target
   on ``sends.<platform>``, keyed by the send id ``<notification id>:<device
   id>``.

Everything not sent gets a :class:`~pushstream.events.Delivery` on
``deliveries`` (key: the notification id):

============  ====================  ===========================================
outcome       reason                when
============  ====================  ===========================================
expired       expired               its expiry passed before it was routed;
                                    one per notification
dropped       no_devices            the user has no live (active) device; one
                                    per notification
dropped       filtered              devices exist, the filters exclude all of
                                    them; one per notification
rejected      payload_too_large     the rendered body is over the provider's
                                    limit; one per device
rejected      invalid_header        a header the notification adds breaks
                                    HTTP/2's field rules or is one only the
                                    sender sets; one per device
rejected      render_failed         the platform's renderer raised; one per
                                    device (a bug, logged once)
duplicate     already_sent          this notification id was already sent to
                                    this device; one per device
============  ====================  ===========================================

Idempotency: the ``routed`` table remembers, per ``<user id>\\0<notification
id>`` (raw-token notifications: ``<record key>\\0<notification id>``), which
devices a notification was sent to and by which record (its offset). The same
id arriving again in another record yields ``duplicate`` for those devices;
the *same* record handled again, which is what happens when a worker dies
before committing its offset, sends again, so a crash can cause a bounded
number of repeated sends but never loses one. Those sends are marked
``replay`` (their deliveries too) and counted in
``pushstream_replayed_sends_total``. Entries are forgotten after
``dedup_window_s``: the table's RocksDB store drops them (rocksdict TTL), its
changelog topic deletes them (``cleanup.policy=compact,delete``), and entries
older than the window are ignored even before either has run.

Expiry: ``expires_at`` is absolute; ``ttl`` counts from the moment the
notification was published (its Kafka record timestamp), so time spent
waiting in a lagging partition counts. ``ttl: 0`` means "now or never":
delivered if the device is reachable now, and never stored by a provider
(each send carries ``now_or_never``, and the renderers ask APNs, FCM and
WNS not to keep it). Pushstream itself gives such a notification
:data:`NOW_OR_NEVER_GRACE_S` from its publication to get through routing,
the send topics and retries; after that it is ``expired`` like any other.
(An audience copy is re-published, and its grace counts from then.)
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import ValidationError

from pushstream import metrics
from pushstream.app import DELIVERIES, NOTIFICATIONS, SENDS, Pipeline, now_ms
from pushstream.events import (
    PLATFORMS,
    Delivery,
    Notification,
    Outcome,
    Platform,
    Send,
    UserDevices,
    describe_error,
    device_id_for_token,
    normalize_token,
    to_ms,
)
from pushstream.senders.result import Rendered, Target

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

STAGE = "router"

# The reasons of the deliveries the router itself publishes.
EXPIRED = "expired"
NO_DEVICES = "no_devices"
FILTERED = "filtered"
PAYLOAD_TOO_LARGE = "payload_too_large"
INVALID_HEADER = "invalid_header"
RENDER_FAILED = "render_failed"
ALREADY_SENT = "already_sent"

NOW_OR_NEVER_GRACE_S = 30
"""Seconds a ``ttl: 0`` notification has, from its publication, to be sent.

Not the provider's time to live (that is zero): pushstream's own allowance
for its pipeline (routing, the send topic, a quick retry), after which the
send is ``expired`` instead of reaching a device late.
"""


class Renderer(Protocol):
    """A platform's pure request builder (``senders/<platform>.py: render``)."""

    def __call__(
        self, n: Notification, target: Target, now_ms: int, expires_at_ms: int | None
    ) -> Rendered: ...


class Refused(ValueError):
    """A notification that cannot be routed as given; the message says why."""


# --- decoding and addressing ------------------------------------------------


def parse(value: bytes | None) -> Notification:
    """Decode and validate a notification record's value.

    Raises :class:`Refused` for an empty value and pydantic's
    ``ValidationError`` for anything else wrong (describe it with
    :func:`~pushstream.events.describe_error`, which never quotes the input).
    """
    if not value:
        raise Refused("the record has no value")
    return Notification.model_validate_json(value)


@dataclass(frozen=True, slots=True)
class Address:
    """Where a notification goes, decided from its fields and its record key.

    - ``user``: look up ``user_id``'s devices;
    - ``rekey``: a user notification published without a key; it is
      re-published keyed by ``user_id`` so it reaches the right partition;
    - ``tokens``: the raw tokens it names (``user_id`` may be None);
    - ``audience``: one copy per user id (see :func:`per_user`).

    ``scope`` prefixes the dedup key (the record key, as bytes).
    """

    kind: Literal["user", "rekey", "tokens", "audience"]
    user_id: str | None
    scope: bytes = b""


def address(n: Notification, key: bytes | None) -> Address:
    """Decide where ``n`` goes; raises :class:`Refused` when key and fields clash."""
    key = key or None
    key_text = _key_text(key)
    if n.user_id is not None and key is not None and n.user_id != key_text:
        raise Refused(
            "the record key and user_id differ; key notifications by their user id"
        )
    if n.audience is not None:
        return Address("audience", None)
    if n.tokens is not None:
        return Address("tokens", n.user_id, key or b"")
    if key is None:
        if n.user_id is None:
            raise Refused(
                "no target: key the record by the user id, or give tokens or audience"
            )
        return Address("rekey", n.user_id)
    if key_text is None:
        raise Refused("the record key is not UTF-8 text, so it names no user")
    return Address("user", key_text, key)


def _key_text(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None


# --- expiry -----------------------------------------------------------------


def expiry_ms(n: Notification, published_ms: int, now_ms: int) -> int | None:
    """When ``n`` expires, in ms since the epoch; None when it never does.

    ``expires_at`` is taken as given; ``ttl`` counts from ``published_ms``
    (the record's Kafka timestamp). ``ttl == 0`` ("now or never") expires
    :data:`NOW_OR_NEVER_GRACE_S` after its publication: the providers are
    told not to store it, and this bounds pushstream's own delay.
    """
    if n.expires_at is not None:
        return to_ms(n.expires_at)
    if n.ttl is None:
        return None
    if n.ttl == 0:
        return published_ms + NOW_OR_NEVER_GRACE_S * 1000
    return published_ms + n.ttl * 1000


def is_expired(expires_at_ms: int | None, now_ms: int) -> bool:
    """True when an expiry is set and lies before ``now_ms``."""
    return expires_at_ms is not None and expires_at_ms < now_ms


def published_ms(timestamp_s: float | None, now_ms: int) -> int:
    """A record's Kafka timestamp (seconds, as Faust gives it) in ms.

    A record without a usable timestamp counts as published now.
    """
    if timestamp_s is None or timestamp_s <= 0:
        return now_ms
    return int(timestamp_s * 1000)


# --- audience and re-keying -------------------------------------------------


def per_user(
    n: Notification, users: Iterable[str], expires_at_ms: int | None
) -> list[tuple[bytes, bytes]]:
    """One (key, value) notifications record for each distinct user.

    Each copy names its user in ``user_id`` and is keyed by it, has no
    audience, and carries ``expires_at`` instead of a positive ``ttl`` so that
    the time it waits on ``notifications`` a second time still counts. The
    notification is serialised once; only the user id differs between copies.
    """
    update: dict[str, Any] = {"audience": None, "user_id": None}
    if n.ttl and expires_at_ms is not None:
        update["ttl"] = None
        update["expires_at"] = datetime.fromtimestamp(expires_at_ms / 1000, tz=UTC)
    rest = n.model_copy(update=update).model_dump_json(exclude_none=True)
    body = rest[1:]  # without the opening brace; the model always has an id
    records = []
    for user in dict.fromkeys(users):
        value = '{"user_id":' + json.dumps(user) + "," + body
        records.append((user.encode(), value.encode()))
    return records


# --- targets ----------------------------------------------------------------


def send_id(notification_id: str, device_id: str) -> str:
    """The id of one send: ``<notification id>:<device id>``."""
    return f"{notification_id}:{device_id}"


def device_targets(entry: UserDevices | None) -> list[Target]:
    """The user's live devices: every active one, in table order."""
    if entry is None:
        return []
    return [
        Target(d.platform, d.token, d.app, d.device_id, d.environment)
        for d in entry.devices
        if d.state == "active"
    ]


def token_targets(n: Notification) -> list[Target]:
    """The raw tokens of ``n``, each once; the device id is the token's name."""
    targets: dict[str, Target] = {}
    for raw in n.tokens or ():
        token = normalize_token(raw.platform, raw.token)
        device = device_id_for_token(token)
        targets.setdefault(
            device, Target(raw.platform, token, raw.app, device, raw.environment)
        )
    return list(targets.values())


def allowed(n: Notification, target: Target) -> bool:
    """Whether ``n``'s ``platforms`` and ``apps`` filters let ``target`` through."""
    if n.platforms is not None and target.platform not in n.platforms:
        return False
    return n.apps is None or target.app in n.apps


# --- dedup entries ----------------------------------------------------------


def routed_key(scope: bytes, notification_id: str) -> bytes:
    """The routed table's key: ``<scope>\\0<notification id>``."""
    return scope + b"\0" + notification_id.encode()


@dataclass(frozen=True, slots=True)
class Sent:
    """A routed table entry: which devices got a notification, from which record.

    ``devices`` maps a device id to the offset of the record that sent it;
    ``at_ms`` is when the notification was first routed.
    """

    at_ms: int
    devices: Mapping[str, int]


def encode_sent(sent: Sent) -> bytes:
    """The routed table's value for ``sent`` (compact JSON)."""
    document = {"at": sent.at_ms, "sent": dict(sent.devices)}
    return json.dumps(document, separators=(",", ":")).encode()


def decode_sent(raw: bytes | None, now_ms: int, window_ms: int) -> Sent | None:
    """Read a routed table value; None when absent, unreadable or too old.

    The window is enforced here too, because RocksDB and Kafka remove old
    entries only when they compact or delete segments.
    """
    if raw is None:
        return None
    try:
        document = json.loads(raw)
        sent = Sent(int(document["at"]), dict(document["sent"]))
    except (ValueError, TypeError, KeyError):
        log.warning("ignoring an unreadable routed table entry")
        return None
    if sent.at_ms + window_ms < now_ms:
        return None
    return sent


# --- the routing decision ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Routing:
    """What to publish for one notification, and the dedup entry to keep.

    ``sent`` is None when the entry does not change.
    """

    sends: list[Send]
    deliveries: list[Delivery]
    sent: Sent | None


def route(
    n: Notification,
    targets: Sequence[Target],
    *,
    user_id: str | None,
    previous: Sent | None,
    offset: int,
    renderers: Mapping[Platform, Renderer],
    now_ms: int,
    expires_at_ms: int | None,
) -> Routing:
    """Decide every send and every outcome of ``n`` for its ``targets``.

    ``targets`` are the live targets before filtering; ``previous`` is the
    dedup entry; ``offset`` names the record in hand, so a record handled a
    second time (after a crash) sends again instead of reporting duplicates,
    and those sends are marked ``replay``.
    """
    if not targets:
        return Routing([], [_outcome(n, user_id, now_ms, "dropped", NO_DEVICES)], None)
    wanted = [t for t in targets if allowed(n, t)]
    if not wanted:
        return Routing([], [_outcome(n, user_id, now_ms, "dropped", FILTERED)], None)

    before = previous.devices if previous else {}
    sent = dict(before)
    sends: list[Send] = []
    deliveries: list[Delivery] = []
    for target in wanted:
        sid = send_id(n.id, target.device_id)
        if before.get(target.device_id, offset) != offset:
            deliveries.append(
                _outcome(n, user_id, now_ms, "duplicate", ALREADY_SENT, target, sid)
            )
            continue

        rendered = _render(renderers, n, target, now_ms, expires_at_ms)
        if isinstance(rendered, str):
            deliveries.append(
                _outcome(n, user_id, now_ms, "rejected", rendered, target, sid)
            )
            continue

        sends.append(
            Send(
                send_id=sid,
                notification_id=n.id,
                user_id=user_id,
                device_id=target.device_id,
                platform=target.platform,
                app=target.app,
                environment=target.environment,
                token=target.token,
                accepted_at_ms=now_ms,
                expires_at_ms=expires_at_ms,
                now_or_never=n.ttl == 0,
                priority=n.priority,
                replay=target.device_id in before,
                headers=rendered.headers,
                body=rendered.body,
            )
        )
        sent[target.device_id] = offset

    changed = sent != before
    entry = Sent(previous.at_ms if previous else now_ms, sent) if changed else None
    return Routing(sends, deliveries, entry)


_failed_renders: set[tuple[str, str]] = set()


def _render(
    renderers: Mapping[Platform, Renderer],
    n: Notification,
    target: Target,
    now_ms: int,
    expires_at_ms: int | None,
) -> Rendered | str:
    """Render one send, or say why it cannot be sent (a delivery reason)."""
    try:
        rendered = renderers[target.platform](n, target, now_ms, expires_at_ms)
    except Exception as exc:  # a renderer bug must not stop the stream
        condition = (target.platform, type(exc).__name__)
        if condition not in _failed_renders:
            _failed_renders.add(condition)
            log.exception(
                "the %s renderer failed; such sends are rejected as %s",
                target.platform,
                RENDER_FAILED,
            )
        return RENDER_FAILED
    if rendered.too_large:
        log.debug("send to %s too large: %s", target.device_id, rendered.too_large)
        return PAYLOAD_TOO_LARGE
    if rendered.invalid_header:
        log.debug("send to %s refused: %s", target.device_id, rendered.invalid_header)
        return INVALID_HEADER
    return rendered


def _outcome(
    n: Notification,
    user_id: str | None,
    now_ms: int,
    outcome: Outcome,
    reason: str,
    target: Target | None = None,
    sid: str | None = None,
) -> Delivery:
    """A delivery for something the router did not send."""
    return Delivery(
        notification_id=n.id,
        send_id=sid,
        user_id=user_id,
        device_id=target.device_id if target else None,
        platform=target.platform if target else None,
        app=target.app if target else None,
        outcome=outcome,
        reason=reason,
        attempts=0,
        accepted_at_ms=now_ms,
        completed_at_ms=now_ms,
        latency_ms=0,
    )


def expired(n: Notification, user_id: str | None, now_ms: int) -> Delivery:
    """The one delivery of a notification whose expiry passed before routing."""
    return _outcome(n, user_id, now_ms, "expired", EXPIRED)


# --- the agent --------------------------------------------------------------


def default_renderers(
    platforms: Iterable[Platform] = PLATFORMS,
) -> dict[Platform, Renderer]:
    """Each platform's ``render`` from ``pushstream.senders.<platform>``."""
    renderers: dict[Platform, Renderer] = {}
    for platform in platforms:
        module = importlib.import_module(f"pushstream.senders.{platform}")
        renderers[platform] = module.render
    return renderers


class Router:
    """The router agent's step, over the pipeline's tables and topics."""

    def __init__(
        self,
        pipeline: Pipeline,
        renderers: Mapping[Platform, Renderer],
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._devices = pipeline.devices
        self._routed = pipeline.routed
        self._renderers = renderers
        self._clock = clock or now_ms
        self._window_ms = pipeline.settings.dedup_window_s * 1000
        self._rekey_warned = False

    async def run(self, stream: faust.StreamT[bytes]) -> None:
        """The agent: handle each notification in order (concurrency 1).

        A notification that makes the router fail (a bug) is dead-lettered
        with the error's type, so it cannot stop every notification after it.
        """
        async for event in stream.events():
            try:
                await self.handle(event)
            except Exception as exc:
                log.exception("routing a notification failed")
                reason = f"routing failed: {type(exc).__name__}"
                await self._pipeline.dead_letter_event(event, stage=STAGE, error=reason)

    async def handle(self, event: faust.EventT[bytes]) -> None:
        """Route one notification record; never raises for bad input."""
        message = event.message
        now = self._clock()
        try:
            n = parse(message.value)
            where = address(n, message.key)
        except (ValidationError, Refused) as exc:
            await self._refuse(event, exc)
            return

        expires = expiry_ms(n, published_ms(message.timestamp, now), now)
        if is_expired(expires, now):
            delivery = expired(n, where.user_id, now)
            metrics.delivery(delivery)
            await self._pipeline.publish(DELIVERIES, n.id, delivery)
            return
        if where.kind == "audience":
            await self._republish(n, n.audience or (), expires)
            return
        if where.kind == "rekey":
            self._warn_unkeyed()
            await self._republish(n, (where.user_id or "",), expires)
            return

        if where.kind == "tokens":
            targets = token_targets(n)
        else:
            try:
                targets = device_targets(self._lookup(where.scope))
            except ValidationError as exc:
                await self._refuse(
                    event, exc, "the user's devices entry is unreadable: "
                )
                return
        await self._route(n, where, targets, message.offset, now, expires)

    def _lookup(self, key: bytes) -> UserDevices | None:
        raw = self._devices.get(key)
        if raw is None:
            return None
        return UserDevices.model_validate_json(raw)

    async def _route(
        self,
        n: Notification,
        where: Address,
        targets: list[Target],
        offset: int,
        now: int,
        expires: int | None,
    ) -> None:
        dedup = routed_key(where.scope, n.id)
        previous = decode_sent(self._routed.get(dedup), now, self._window_ms)
        routing = route(
            n,
            targets,
            user_id=where.user_id,
            previous=previous,
            offset=offset,
            renderers=self._renderers,
            now_ms=now,
            expires_at_ms=expires,
        )
        # Publishing only queues each record: the producer batches them and
        # Faust flushes it before committing this record's offset.
        for send in routing.sends:
            if send.replay:
                metrics.replayed_send(send.platform)
            await self._pipeline.publish(SENDS[send.platform], send.send_id, send)
        for delivery in routing.deliveries:
            metrics.delivery(delivery)
            await self._pipeline.publish(DELIVERIES, n.id, delivery)
        if routing.sent is not None:
            await self._routed.put(dedup, encode_sent(routing.sent))
        log.debug(
            "notification %s: %d sends, %d other outcomes",
            n.id,
            len(routing.sends),
            len(routing.deliveries),
        )

    async def _republish(
        self, n: Notification, users: Iterable[str], expires: int | None
    ) -> None:
        records = per_user(n, users, expires)
        for key, value in records:
            await self._pipeline.send(NOTIFICATIONS, key, value)
        log.debug("notification %s: re-published for %d users", n.id, len(records))

    def _warn_unkeyed(self) -> None:
        if not self._rekey_warned:
            self._rekey_warned = True
            log.warning(
                "notifications arrive without a record key; each is re-published "
                "keyed by its user_id (publish them keyed by user id to save this)"
            )

    async def _refuse(
        self, event: faust.EventT[bytes], exc: Exception, context: str = ""
    ) -> None:
        reason = context + (
            str(exc) if isinstance(exc, Refused) else describe_error(exc)
        )
        log.debug("refused a notification: %s", reason)
        await self._pipeline.dead_letter_event(event, stage=STAGE, error=reason)


def attach(
    pipeline: Pipeline, renderers: Mapping[Platform, Renderer] | None = None
) -> Router:
    """Add the router agent (on notifications, concurrency 1) to the pipeline."""
    router = Router(
        pipeline, renderers if renderers is not None else default_renderers()
    )

    async def route_notifications(stream: faust.StreamT[bytes]) -> None:
        await router.run(stream)

    pipeline.app.agent(pipeline.topics[NOTIFICATIONS], name="router", concurrency=1)(
        route_notifications
    )
    return router
