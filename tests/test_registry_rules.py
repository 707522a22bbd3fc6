"""The registry's rules as pure functions: every rule, its edge cases, and
properties over random event orders."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pushstream.events import (
    TOKEN_OWNERS_RECORD,
    Platform,
    Register,
    Sweep,
    TokenClaim,
    TokenEvent,
    TokenRelease,
    Unregister,
    UserDevices,
    device_id_for_token,
    token_fingerprint,
)
from pushstream.registry_rules import (
    DAY_MS,
    MAX_REMOVED_MARKERS,
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

RULES = Rules(max_devices=3, max_age_days=30)
NOW = 1_800_000_000_000  # ms; every event time below is before it
EMPTY = UserDevices()


def apns(n: int) -> str:
    return f"{n:064x}"


def fcm(n: int) -> str:
    return f"fcm-{n:06d}:APA91b" + "x" * 30


def iso(t: int) -> str:
    return datetime.fromtimestamp(t / 1000, UTC).isoformat()


def reg(
    t: int, token: str, device: str | None = "phone", user: str = "alice", **extra: Any
) -> Register:
    platform: Platform = "apns" if len(token) == 64 else "fcm"
    if token.startswith("https://"):
        platform = "wns"
    return Register(
        type="register",
        user_id=user,
        device_id=device,
        platform=platform,
        token=token,
        app=extra.pop("app", "com.example.app"),
        event_time=iso(t),  # type: ignore[arg-type]  # pydantic parses it
        **extra,
    )


def unreg(t: int, **names: Any) -> Unregister:
    return Unregister(
        type="unregister",
        user_id="alice",
        event_time=iso(t),  # type: ignore[arg-type]  # pydantic parses it
        **names,
    )


def report(
    kind: str, t: int, token: str, provider: int | None = None, user: str = "alice"
) -> TokenEvent:
    return TokenEvent(
        type=kind,  # type: ignore[arg-type]  # one of the literals
        user_id=user,
        platform="apns" if len(token) == 64 else "fcm",
        app="com.example.app",
        token=token,
        reason="Unregistered",
        provider_time_ms=provider,
        event_time_ms=t,
    )


def apply(state: UserDevices, *events: Register | Unregister) -> Change:
    change = Change(state)
    for event in events:
        if isinstance(event, Register):
            change = register(change.state, event, RULES, NOW)
        else:
            change = unregister(change.state, event, NOW)
    return change


def tokens(state: UserDevices) -> dict[str, str]:
    return {d.device_id: d.token for d in state.devices}


def types(change: Change) -> list[str]:
    return [e.type for e in change.token_events]


# --- register -----------------------------------------------------------------


def test_new_device_is_added_and_claims_its_token() -> None:
    """A registered device would get no pushes, or keep a token another user took."""
    change = register(EMPTY, reg(1000, apns(1), locale="fr_FR"), RULES, NOW)

    [device] = change.state.devices
    assert (device.device_id, device.token, device.state) == (
        "phone",
        apns(1),
        "active",
    )
    assert (
        device.registered_at_ms == device.last_seen_ms == device.updated_at_ms == 1000
    )
    assert device.locale == "fr_FR"
    assert change.token_events == ()
    [claim] = change.claims
    assert claim.token_fp == token_fingerprint(apns(1))
    assert (claim.user_id, claim.device_id, claim.event_time_ms) == (
        "alice",
        "phone",
        1000,
    )


def test_unchanged_token_only_refreshes_last_seen() -> None:
    """Every app start would look like a token change to upstream."""
    first = register(EMPTY, reg(1000, apns(1), locale="fr_FR"), RULES, NOW)
    again = register(first.state, reg(5000, apns(1), locale="de_DE"), RULES, NOW)

    [device] = again.state.devices
    assert device.registered_at_ms == 1000
    assert device.last_seen_ms == device.updated_at_ms == 5000
    assert device.locale == "de_DE"
    assert again.token_events == ()
    assert len(again.claims) == 1  # the token's owner learns it was seen again


def test_new_token_replaces_the_old_one_and_says_so() -> None:
    """Pushes would go to a dead token, and upstream would not hear of the change."""
    first = register(EMPTY, reg(1000, apns(1)), RULES, NOW)
    change = register(first.state, reg(2000, apns(2)), RULES, NOW)

    assert tokens(change.state) == {"phone": apns(2)}
    assert change.state.devices[0].registered_at_ms == 2000
    [replaced] = change.token_events
    assert (replaced.type, replaced.token, replaced.device_id) == (
        "replaced",
        apns(1),
        "phone",
    )
    assert replaced.user_id == "alice"
    assert [c.token for c in change.claims] == [apns(2)]


def test_without_device_id_the_token_is_the_device() -> None:
    """Token-only apps would pile up or lose devices on every registration."""
    change = apply(EMPTY, reg(1000, apns(1), device=None), reg(2000, apns(1), None))

    [device] = change.state.devices
    assert device.device_id == device_id_for_token(apns(1))
    assert device.last_seen_ms == 2000


def test_apns_token_case_does_not_matter() -> None:
    """The same iPhone would appear twice when a client upper-cases its token."""
    change = apply(EMPTY, reg(1000, apns(0xABC)), reg(2000, apns(0xABC).upper()))

    assert tokens(change.state) == {"phone": apns(0xABC)}
    assert change.token_events == ()


def test_older_register_arriving_late_changes_nothing() -> None:
    """A delayed event would put back a token the device no longer has."""
    newer = apply(EMPTY, reg(2000, apns(2)))
    late = register(newer.state, reg(1000, apns(1)), RULES, NOW)

    assert late.state == newer.state
    assert late.token_events == ()
    assert late.claims == ()


def test_token_moves_to_the_device_that_registered_it_last() -> None:
    """A reinstalled app would get every push twice under two device ids."""
    change = apply(EMPTY, reg(1000, apns(1), "old"), reg(2000, apns(1), "new"))

    assert tokens(change.state) == {"new": apns(1)}
    assert change.state.removed == {"old": 2000}

    stale = register(change.state, reg(1500, apns(1), "other"), RULES, NOW)
    assert tokens(stale.state) == {"new": apns(1)}


def test_refreshes_app_and_environment() -> None:
    """A device moved to the sandbox environment would get production pushes."""
    change = apply(
        EMPTY,
        reg(1000, apns(1)),
        reg(2000, apns(1), environment="development", app="com.example.beta"),
    )
    [device] = change.state.devices
    assert (device.environment, device.app) == ("development", "com.example.beta")


def test_event_far_in_the_future_is_refused() -> None:
    """One bad client clock would block every later registration of the device."""
    with pytest.raises(Refused, match="future"):
        register(EMPTY, reg(NOW + 2 * DAY_MS, apns(1)), RULES, NOW)
    assert register(EMPTY, reg(NOW + 60_000, apns(1)), RULES, NOW).state.devices


# --- WNS channels ---------------------------------------------------------------


def test_wns_channel_on_a_microsoft_host_is_registered() -> None:
    """Windows devices could not register."""
    channel = "https://db3.notify.windows.com/?token=AwYAAAB"
    change = register(EMPTY, reg(1000, channel), RULES, NOW)
    assert tokens(change.state) == {"phone": channel}


@pytest.mark.parametrize(
    "channel",
    [
        "https://evil.example/?token=AwYAAAB",
        "https://db3.notify.windows.com.evil.example/?token=x",
        "https://user@db3.notify.windows.com/?token=x",
        "https://db3.notify.windows.com:8443/?token=x",
        "https://a..notify.windows.com/?token=x",
        "https://" + "a" * 64 + ".notify.windows.com/?token=x",
    ],
)
def test_wns_channel_elsewhere_is_refused(channel: str) -> None:
    """The WNS sender would post the app's bearer token to a stranger's host."""
    with pytest.raises(Refused, match="WNS channel refused") as caught:
        register(EMPTY, reg(1000, channel), RULES, NOW)
    assert "token=" not in str(caught.value)


def test_wns_channel_on_an_allowed_host_is_registered() -> None:
    """The sandbox's WNS stand-in could not be used in the demo."""
    rules = Rules(wns_allowed_hosts=("127.0.0.1:8443",))
    channel = "https://127.0.0.1:8443/ch?token=x"
    assert register(EMPTY, reg(1000, channel), rules, NOW).state.devices


# --- unregister -----------------------------------------------------------------


def test_unregister_by_device_id_removes_and_remembers() -> None:
    """A logged-out device would keep getting the user's pushes."""
    change = apply(EMPTY, reg(1000, apns(1)), unreg(2000, device_id="phone"))

    assert change.state.devices == []
    assert change.state.removed == {"phone": 2000}
    assert change.token_events == ()


def test_unregister_by_token_removes_the_device_holding_it() -> None:
    """Apps that know only their token could not log out."""
    change = apply(
        EMPTY,
        reg(1000, apns(0xAB), "phone"),
        reg(1000, fcm(2), "tablet"),
        unreg(2000, token=apns(0xAB).upper()),
    )
    assert tokens(change.state) == {"tablet": fcm(2)}


def test_late_register_does_not_resurrect_an_unregistered_device() -> None:
    """A delayed registration would bring back a logged-out device."""
    change = apply(
        EMPTY,
        reg(1000, apns(1)),
        unreg(3000, device_id="phone"),
        reg(2000, apns(1)),
    )
    assert change.state.devices == []
    assert change.claims == ()


def test_register_after_unregister_brings_the_device_back() -> None:
    """A user logging in again would get no pushes on that device."""
    change = apply(
        EMPTY,
        reg(1000, apns(1)),
        unreg(2000, device_id="phone"),
        reg(3000, apns(1)),
    )
    assert tokens(change.state) == {"phone": apns(1)}
    assert change.state.removed == {}


def test_unregister_arriving_before_its_register_wins() -> None:
    """Out-of-order delivery would leave a logged-out device registered."""
    change = apply(EMPTY, unreg(2000, device_id="phone"), reg(1000, apns(1)))
    assert change.state.devices == []

    by_token = apply(EMPTY, unreg(2000, token=apns(7)), reg(1000, apns(7), None))
    assert by_token.state.devices == []


def test_unregister_older_than_the_device_changes_nothing() -> None:
    """A stale logout would remove a device that registered again since."""
    first = apply(EMPTY, reg(3000, apns(1)))
    change = unregister(first.state, unreg(2000, device_id="phone"), NOW)
    assert change.state == first.state


def test_unregister_names_a_device() -> None:
    """An unregister naming nothing would remove a random device, or crash."""
    with pytest.raises(ValueError, match="device_id or a token"):
        REGISTRY_INPUT.validate_json(
            '{"type":"unregister","user_id":"a","event_time":"2026-01-01T00:00:00Z"}'
        )


# --- the device limit -------------------------------------------------------------


def test_device_limit_retires_the_least_recently_seen() -> None:
    """A user's device list would grow without bound (and every push with it)."""
    change = apply(
        EMPTY,
        reg(1000, apns(1), "a"),
        reg(2000, apns(2), "b"),
        reg(3000, apns(3), "c"),
        reg(1500, apns(1), "a"),  # stale: changes nothing
        reg(4000, apns(2), "b"),
        reg(5000, apns(4), "d"),
    )
    assert sorted(tokens(change.state)) == ["b", "c", "d"]
    [retired] = change.token_events
    assert (retired.type, retired.device_id, retired.token) == ("retired", "a", apns(1))
    assert "limit of 3" in retired.reason
    assert change.state.removed == {"a": 5000}


def test_device_limit_retires_invalid_devices_first() -> None:
    """A dead token would keep its place while a live device is dropped."""
    change = apply(
        EMPTY,
        reg(1000, apns(1), "a"),
        reg(2000, apns(2), "b"),
        reg(3000, apns(3), "c"),
    )
    change = invalidate(change.state, report("invalidated", 3500, apns(3)))
    change = register(change.state, reg(4000, apns(4), "d"), RULES, NOW)
    assert sorted(tokens(change.state)) == ["a", "b", "d"]
    assert [(e.type, e.device_id) for e in change.token_events] == [("retired", "c")]


def test_limit_applied_to_a_late_old_registration_retires_it() -> None:
    """A very old registration would push out a device the user uses."""
    full = apply(
        EMPTY,
        reg(2000, apns(2), "b"),
        reg(3000, apns(3), "c"),
        reg(4000, apns(4), "d"),
    )
    change = register(full.state, reg(1000, apns(1), "a"), RULES, NOW)
    assert sorted(tokens(change.state)) == ["b", "c", "d"]
    assert types(change) == ["retired"]
    assert change.claims == ()


# --- invalid tokens ---------------------------------------------------------------


def test_invalidated_token_is_marked_and_a_new_one_requested() -> None:
    """Pushes would keep going to a dead token, and the app would never re-register."""
    first = apply(EMPTY, reg(1000, apns(1)))
    change = invalidate(first.state, report("invalidated", 5000, apns(1), 4000))

    [device] = change.state.devices
    assert (device.state, device.invalid_reason, device.invalidated_at_ms) == (
        "invalid",
        "Unregistered",
        4000,
    )
    assert device.updated_at_ms == 1000
    [request] = change.token_events
    assert (request.type, request.token, request.user_id, request.device_id) == (
        "reregister_requested",
        apns(1),
        "alice",
        "phone",
    )
    assert request.provider_time_ms == 4000


def test_second_invalidation_publishes_nothing() -> None:
    """Upstream would prompt the user again for every failed push."""
    first = apply(EMPTY, reg(1000, apns(1)))
    once = invalidate(first.state, report("invalidated", 5000, apns(1)))
    twice = invalidate(once.state, report("invalidated", 6000, apns(1)))
    assert twice.state == once.state
    assert twice.token_events == ()


def test_invalidation_never_touches_a_newer_token() -> None:
    """A late report about an old token would kill the device's working token."""
    change = apply(EMPTY, reg(1000, apns(1)), reg(2000, apns(2)))
    after = invalidate(change.state, report("invalidated", 3000, apns(1), 1500))
    assert after.state == change.state
    assert after.token_events == ()


def test_invalidation_before_the_last_registration_is_ignored() -> None:
    """A device that registered its token again would be cut off by an old verdict."""
    change = apply(EMPTY, reg(1000, apns(1)), reg(3000, apns(1)))
    after = invalidate(change.state, report("invalidated", 4000, apns(1), 2000))
    assert after.state == change.state

    no_time = invalidate(change.state, report("invalidated", 2500, apns(1)))
    assert no_time.state == change.state


def test_invalidation_without_provider_time_uses_the_report_time() -> None:
    """FCM's UNREGISTERED (no timestamp) would never mark a token invalid."""
    change = apply(EMPTY, reg(1000, fcm(1)))
    after = invalidate(change.state, report("invalidated", 2000, fcm(1)))
    assert after.state.devices[0].state == "invalid"
    assert after.state.devices[0].invalidated_at_ms == 2000


def test_register_after_invalidation_makes_the_device_active_again() -> None:
    """A device whose app registered again would stay cut off."""
    change = apply(EMPTY, reg(1000, apns(1)))
    change = invalidate(change.state, report("invalidated", 2000, apns(1), 2000))

    older = register(change.state, reg(1500, apns(1)), RULES, NOW)
    assert older.state.devices[0].state == "invalid"
    assert older.state.devices[0].last_seen_ms == 1500

    newer = register(change.state, reg(3000, apns(1)), RULES, NOW)
    [device] = newer.state.devices
    assert (device.state, device.invalid_reason, device.invalidated_at_ms) == (
        "active",
        None,
        None,
    )


def test_unknown_token_is_not_this_users_business() -> None:
    """A report about another user's token would change this user's devices."""
    change = apply(EMPTY, reg(1000, apns(1)))
    after = invalidate(change.state, report("invalidated", 2000, apns(9)))
    assert after.state == change.state
    assert after.token_events == ()


def test_late_new_token_is_applied_after_an_invalidation() -> None:
    """A new token registered before a failed push was reported would be lost."""
    change = apply(EMPTY, reg(1000, fcm(1)))
    change = invalidate(change.state, report("invalidated", 5000, fcm(1)))
    change = register(change.state, reg(3000, fcm(2)), RULES, NOW)
    assert tokens(change.state) == {"phone": fcm(2)}
    assert change.state.devices[0].state == "active"


# --- token owners -------------------------------------------------------------------


def claim(user: str, t: int, device: str = "phone", token: str = apns(1)) -> TokenClaim:
    return TokenClaim(
        token_fp=token_fingerprint(token),
        token=token,
        platform="apns",
        app="com.example.app",
        user_id=user,
        device_id=device,
        event_time_ms=t,
    )


def test_first_claim_makes_the_owner() -> None:
    """A token's owner would be unknown, so no other user could take it."""
    owner, released = settle_claim(None, claim("alice", 1000))
    assert owner == Owner(user_id="alice", device_id="phone", event_time_ms=1000)
    assert released is None


def test_newer_claim_by_another_user_releases_the_previous_owner() -> None:
    """The previous user would keep getting the new user's pushes on that phone."""
    held = Owner(user_id="alice", device_id="phone", event_time_ms=1000)
    owner, released = settle_claim(held, claim("bob", 2000, "ipad"))
    assert owner is not None
    assert owner.user_id == "bob"
    assert released is not None
    assert (released.type, released.user_id, released.device_id) == (
        "released",
        "alice",
        "phone",
    )
    assert (released.token, released.event_time_ms) == (apns(1), 2000)


def test_older_claim_by_another_user_is_released_at_once() -> None:
    """A delayed registration would give the token to a user who no longer holds it."""
    held = Owner(user_id="bob", device_id="ipad", event_time_ms=2000)
    owner, released = settle_claim(held, claim("alice", 1000))
    assert owner is None
    assert released is not None
    assert (released.user_id, released.event_time_ms) == ("alice", 2000)


def test_same_user_claims_keep_the_latest() -> None:
    """Re-registrations would churn the owners table or publish false releases."""
    held = Owner(user_id="alice", device_id="phone", event_time_ms=2000)
    assert settle_claim(held, claim("alice", 1000)) == (None, None)
    assert settle_claim(held, claim("alice", 2000)) == (None, None)
    owner, released = settle_claim(held, claim("alice", 3000, "tablet"))
    assert owner == Owner(user_id="alice", device_id="tablet", event_time_ms=3000)
    assert released is None


def test_release_removes_the_token_from_the_previous_user() -> None:
    """Two users would get each other's pushes on a shared device."""
    change = apply(EMPTY, reg(1000, apns(1)))
    after = release(change.state, report("released", 2000, apns(1)))
    assert after.state.devices == []
    assert after.state.removed == {"phone": 2000}
    assert after.token_events == ()


def test_release_spares_a_token_registered_again_since() -> None:
    """A user who logged back in on the device would lose it to an old claim."""
    change = apply(EMPTY, reg(1000, apns(1)), reg(3000, apns(1)))
    after = release(change.state, report("released", 2000, apns(1)))
    assert after.state == change.state


@given(st.permutations(range(6)))
def test_owner_is_the_latest_claim_in_any_order(order: list[int]) -> None:
    """Which user owns a token would depend on Kafka's delivery timing."""
    claims = [claim(f"user{i % 3}", 1000 * (i + 1), f"d{i}") for i in range(6)]
    owner: Owner | None = None
    for i in order:
        new_owner, _ = settle_claim(owner, claims[i])
        owner = new_owner or owner
    assert owner == Owner(user_id="user2", device_id="d5", event_time_ms=6000)


# --- letting go of tokens -------------------------------------------------------------


def let_go(change: Change) -> list[tuple[str, str, str, str, int]]:
    """(reason, user, device, token, time) of each release, checking its key."""
    for r in change.releases:
        assert r.token_fp == token_fingerprint(r.token)
    return [
        (r.reason, r.user_id, r.device_id, r.token, r.released_at_ms)
        for r in change.releases
    ]


def test_unregister_releases_the_devices_token() -> None:
    """A logged-out device's token would stay in the owners table for ever."""
    first = apply(EMPTY, reg(1000, apns(1)))
    change = unregister(first.state, unreg(2000, device_id="phone"), NOW)
    assert let_go(change) == [("unregistered", "alice", "phone", apns(1), 2000)]

    by_token = unregister(first.state, unreg(2000, token=apns(1).upper()), NOW)
    assert let_go(by_token) == [("unregistered", "alice", "phone", apns(1), 2000)]


def test_unregister_of_an_unknown_device_releases_nothing() -> None:
    """A release would name a token this user never held."""
    change = unregister(EMPTY, unreg(2000, device_id="phone"), NOW)
    assert change.releases == ()
    late = apply(EMPTY, reg(3000, apns(1)), unreg(2000, device_id="phone"))
    assert late.releases == ()


def test_new_token_releases_the_replaced_one() -> None:
    """Every rotated token would keep an owners entry for ever."""
    first = register(EMPTY, reg(1000, apns(1)), RULES, NOW)
    change = register(first.state, reg(2000, apns(2)), RULES, NOW)
    assert let_go(change) == [("replaced", "alice", "phone", apns(1), 2000)]
    assert [c.token for c in change.claims] == [apns(2)]


def test_refresh_and_a_move_between_devices_release_nothing() -> None:
    """The owner of a token still in use would be forgotten."""
    first = register(EMPTY, reg(1000, apns(1), "old"), RULES, NOW)
    again = register(first.state, reg(2000, apns(1), "old"), RULES, NOW)
    moved = register(again.state, reg(3000, apns(1), "new"), RULES, NOW)
    assert again.releases == ()
    assert moved.releases == ()
    assert [(c.device_id, c.token) for c in moved.claims] == [("new", apns(1))]


def test_device_limit_releases_the_retired_token() -> None:
    """Tokens of devices retired by the limit would keep owners entries."""
    change = apply(
        EMPTY,
        reg(1000, apns(1), "a"),
        reg(2000, apns(2), "b"),
        reg(3000, apns(3), "c"),
        reg(4000, apns(4), "d"),
    )
    assert let_go(change) == [("retired", "alice", "a", apns(1), 4000)]


def test_release_time_is_never_before_the_last_registration() -> None:
    """The owner agent would keep the entry of an invalid device retired late."""
    change = apply(
        EMPTY,
        reg(5000, apns(1), "a"),
        reg(6000, apns(2), "b"),
        reg(7000, apns(3), "c"),
    )
    change = invalidate(change.state, report("invalidated", 8000, apns(3), 7500))
    late = register(change.state, reg(2000, apns(4), "d"), RULES, NOW)
    assert let_go(late) == [("retired", "alice", "c", apns(3), 7000)]


def test_sweep_releases_the_retired_tokens() -> None:
    """Tokens of long-gone devices would keep owners entries for ever."""
    change = apply(EMPTY, reg(1000, apns(1), "old"), reg(9000, apns(2), "fresh"))
    swept = sweep(change.state, sweep_at(5000), RULES, NOW)
    assert let_go(swept) == [("retired", "alice", "old", apns(1), 5000)]


def test_invalidation_releases_the_dead_token() -> None:
    """Every token a provider declared dead would keep its owners entry."""
    first = apply(EMPTY, reg(1000, apns(1)))
    change = invalidate(first.state, report("invalidated", 5000, apns(1), 4000))
    assert let_go(change) == [("invalidated", "alice", "phone", apns(1), 4000)]
    again = invalidate(change.state, report("invalidated", 6000, apns(1), 4000))
    assert again.releases == ()


def test_release_to_another_user_is_released_on_token_owners_too() -> None:
    """The losing user's let-go would never reach the owner agent."""
    first = apply(EMPTY, reg(1000, apns(1)))
    change = release(first.state, report("released", 2000, apns(1)))
    assert let_go(change) == [("released", "alice", "phone", apns(1), 2000)]
    spared = release(first.state, report("released", 500, apns(1)))
    assert spared.releases == ()


def let_go_of(user: str, device: str, t: int, token: str = apns(1)) -> TokenRelease:
    return TokenRelease(
        type="release",
        token_fp=token_fingerprint(token),
        token=token,
        user_id=user,
        device_id=device,
        reason="unregistered",
        released_at_ms=t,
    )


def test_release_by_the_owner_removes_the_entry() -> None:
    """Tokens nobody holds would stay in the owners table for ever."""
    held = Owner(user_id="alice", device_id="phone", event_time_ms=1000)
    assert settle_release(held, let_go_of("alice", "phone", 1000))
    assert settle_release(held, let_go_of("alice", "phone", 2000))


def test_release_never_removes_another_owner() -> None:
    """A late release would make the new owner's token ownerless.

    Then a third user's claim would not release the new owner, and two users
    would get each other's pushes.
    """
    bob = Owner(user_id="bob", device_id="ipad", event_time_ms=2000)
    assert not settle_release(bob, let_go_of("alice", "ipad", 3000))
    assert not settle_release(bob, let_go_of("bob", "phone", 3000))
    assert not settle_release(bob, let_go_of("bob", "ipad", 1500))
    assert not settle_release(None, let_go_of("alice", "ipad", 3000))


def test_late_release_after_another_users_claim_keeps_the_claim() -> None:
    """Alice's release, published after Bob's claim, would delete Bob's entry."""
    owner, _ = settle_claim(None, claim("alice", 1000))
    new_owner, released = settle_claim(owner, claim("bob", 2000, "ipad"))
    assert released is not None
    alice_state = apply(EMPTY, reg(1000, apns(1))).state
    late = release(alice_state, released)
    [alice_lets_go] = late.releases
    assert not settle_release(new_owner, alice_lets_go)


def test_owners_records_without_a_type_are_claims() -> None:
    """Claims already on token-owners would be refused after an upgrade."""
    old = claim("alice", 1000).model_dump(exclude={"type"})
    assert "type" not in old
    assert TOKEN_OWNERS_RECORD.validate_python(old) == claim("alice", 1000)
    assert json_round_trip(claim("alice", 1000)) == claim("alice", 1000)
    assert json_round_trip(let_go_of("alice", "phone", 1)) == let_go_of(
        "alice", "phone", 1
    )


def json_round_trip(record: TokenClaim | TokenRelease) -> TokenClaim | TokenRelease:
    return TOKEN_OWNERS_RECORD.validate_json(record.model_dump_json())


def test_owners_schema_file_tells_claims_from_releases() -> None:
    """A reader validating token-owners by its schema would refuse a release."""
    path = Path(__file__).resolve().parent.parent / "topics" / "token-owners.json"
    schema = json.loads(path.read_text())["schema"]
    old_claim = claim("alice", 1000).model_dump(exclude={"type"})
    for record in (
        claim("alice", 1000).model_dump(),
        old_claim,
        let_go_of("alice", "phone", 1).model_dump(),
    ):
        jsonschema.validate(record, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**old_claim, "type": "release"}, schema)


def test_a_release_is_not_a_claim_to_a_worker_that_knows_only_claims() -> None:
    """During an upgrade an older worker would take a release for a claim."""
    with pytest.raises(ValueError, match="event_time_ms"):
        TokenClaim.model_validate_json(let_go_of("alice", "phone", 1).model_dump_json())


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b'{"type":"hello"}', "does not match any of the expected tags"),
        (b"[1]", "Unable to extract tag"),
        (b'{"type":"release","token":"t"}', "release.user_id\\n  Field required"),
        (
            b'{"type":"release","token_fp":"a","token":"t","user_id":"u",'
            b'"device_id":"d","reason":"bored","released_at_ms":1}',
            "release.reason",
        ),
    ],
)
def test_bad_owners_records_fail_to_decode(raw: bytes, why: str) -> None:
    """A forged or broken record would be applied half-way, or crash the agent."""
    with pytest.raises(ValueError, match=why):
        TOKEN_OWNERS_RECORD.validate_json(raw)


# --- the sweep ------------------------------------------------------------------------


def sweep_at(cutoff: int) -> Sweep:
    return Sweep(type="sweep", user_id="alice", cutoff_ms=cutoff, at_ms=cutoff + 99)


def test_sweep_retires_devices_not_seen_since_the_cutoff() -> None:
    """Tokens of long-gone devices would stay and be pushed to forever."""
    change = apply(
        EMPTY,
        reg(1000, apns(1), "old"),
        reg(2000, apns(2), "dead"),
        reg(9000, apns(3), "fresh"),
    )
    change = invalidate(change.state, report("invalidated", 2500, apns(2)))
    assert needs_sweep(change.state, 5000)

    swept = sweep(change.state, sweep_at(5000), RULES, NOW)

    assert tokens(swept.state) == {"fresh": apns(3)}
    assert [(e.type, e.device_id) for e in swept.token_events] == [
        ("retired", "dead"),
        ("retired", "old"),
        ("reregister_requested", "old"),
    ]
    assert all("30 days" in e.reason for e in swept.token_events)
    assert not needs_sweep(swept.state, 5000)
    assert sweep(swept.state, sweep_at(5000), RULES, NOW).state == swept.state


def test_sweep_forgets_old_removals() -> None:
    """The removal markers of a user would grow without bound."""
    change = apply(EMPTY, reg(1000, apns(1)), unreg(2000, device_id="phone"))
    assert needs_sweep(change.state, 3000)
    swept = sweep(change.state, sweep_at(3000), RULES, NOW)
    assert is_empty(swept.state)
    assert swept.token_events == ()


def test_a_forged_sweep_retires_nothing_the_periodic_sweep_would_keep() -> None:
    """Anyone who can write to registrations could wipe a user's live devices."""
    max_age = RULES.max_age_ms
    change = apply(
        EMPTY,
        reg(NOW - max_age - 5000, apns(1), "lost"),
        reg(NOW - max_age + 5000, apns(2), "quiet"),
        reg(NOW - 1000, apns(3), "live"),
        unreg(NOW - 2000, device_id="gone"),
    )
    forged = Sweep(type="sweep", user_id="alice", cutoff_ms=NOW * 2, at_ms=NOW * 2)

    swept = sweep(change.state, forged, RULES, NOW)

    assert tokens(swept.state) == {"quiet": apns(2), "live": apns(3)}
    assert {e.device_id for e in swept.token_events} == {"lost"}
    assert "gone" in swept.state.removed
    periodic = Sweep(type="sweep", user_id="alice", cutoff_ms=NOW - max_age, at_ms=NOW)
    assert swept.state == sweep(change.state, periodic, RULES, NOW).state


def test_an_earlier_sweep_cutoff_is_kept() -> None:
    """A sweep published before a rebalance would retire more once applied late."""
    change = apply(EMPTY, reg(1000, apns(1), "old"), reg(3000, apns(2), "newer"))
    swept = sweep(change.state, sweep_at(2000), RULES, NOW)
    assert tokens(swept.state) == {"newer": apns(2)}


def test_swept_device_does_not_come_back_with_an_old_registration() -> None:
    """A delayed registration from before the cutoff would revive a retired device."""
    change = apply(EMPTY, reg(1000, apns(1)))
    swept = sweep(change.state, sweep_at(5000), RULES, NOW)
    late = register(swept.state, reg(4000, apns(1)), RULES, NOW)
    assert late.state.devices == []


def test_removal_markers_are_bounded() -> None:
    """A user with endless logouts would grow one table entry without bound."""
    events = [
        unreg(1000 + i, device_id=f"d{i}") for i in range(MAX_REMOVED_MARKERS + 20)
    ]
    change = apply(EMPTY, *events)
    assert len(change.state.removed) == MAX_REMOVED_MARKERS
    assert f"d{MAX_REMOVED_MARKERS + 19}" in change.state.removed


# --- decoding -------------------------------------------------------------------------


def test_state_round_trips_through_the_table_encoding() -> None:
    """A restarted worker would read back a different device list."""
    change = apply(EMPTY, reg(1000, apns(1), locale="fr"), unreg(900, device_id="x"))
    assert decode_state(encode_state(change.state)) == change.state
    assert decode_state(None) == EMPTY


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "Invalid JSON"),
        (b'{"type":"register","user_id":"a"}', "Field required"),
        (b'{"type":"hello","user_id":"a"}', "does not match any of the expected tags"),
        (
            b'{"type":"register","user_id":"a","platform":"apns","token":"zz",'
            b'"app":"x","event_time":"2026-01-01T00:00:00Z"}',
            "malformed token",
        ),
        (
            b'{"type":"register","user_id":"a","platform":"bb10","token":"zz",'
            b'"app":"x","event_time":"2026-01-01T00:00:00Z"}',
            "platform",
        ),
        (
            b'{"type":"register","user_id":"a","platform":"fcm","token":"'
            + b"x" * 20
            + b'","app":"x","event_time":"2026-01-01T00:00:00"}',
            "timezone",
        ),
    ],
)
def test_bad_registrations_fail_to_decode(raw: bytes, why: str) -> None:
    """A bad registration would be applied half-way, or crash the agent."""
    with pytest.raises(ValueError, match=why):
        REGISTRY_INPUT.validate_json(raw)


# --- properties over random orders ---------------------------------------------------

DEVICES = ["d0", "d1", "d2"]


@st.composite
def histories(draw: st.DrawFn) -> list[Register | Unregister]:
    """Registers and unregisters of a few devices, at distinct times."""
    count = draw(st.integers(1, 12))
    times = draw(
        st.lists(st.integers(1, 10_000), min_size=count, max_size=count, unique=True)
    )
    events: list[Register | Unregister] = []
    for t in times:
        device = draw(st.sampled_from(DEVICES))
        if draw(st.booleans()) or not events:
            n = DEVICES.index(device) * 100 + draw(st.integers(0, 2))
            events.append(reg(t, apns(n), device))
        else:
            events.append(unreg(t, device_id=device))
    return events


def device_of(event: Register | Unregister) -> str:
    assert event.device_id is not None
    return event.device_id


@settings(max_examples=300)
@given(histories(), st.randoms(use_true_random=False))
def test_any_delivery_order_ends_in_the_latest_state(
    events: list[Register | Unregister], rnd: Any
) -> None:
    """Kafka redelivery or reordering would leave a device with the wrong token."""
    shuffled = list(events)
    rnd.shuffle(shuffled)
    final = apply(EMPTY, *shuffled).state

    expected = {}
    for device in DEVICES:
        mine = [e for e in events if device_of(e) == device]
        if mine:
            latest = max(mine, key=lambda e: e.event_time)
            if isinstance(latest, Register):
                expected[device] = (
                    latest.token,
                    int(latest.event_time.timestamp() * 1000),
                )
    assert {d.device_id: (d.token, d.last_seen_ms) for d in final.devices} == expected


Step = tuple[str, str | None, int, int]


def steps(*kinds: str) -> st.SearchStrategy[list[Step]]:
    """Up to 30 steps: a kind, a device id (None: by token), a token number, a time."""
    step = st.tuples(
        st.sampled_from(kinds),
        st.sampled_from(["a", "b", "c", "d", "e", None]),
        st.integers(0, 5),
        st.integers(1, 10_000),
    )
    return st.lists(step, max_size=30)


def take(state: UserDevices, step: Step) -> Change:
    """Apply one of the steps ``steps`` draws to ``state``."""
    kind, device, n, t = step
    token = apns(n) if n % 2 else fcm(n)
    if kind == "reg":
        return register(state, reg(t, token, device), RULES, NOW)
    if kind == "unreg":
        names = {"device_id": device} if device else {"token": token}
        return unregister(state, unreg(t, **names), NOW)
    if kind == "sweep":
        return sweep(state, sweep_at(t), RULES, t + RULES.max_age_ms)
    if kind == "invalid":
        return invalidate(state, report("invalidated", t, token))
    return release(state, report("released", t, token))


@settings(max_examples=300)
@given(steps("reg", "unreg", "invalid", "release"))
def test_invariants_hold_after_any_sequence(history: list[Step]) -> None:
    """A corrupted device list: duplicates, two devices per token, over the limit."""
    state = EMPTY
    for step in history:
        state = take(state, step).state
        ids = [d.device_id for d in state.devices]
        assert len(ids) == len(set(ids))
        held = [d.token for d in state.devices]
        assert len(held) == len(set(held))
        assert len(state.devices) <= RULES.max_devices
        assert len(state.removed) <= MAX_REMOVED_MARKERS
        for d in state.devices:
            assert d.registered_at_ms <= d.last_seen_ms == d.updated_at_ms
            assert (d.state == "invalid") == (d.invalidated_at_ms is not None)
            assert d.device_id not in state.removed
        assert decode_state(encode_state(state)) == state


@settings(max_examples=300)
@given(steps("reg", "unreg", "invalid", "release", "sweep"))
def test_every_token_a_device_stops_holding_is_released(
    history: list[Step],
) -> None:
    """The owners table would keep entries of tokens nobody holds, or lose live ones."""
    state = EMPTY
    for step in history:
        change = take(state, step)
        live = {(d.device_id, d.token) for d in state.devices if d.state == "active"}
        kept = {(d.device_id, d.token) for d in change.state.devices}
        claimed = {c.token for c in change.claims}
        released = {(r.device_id, r.token) for r in change.releases}
        gone = {(d, tok) for d, tok in live if (d, tok) not in kept}
        invalid = {
            (d.device_id, d.token) for d in change.state.devices if d.state == "invalid"
        }
        assert {
            (d, tok) for d, tok in gone | (live & invalid) if tok not in claimed
        } <= (released)
        assert not released & {
            (d.device_id, d.token) for d in change.state.devices if d.state == "active"
        }
        state = change.state
