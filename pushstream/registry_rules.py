"""The device registry's rules: pure functions over one user's devices.

Each rule takes the state held for one user
(:class:`~pushstream.events.UserDevices`) and one event, and returns a
:class:`Change`: the new state, the token events to publish on token-events
(keyed by user id) and the token claims and releases to publish on
token-owners (keyed by token fingerprint). No I/O: the agents in
:mod:`pushstream.registry` decode, look up, apply and publish.

What the rules guarantee:

- A register with an unchanged token only refreshes the device's last-seen
  time (and its app, environment, locale, time zone and version); a new token
  for a known device replaces the old one and publishes ``replaced`` for the
  old token. Without a device id, the token is the device
  (:func:`~pushstream.events.device_id_for_token`). A token is held by one
  device of a user: registering it for another device moves it there.
- An unregister removes the device and remembers when, so that an older
  register arriving late does not bring it back. A device id wins over a
  token when an unregister names both.
- Events are applied in event-time order per device: an event older than the
  last registration applied to the device (``updated_at_ms``) changes nothing.
  A provider's report of an invalid token does not move ``updated_at_ms``, so
  it never blocks the late registration of a newer token.
- A user has at most ``max_devices_per_user`` devices. A register that goes
  past the limit retires one device, invalid devices first, then the least
  recently seen, and publishes ``retired`` for it so upstream can tell.
- A token belongs to one user. Every applied register publishes a
  :class:`~pushstream.events.TokenClaim`; the owner agent keeps the latest
  claim per token (:func:`settle_claim`) and publishes ``released`` to the
  user who loses it; that user's registry then drops the token unless it
  registered it again after the winning claim.
- Whenever a device stops holding a token (unregistered, replaced by a new
  token, retired by the sweep or the device limit, invalidated by its
  provider, released to another user), the rule publishes a
  :class:`~pushstream.events.TokenRelease` naming the user and device; the
  owner agent drops the token's entry only while it still names them
  (:func:`settle_release`), so the owners table forgets tokens nobody holds.
  A token the same change claims again is not released.
- ``invalidated`` (from a sender) marks exactly that token invalid, never a
  newer token of the same device, and not when the token was registered
  again after the provider's time (or, without one, after the sender's
  report); it publishes ``reregister_requested`` once. A register of the same
  token after the invalidation makes the device active again.
- The sweep retires devices not seen for ``token_max_age_days``, publishes
  ``retired`` and, for a device that was still active, ``reregister_requested``,
  and forgets removals older than that age. A sweep instruction never reaches
  further: its cut-off is bounded by the worker's clock minus that age.
- A WNS channel must pass the allow-list (:mod:`pushstream.senders.allowlist`)
  to be registered at all; a refused event raises :class:`Refused`, which the
  agent turns into a dead letter.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from pushstream.config import Settings
from pushstream.events import (
    APNS_TOKEN_RE,
    REGISTRATIONS_RECORD,
    Device,
    Register,
    ReleaseReason,
    Sweep,
    TokenClaim,
    TokenEvent,
    TokenEventType,
    TokenRelease,
    Unregister,
    UserDevices,
    device_id_for_token,
    normalize_token,
    to_ms,
    token_fingerprint,
)
from pushstream.senders.allowlist import channel_problem

DAY_MS = 24 * 3600 * 1000
# A clock this far ahead on the producer's side would pin a device's state
# in the future and make every later event look stale, so it is refused.
MAX_CLOCK_SKEW_MS = DAY_MS
# Removal markers kept per user beyond the sweep's age limit.
MAX_REMOVED_MARKERS = 100


class Refused(ValueError):
    """An event the registry will not apply; it goes to dead-letters."""


class Owner(BaseModel):
    """The value of the owners table: who registered a token last."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    user_id: str
    device_id: str
    event_time_ms: int


REGISTRY_INPUT = REGISTRATIONS_RECORD


@dataclass(frozen=True, slots=True)
class Rules:
    """The limits the rules apply, from the settings."""

    max_devices: int = 20
    max_age_days: int = 270
    wns_allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> Rules:
        return cls(
            max_devices=settings.max_devices_per_user,
            max_age_days=settings.token_max_age_days,
            wns_allowed_hosts=settings.wns_allowed_hosts,
        )

    @property
    def max_age_ms(self) -> int:
        return self.max_age_days * DAY_MS


@dataclass(frozen=True, slots=True)
class Change:
    """The outcome of one rule: the new state and what to publish."""

    state: UserDevices
    token_events: tuple[TokenEvent, ...] = ()
    claims: tuple[TokenClaim, ...] = ()
    releases: tuple[TokenRelease, ...] = ()


# --- the rules (pure) ------------------------------------------------------------


def register(state: UserDevices, event: Register, rules: Rules, now: int) -> Change:
    """Apply a device's registration; raises Refused for a channel or time refused."""
    at = to_ms(event.event_time)
    _check_clock(at, now)
    token = normalize_token(event.platform, event.token)
    if event.platform == "wns":
        problem = channel_problem(token, rules.wns_allowed_hosts)
        if problem:
            raise Refused(f"WNS channel refused: {problem}")
    device_id = event.device_id or device_id_for_token(token)

    if at <= state.removed.get(device_id, -1):
        return Change(state)  # removed after this registration was made
    current = _by_id(state, device_id)
    if current is not None and at < current.updated_at_ms:
        return Change(state)  # an older registration arriving late
    holder = next(
        (d for d in state.devices if d.token == token and d.device_id != device_id),
        None,
    )
    if holder is not None and holder.last_seen_ms > at:
        return Change(state)  # another device of this user has it more recently

    removed = dict(state.removed)
    removed.pop(device_id, None)
    if holder is not None:
        _mark(removed, holder.device_id, at)
    token_events = []
    releases = []
    if current is None:
        device = _new_device(event, device_id, token, at)
    elif current.token == token and current.platform == event.platform:
        device = _refreshed(current, event, at)
    else:
        device = _new_device(event, device_id, token, at)
        token_events.append(
            _token_event(
                "replaced", event.user_id, current, "replaced by a new token", at
            )
        )
        releases.append(_release(event.user_id, current, "replaced", at))

    devices = [d for d in state.devices if d.device_id not in (device_id, _id(holder))]
    devices.append(device)
    devices, retired = _cap(devices, rules.max_devices)
    reason = f"device limit of {rules.max_devices} per user reached"
    for gone in retired:
        _mark(removed, gone.device_id, at)
        token_events.append(_token_event("retired", event.user_id, gone, reason, at))
        releases.append(_release(event.user_id, gone, "retired", at))

    claim = TokenClaim(
        token_fp=token_fingerprint(token),
        token=token,
        platform=event.platform,
        app=event.app,
        user_id=event.user_id,
        device_id=device_id,
        event_time_ms=at,
    )
    claims = () if device in retired else (claim,)
    kept = tuple(r for r in releases if not any(c.token == r.token for c in claims))
    return Change(_state(devices, removed), tuple(token_events), claims, kept)


def unregister(state: UserDevices, event: Unregister, now: int) -> Change:
    """Remove the device an unregister names (by device id, else by token)."""
    at = to_ms(event.event_time)
    _check_clock(at, now)
    if event.device_id is not None:
        device_id = event.device_id
        target = _by_id(state, device_id)
    else:
        assert event.token is not None  # the model requires one of the two
        target = _by_raw_token(state, event.token)
        device_id = target.device_id if target else _token_device_id(event.token)

    if target is not None and at < target.updated_at_ms:
        return Change(state)  # registered again after this unregister was made
    if target is None and at <= state.removed.get(device_id, -1):
        return Change(state)
    removed = dict(state.removed)
    _mark(removed, device_id, at)
    devices = [d for d in state.devices if d.device_id != device_id]
    releases = (
        () if target is None else (_release(event.user_id, target, "unregistered", at),)
    )
    return Change(_state(devices, removed), releases=releases)


def invalidate(state: UserDevices, event: TokenEvent) -> Change:
    """Mark the token a provider refused as invalid and ask for a new one."""
    token = normalize_token(event.platform, event.token)
    device = _by_token(state, event.platform, token)
    if device is None or device.state == "invalid":
        return Change(state)  # not (or no longer) this user's token, or done
    as_of = (
        event.provider_time_ms
        if event.provider_time_ms is not None
        else event.event_time_ms
    )
    if as_of < device.last_seen_ms:
        return Change(state)  # registered again after the provider's verdict
    marked = device.model_copy(
        update={
            "state": "invalid",
            "invalid_reason": event.reason,
            "invalidated_at_ms": as_of,
        }
    )
    request = TokenEvent(
        type="reregister_requested",
        user_id=event.user_id,
        device_id=device.device_id,
        platform=device.platform,
        app=device.app,
        token=device.token,
        reason=event.reason,
        provider_time_ms=event.provider_time_ms,
        event_time_ms=event.event_time_ms,
        notification_id=event.notification_id,
    )
    assert event.user_id is not None  # the agent fills it in from the record key
    let_go = _release(event.user_id, device, "invalidated", as_of)
    return Change(_replace(state, marked), (request,), releases=(let_go,))


def release(state: UserDevices, event: TokenEvent) -> Change:
    """Drop a token another user claimed, unless this user registered it since."""
    token = normalize_token(event.platform, event.token)
    device = _by_token(state, event.platform, token)
    if device is None or device.last_seen_ms > event.event_time_ms:
        return Change(state)
    removed = dict(state.removed)
    _mark(removed, device.device_id, event.event_time_ms)
    devices = [d for d in state.devices if d.device_id != device.device_id]
    assert event.user_id is not None  # the agent fills it in from the record key
    let_go = _release(event.user_id, device, "released", event.event_time_ms)
    return Change(_state(devices, removed), releases=(let_go,))


def needs_sweep(state: UserDevices, cutoff_ms: int) -> bool:
    """Whether :func:`sweep` would change anything for this user."""
    return any(d.last_seen_ms < cutoff_ms for d in state.devices) or any(
        at < cutoff_ms for at in state.removed.values()
    )


def sweep(state: UserDevices, event: Sweep, rules: Rules, now: int) -> Change:
    """Retire devices last seen before the cut-off; forget older removals.

    The cut-off is the instruction's, but never later than ``now`` minus the
    maximum age: whoever can write to registrations can publish a sweep, and
    a forged one must not retire a device the periodic sweep would keep.
    """
    cutoff = min(event.cutoff_ms, now - rules.max_age_ms)
    stale = [d for d in state.devices if d.last_seen_ms < cutoff]
    devices = [d for d in state.devices if d.last_seen_ms >= cutoff]
    removed = {k: at for k, at in state.removed.items() if at >= cutoff}
    reason = f"not seen for {rules.max_age_days} days"
    token_events = []
    releases = []
    for gone in stale:
        _mark(removed, gone.device_id, cutoff)
        releases.append(_release(event.user_id, gone, "retired", cutoff))
        token_events.append(
            _token_event("retired", event.user_id, gone, reason, event.at_ms)
        )
        if gone.state == "active":
            token_events.append(
                _token_event(
                    "reregister_requested", event.user_id, gone, reason, event.at_ms
                )
            )
    return Change(_state(devices, removed), tuple(token_events), (), tuple(releases))


def settle_claim(
    owner: Owner | None, claim: TokenClaim
) -> tuple[Owner | None, TokenEvent | None]:
    """Decide who owns a token after a claim, and whom to tell it is gone.

    Returns the new owner (None: unchanged) and the ``released`` event for the
    user who lost the token, if a different user held it. The latest claim by
    event time wins; a late claim that loses is released at once.
    """
    claimant = Owner(
        user_id=claim.user_id,
        device_id=claim.device_id,
        event_time_ms=claim.event_time_ms,
    )
    if owner is None:
        return claimant, None
    newer = claim.event_time_ms >= owner.event_time_ms
    if owner.user_id == claim.user_id:
        return (claimant if newer and claimant != owner else None), None
    loser = owner if newer else claimant
    winner_time = claim.event_time_ms if newer else owner.event_time_ms
    released = TokenEvent(
        type="released",
        user_id=loser.user_id,
        device_id=loser.device_id,
        platform=claim.platform,
        app=claim.app,
        token=claim.token,
        reason="registered by another user",
        event_time_ms=winner_time,
    )
    return (claimant if newer else None), released


def settle_release(owner: Owner | None, release: TokenRelease) -> bool:
    """Whether a release removes the token's owners entry.

    Only while the entry still names the releasing user and device: a release
    published from one user's partition may reach the owner agent after
    another user's claim (or a claim by another device of the same user),
    which it must not undo. A release older than the stored claim is left
    alone too; the registry never publishes one, since a device lets go no
    earlier than its last registration.
    """
    return (
        owner is not None
        and owner.user_id == release.user_id
        and owner.device_id == release.device_id
        and release.released_at_ms >= owner.event_time_ms
    )


def is_empty(state: UserDevices) -> bool:
    """Nothing left to keep for this user: the table entry can go."""
    return not state.devices and not state.removed


# --- helpers of the rules ----------------------------------------------------------


def _check_clock(at: int, now: int) -> None:
    if at > now + MAX_CLOCK_SKEW_MS:
        raise Refused("event_time is more than a day in the future")


def _id(device: Device | None) -> str | None:
    return device.device_id if device else None


def _by_id(state: UserDevices, device_id: str) -> Device | None:
    return next((d for d in state.devices if d.device_id == device_id), None)


def _by_token(state: UserDevices, platform: str, token: str) -> Device | None:
    return next(
        (d for d in state.devices if d.token == token and d.platform == platform),
        None,
    )


def _by_raw_token(state: UserDevices, token: str) -> Device | None:
    """The device holding a token given without its platform (an unregister)."""
    return next(
        (d for d in state.devices if d.token == normalize_token(d.platform, token)),
        None,
    )


def _token_device_id(token: str) -> str:
    """The device id a token-only registration of ``token`` would have had."""
    return device_id_for_token(token.lower() if APNS_TOKEN_RE.match(token) else token)


def _new_device(event: Register, device_id: str, token: str, at: int) -> Device:
    return Device(
        device_id=device_id,
        platform=event.platform,
        token=token,
        app=event.app,
        environment=event.environment,
        registered_at_ms=at,
        last_seen_ms=at,
        updated_at_ms=at,
        locale=event.locale,
        timezone=event.timezone,
        app_version=event.app_version,
    )


def _refreshed(device: Device, event: Register, at: int) -> Device:
    """The same token seen again: a newer description of the device."""
    update: dict[str, Any] = {
        "app": event.app,
        "environment": event.environment,
        "locale": event.locale,
        "timezone": event.timezone,
        "app_version": event.app_version,
        "last_seen_ms": max(device.last_seen_ms, at),
        "updated_at_ms": max(device.updated_at_ms, at),
    }
    invalidated_at = device.invalidated_at_ms
    if device.state == "invalid" and invalidated_at is not None and at > invalidated_at:
        # Registered again after the provider's verdict: the app has it anew.
        update.update(state="active", invalid_reason=None, invalidated_at_ms=None)
    return device.model_copy(update=update)


def _cap(devices: list[Device], limit: int) -> tuple[list[Device], list[Device]]:
    """Keep at most ``limit`` devices: invalid ones go first, then the least seen."""
    if len(devices) <= limit:
        return devices, []
    order = sorted(
        devices, key=lambda d: (d.state == "active", d.last_seen_ms, d.device_id)
    )
    excess = len(devices) - limit
    gone = order[:excess]
    return [d for d in devices if d not in gone], gone


def _mark(removed: dict[str, int], device_id: str, at: int) -> None:
    removed[device_id] = max(removed.get(device_id, at), at)


def _replace(state: UserDevices, device: Device) -> UserDevices:
    devices = [device if d.device_id == device.device_id else d for d in state.devices]
    return _state(devices, state.removed)


def _state(devices: Iterable[Device], removed: dict[str, int]) -> UserDevices:
    """A state with devices in a stable order and the newest removal markers."""
    if len(removed) > MAX_REMOVED_MARKERS:
        newest = sorted(removed.items(), key=lambda kv: kv[1])[-MAX_REMOVED_MARKERS:]
        removed = dict(newest)
    return UserDevices(
        devices=sorted(devices, key=lambda d: d.device_id), removed=dict(removed)
    )


def _token_event(
    kind: TokenEventType, user_id: str, device: Device, reason: str, at: int
) -> TokenEvent:
    return TokenEvent(
        type=kind,
        user_id=user_id,
        device_id=device.device_id,
        platform=device.platform,
        app=device.app,
        token=device.token,
        reason=reason,
        event_time_ms=at,
    )


def _release(
    user_id: str, device: Device, reason: ReleaseReason, at: int
) -> TokenRelease:
    """The release of a device's token, as of ``at`` or its last registration."""
    return TokenRelease(
        type="release",
        token_fp=token_fingerprint(device.token),
        token=device.token,
        user_id=user_id,
        device_id=device.device_id,
        reason=reason,
        released_at_ms=max(at, device.last_seen_ms),
    )


def decode_state(raw: bytes | None) -> UserDevices:
    """The devices table value of one user (empty when there is none)."""
    if raw is None:
        return UserDevices()
    return UserDevices.model_validate_json(raw)


def encode_state(state: UserDevices) -> bytes:
    return state.model_dump_json(exclude_none=True).encode()
