"""The registry and owner agents, and the sweep of stale devices.

The registry agent is the only writer of the devices table (key: user id,
value: :class:`~pushstream.events.UserDevices` JSON). It reads two
co-partitioned topics keyed by user id, registrations and token-events, so a
user's registrations and token reports meet the user's table entry on the
same partition. The owner agent keeps the owners table (key: token
fingerprint, value: :class:`~pushstream.registry_rules.Owner` JSON) from
token-owners: a claim makes its user the owner, and a release removes the
entry while it still names the releasing user and device, so the table (and
its compacted changelog, through a tombstone) keeps only tokens someone
holds. Both run with concurrency 1 and plain iteration: table writes are
allowed only while an event is handled, and inside ``take()`` they are not
(faust #497). The rules they apply are in :mod:`pushstream.registry_rules`;
an event that fails to decode or that the rules refuse goes to dead-letters,
and the agent goes on.

A table write goes to the RocksDB and changelog partition of the event being
handled, so the periodic sweep cannot write from its timer. It scans this
worker's partitions and publishes a ``sweep`` instruction keyed by each user
who has something to retire to the registrations topic; the registry agent
applies it on the user's partition like any other event. The instruction is
internal: upstream never needs to send one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import faust
from pydantic import ValidationError

from pushstream.app import (
    REGISTRATIONS,
    TOKEN_EVENTS,
    TOKEN_OWNERS,
    Pipeline,
    now_ms,
    raw_schema,
)
from pushstream.events import (
    TOKEN_OWNERS_RECORD,
    Register,
    Sweep,
    TokenClaim,
    TokenEvent,
    Unregister,
    UserDevices,
    describe_error,
    token_fingerprint,
)
from pushstream.registry_rules import (
    REGISTRY_INPUT,
    Change,
    Owner,
    Refused,
    Rules,
    decode_state,
    encode_state,
    invalidate,
    is_empty,
    needs_sweep,
    register,
    release,
    settle_claim,
    settle_release,
    sweep,
    unregister,
)

log = logging.getLogger(__name__)

OWNERS_TABLE = "owners"
STAGE = "registry"
# The sweep yields to the event loop after this many users.
SWEEP_CHUNK = 500

Event = faust.EventT[bytes]


class Registry:
    """The work of the registry and owner agents, one event at a time."""

    def __init__(self, pipeline: Pipeline, clock: Callable[[], int] = now_ms) -> None:
        self.pipeline = pipeline
        self.rules = Rules.from_settings(pipeline.settings)
        self.clock = clock
        self.devices = pipeline.devices
        self.owners = pipeline.table(OWNERS_TABLE)
        self._registrations = pipeline.settings.topic(REGISTRATIONS)
        self._warned = False

    async def handle(self, event: Event) -> None:
        """One event from registrations or token-events; bad ones are dead-lettered."""
        await self._guarded(event, self._apply)

    async def handle_owners(self, event: Event) -> None:
        """One claim or release from token-owners; bad ones are dead-lettered."""
        await self._guarded(event, self._settle)

    async def _guarded(
        self, event: Event, handler: Callable[[Event], Awaitable[None]]
    ) -> None:
        try:
            await handler(event)
        except (ValidationError, Refused) as exc:
            await self._dead_letter(event, describe_error(exc))
        except Exception as exc:
            message = event.message
            log.exception(
                "registry: error handling %s[%d]@%d",
                message.topic,
                message.partition,
                message.offset,
            )
            await self._dead_letter(event, f"internal error: {type(exc).__name__}")

    async def _dead_letter(self, event: Event, error: str) -> None:
        message = event.message
        log.log(
            logging.DEBUG if self._warned else logging.WARNING,
            "registry: refused %s[%d]@%d: %s%s",
            message.topic,
            message.partition,
            message.offset,
            error,
            "" if self._warned else " (further refusals are logged at DEBUG)",
        )
        self._warned = True
        await self.pipeline.dead_letter_event(event, stage=STAGE, error=error)

    async def _apply(self, event: Event) -> None:
        key = event.message.key
        if event.message.topic == self._registrations:
            parsed = REGISTRY_INPUT.validate_json(event.value)
            user_id = _checked_user(key, parsed.user_id)
            state = self._load(user_id)
            change = self._rule(state, parsed)
        else:
            report = TokenEvent.model_validate_json(event.value)
            if report.type not in ("invalidated", "released"):
                return  # the registry's own output, for upstream
            if key is None and report.user_id is None:
                return  # a raw token sent to without a user: no entry holds it
            user_id = _checked_user(key, report.user_id or _text_key(key))
            report = report.model_copy(update={"user_id": user_id})
            state = self._load(user_id)
            if report.type == "invalidated":
                change = invalidate(state, report)
            else:
                change = release(state, report)
        await self._commit(user_id, state, change)

    def _load(self, user_id: str) -> UserDevices:
        return decode_state(self.devices.get(user_id.encode()))

    def _rule(self, state: UserDevices, event: Register | Unregister | Sweep) -> Change:
        if isinstance(event, Register):
            return register(state, event, self.rules, self.clock())
        if isinstance(event, Unregister):
            return unregister(state, event, self.clock())
        return sweep(state, event, self.rules, self.clock())

    async def _commit(self, user_id: str, old: UserDevices, change: Change) -> None:
        """Publish what happened, then store the new state, then claim tokens.

        Token events and releases are in Kafka before the table says they
        happened: after a crash the event is handled again from the stored
        state, which would not repeat them. The state is stored even when
        unchanged, so that a state that reached RocksDB but not its changelog
        before a crash reaches the changelog when the event is handled again.
        Claims need no wait: handling a register again claims its token again.
        """
        key = user_id.encode()
        sent = []
        for token_event in change.token_events:
            log.debug(
                "registry: %s for user %s device %s",
                token_event.type,
                user_id,
                token_event.device_id,
            )
            sent.append(await self.pipeline.publish(TOKEN_EVENTS, key, token_event))
        for let_go in change.releases:
            sent.append(
                await self.pipeline.publish(TOKEN_OWNERS, let_go.token_fp, let_go)
            )
        await asyncio.gather(*sent)
        if not is_empty(change.state):
            self.devices[key] = encode_state(change.state)
        elif not is_empty(old):
            del self.devices[key]
        for claim in change.claims:
            await self.pipeline.publish(TOKEN_OWNERS, claim.token_fp, claim)

    async def _settle(self, event: Event) -> None:
        record = TOKEN_OWNERS_RECORD.validate_json(event.value)
        key = event.message.key
        if key is None or _text_key(key) != record.token_fp:
            raise Refused(f"a token {record.type} is keyed by its token fingerprint")
        if token_fingerprint(record.token) != record.token_fp:
            raise Refused("token_fp is not the fingerprint of the token")
        raw = self.owners.get(key)
        owner = Owner.model_validate_json(raw) if raw is not None else None
        if isinstance(record, TokenClaim):
            await self._claim(key, owner, record)
        elif owner is None:
            # Deleted again, as _commit stores an unchanged state: a deletion
            # that reached RocksDB but not the changelog before a crash
            # reaches the changelog when the release is handled again.
            del self.owners[key]
        elif settle_release(owner, record):
            log.debug(
                "registry: token %s… let go (%s) by user %s device %s",
                record.token_fp[:8],
                record.reason,
                record.user_id,
                record.device_id,
            )
            del self.owners[key]

    async def _claim(self, key: bytes, owner: Owner | None, claim: TokenClaim) -> None:
        new_owner, released = settle_claim(owner, claim)
        if released is not None and released.user_id is not None:
            # In Kafka before the new owner is stored (see _commit).
            sent = await self.pipeline.publish(TOKEN_EVENTS, released.user_id, released)
            await sent
        current = new_owner or owner
        if current is not None:
            self.owners[key] = current.model_dump_json().encode()

    async def sweep(self) -> int:
        """Ask for the retirement of stale devices in this worker's partitions.

        Publishes one ``sweep`` instruction per user who has something to
        retire, and returns how many. Does nothing while partitions move.
        """
        if not self._settled():
            return 0
        now = self.clock()
        cutoff = now - self.rules.max_age_ms
        checked = requested = 0
        for key, raw in self.devices.items():
            checked += 1
            if checked % SWEEP_CHUNK == 0:
                await asyncio.sleep(0)
                if not self._settled():
                    break
            user_id = _text_key(key)
            try:
                stale = user_id is not None and needs_sweep(decode_state(raw), cutoff)
            except ValidationError:
                continue  # not a state this registry wrote; left alone
            if stale and user_id is not None:
                instruction = Sweep(
                    type="sweep", user_id=user_id, cutoff_ms=cutoff, at_ms=now
                )
                await self.pipeline.publish(REGISTRATIONS, key, instruction)
                requested += 1
        log.info(
            "registry: sweep checked %d users, %d have devices to retire",
            checked,
            requested,
        )
        return requested

    def _settled(self) -> bool:
        """Partitions assigned and tables recovered: the local table is whole."""
        app = self.pipeline.app
        recovery: Any = getattr(app.tables, "recovery", None)
        return bool(
            not app.rebalancing and recovery is not None and recovery.completed.is_set()
        )


def _text_key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _checked_user(key: bytes | None, user_id: str | None) -> str:
    """The user id of an event, which must be its record key (co-partitioning)."""
    if key is None:
        raise Refused("the record key is missing; it must be the user id")
    if user_id is None or _text_key(key) != user_id:
        raise Refused("the record key is not the event's user_id")
    return user_id


def attach(pipeline: Pipeline) -> Registry:
    """Add the registry and owner agents and the sweep timer to the pipeline."""
    app = pipeline.app
    settings = pipeline.settings
    registry = Registry(pipeline)
    inputs = app.topic(
        settings.topic(REGISTRATIONS), settings.topic(TOKEN_EVENTS), schema=raw_schema()
    )

    async def registry_agent(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await registry.handle(event)

    async def owner_agent(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            await registry.handle_owners(event)

    app.agent(inputs, name="pushstream.registry", concurrency=1)(registry_agent)
    app.agent(pipeline.topics[TOKEN_OWNERS], name="pushstream.owners", concurrency=1)(
        owner_agent
    )
    app.timer(settings.sweep_interval_s, name="pushstream.registry.sweep")(
        registry.sweep
    )
    return registry
