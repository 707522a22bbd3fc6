"""Routing decisions as pure functions: no Kafka, no tables, a local renderer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pushstream import router
from pushstream.events import (
    ApnsOverrides,
    Device,
    Notification,
    Platform,
    UserDevices,
    describe_error,
    device_id_for_token,
    to_ms,
)
from pushstream.router import Address, Refused, Sent
from pushstream.senders import apns
from pushstream.senders.result import Rendered, Target

NOW = 1_700_000_000_000
APNS_TOKEN = "a1" * 32
FCM_TOKEN = "fcm-token-0123456789abcdef:XYZ"
WNS_TOKEN = "https://db3.notify.windows.com/?token=AwYAAAB3secret"


def note(**fields: Any) -> Notification:
    fields.setdefault("id", "n1")
    fields.setdefault("title", "Hello")
    return Notification.model_validate(fields)


def device(device_id: str, platform: str, token: str, **fields: Any) -> Device:
    fields.setdefault("app", "com.example")
    return Device.model_validate(
        {
            "device_id": device_id,
            "platform": platform,
            "token": token,
            "registered_at_ms": NOW - 5000,
            "last_seen_ms": NOW - 5000,
            "updated_at_ms": NOW - 5000,
            **fields,
        }
    )


THREE = [
    Target("apns", APNS_TOKEN, "com.example", "phone", "development"),
    Target("fcm", FCM_TOKEN, "example-project", "tablet"),
    Target("wns", WNS_TOKEN, "Example.App", "laptop"),
]


def render(
    n: Notification, target: Target, now_ms: int, expires_at_ms: int | None
) -> Rendered:
    """Stands in for a platform renderer: a body that names what it was given."""
    body = json.dumps(
        {"token": target.token, "title": n.title, "now": now_ms, "exp": expires_at_ms}
    )
    too_large = "over 10 bytes" if n.body == "huge" else None
    return Rendered({"x-platform": target.platform}, body, too_large)


RENDERERS: dict[Platform, router.Renderer] = {
    "apns": render,
    "fcm": render,
    "wns": render,
}


def route(
    n: Notification,
    targets: list[Target],
    *,
    previous: Sent | None = None,
    offset: int = 7,
    expires: int | None = None,
    renderers: dict[Platform, router.Renderer] | None = None,
) -> router.Routing:
    return router.route(
        n,
        targets,
        user_id="u1",
        previous=previous,
        offset=offset,
        renderers=renderers or RENDERERS,
        now_ms=NOW,
        expires_at_ms=expires,
    )


def outcomes(routing: router.Routing) -> list[tuple[str, str, str | None]]:
    return [(d.outcome, d.reason, d.device_id) for d in routing.deliveries]


# --- parse and address --------------------------------------------------------


def test_empty_record_is_refused() -> None:
    """A tombstone on notifications would crash the router, not be set aside."""
    with pytest.raises(Refused, match="no value"):
        router.parse(None)
    with pytest.raises(Refused):
        router.parse(b"")


def test_invalid_json_is_refused_without_quoting_the_token() -> None:
    """A dead letter's reason would leak a device token from a bad notification."""
    value = json.dumps(
        {"id": "n1", "title": "t", "tokens": [{"platform": "apns", "token": "zz" * 40}]}
    )
    with pytest.raises(ValidationError) as caught:
        router.parse(value.encode()[:-3] + b"xx}")
    with pytest.raises(ValidationError) as bad_token:
        router.parse(value.replace('"apns"', '"apns", "app": "a"').encode())

    assert "zz" * 8 not in describe_error(caught.value)
    assert "tokens.0" in describe_error(bad_token.value)
    assert "zz" * 8 not in describe_error(bad_token.value)


def test_audience_with_user_id_is_refused() -> None:
    """A notification naming an audience and a user would reach only one of them."""
    with pytest.raises(ValidationError, match="audience or user_id"):
        note(audience=["a", "b"], user_id="c")


def test_the_record_key_is_the_user() -> None:
    """A notification keyed by its user would not reach that user's devices."""
    assert router.address(note(), b"u1") == Address("user", "u1", b"u1")
    assert router.address(note(user_id="u1"), b"u1") == Address("user", "u1", b"u1")


def test_key_and_user_id_must_agree() -> None:
    """A notification for user A keyed by user B would look up the wrong devices."""
    with pytest.raises(Refused, match="differ"):
        router.address(note(user_id="u1"), b"u2")
    with pytest.raises(Refused, match="differ"):
        router.address(note(user_id="u1", tokens=[tok("apns")]), b"u2")


def test_unkeyed_notification_with_user_id_is_rekeyed() -> None:
    """A notification published without a key would look in a random partition."""
    assert router.address(note(user_id="u1"), None) == Address("rekey", "u1")
    assert router.address(note(user_id="u1"), b"") == Address("rekey", "u1")


def test_notification_naming_nobody_is_refused() -> None:
    """A notification without key, user, tokens or audience would vanish silently."""
    with pytest.raises(Refused, match="no target"):
        router.address(note(), None)


def test_a_key_that_is_not_text_names_no_user() -> None:
    """A binary record key would be looked up as a user that cannot exist."""
    with pytest.raises(Refused, match="UTF-8"):
        router.address(note(), b"\xff\xfe")


def test_tokens_and_audience_need_no_user_key() -> None:
    """Raw-token or audience notifications would be refused for lacking a user key."""
    tokens = note(tokens=[tok("apns")])
    assert router.address(tokens, None) == Address("tokens", None, b"")
    assert router.address(tokens, b"\xff") == Address("tokens", None, b"\xff")
    assert router.address(note(audience=["a"]), b"campaign") == Address(
        "audience", None
    )


def tok(
    platform: str, token: str | None = None, app: str = "com.example"
) -> dict[str, str]:
    tokens = {"apns": APNS_TOKEN, "fcm": FCM_TOKEN, "wns": WNS_TOKEN}
    return {"platform": platform, "token": token or tokens[platform], "app": app}


# --- expiry -------------------------------------------------------------------


def test_ttl_counts_from_publication() -> None:
    """A notification that waited in a lagging partition would outlive its ttl."""
    assert router.expiry_ms(note(ttl=60), published_ms=NOW - 1000, now_ms=NOW) == (
        NOW + 59_000
    )


def test_expires_at_is_absolute() -> None:
    """An explicit expiry time would be shifted by when the notification arrived."""
    at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert router.expiry_ms(note(expires_at=at), NOW - 1, NOW) == to_ms(at)


def test_ttl_zero_has_a_short_grace_from_publication() -> None:
    """A "now or never" notification would always expire unsent, or go out late."""
    grace_ms = router.NOW_OR_NEVER_GRACE_S * 1000
    fresh = router.expiry_ms(note(ttl=0), published_ms=NOW - 1000, now_ms=NOW)
    stale = router.expiry_ms(note(ttl=0), published_ms=NOW - grace_ms - 1, now_ms=NOW)

    assert fresh == NOW - 1000 + grace_ms
    assert not router.is_expired(fresh, NOW)
    assert router.is_expired(stale, NOW)


def test_only_ttl_zero_sends_are_now_or_never() -> None:
    """Providers would store a ttl 0 push, or drop one that may wait."""
    grace_end = NOW + router.NOW_OR_NEVER_GRACE_S * 1000
    now_or_never = route(note(ttl=0), THREE, expires=grace_end).sends
    timed = route(note(ttl=60), THREE, expires=NOW + 60_000).sends

    assert [s.now_or_never for s in now_or_never] == [True, True, True]
    assert [s.expires_at_ms for s in now_or_never] == [grace_end] * 3
    assert [s.now_or_never for s in timed] == [False, False, False]


def test_no_ttl_never_expires() -> None:
    """A notification without ttl would be dropped as expired."""
    assert router.expiry_ms(note(), NOW - 10**9, NOW) is None
    assert not router.is_expired(None, NOW)


@pytest.mark.parametrize(
    ("expires", "expired"), [(NOW - 1, True), (NOW, False), (NOW + 1, False)]
)
def test_expired_only_once_the_expiry_has_passed(expires: int, expired: bool) -> None:
    """A notification would be sent after its expiry, or dropped before it."""
    assert router.is_expired(expires, NOW) is expired


def test_record_timestamp_in_ms() -> None:
    """ttl would count from the wrong moment (seconds vs ms, or a missing stamp)."""
    assert router.published_ms(1_700_000_000.25, NOW) == 1_700_000_000_250
    assert router.published_ms(None, NOW) == NOW
    assert router.published_ms(0.0, NOW) == NOW


# --- audience split -----------------------------------------------------------


def test_audience_splits_into_one_keyed_copy_per_distinct_user() -> None:
    """An audience member would get nothing, twice as much, or another user's copy."""
    n = note(id="camp-1", audience=["ann", "bob", "ann", "cé"], body="b", badge=3)

    records = router.per_user(n, n.audience or (), None)

    assert [key for key, _ in records] == [b"ann", b"bob", "cé".encode()]
    for key, value in records:
        copy = Notification.model_validate_json(value)
        assert copy.user_id == key.decode()
        assert copy.audience is None
        assert copy.model_dump(exclude={"user_id", "audience"}) == n.model_dump(
            exclude={"user_id", "audience"}
        )


def test_audience_copies_keep_the_original_expiry() -> None:
    """Audience copies would get a fresh ttl when they are published a second time."""
    n = note(audience=["a"], ttl=300)
    expires = router.expiry_ms(n, NOW - 2000, NOW)

    [(_, value)] = router.per_user(n, ["a"], expires)
    copy = Notification.model_validate_json(value)

    assert copy.ttl is None
    assert copy.expires_at is not None
    assert router.expiry_ms(copy, NOW + 10**6, NOW + 10**6) == NOW + 298_000


def test_now_or_never_copies_stay_now_or_never() -> None:
    """An audience with ttl 0 would turn into copies with a fixed expiry time."""
    [(_, value)] = router.per_user(note(audience=["a"], ttl=0), ["a"], NOW)
    assert Notification.model_validate_json(value).ttl == 0


@given(
    users=st.lists(
        st.text(
            st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20
        ),
        min_size=1,
        max_size=20,
    )
)
def test_any_user_id_survives_the_split(users: list[str]) -> None:
    """A user id with quotes or non-ASCII characters would break the copy's JSON."""
    records = router.per_user(note(audience=users), users, None)

    assert [Notification.model_validate_json(v).user_id for _, v in records] == list(
        dict.fromkeys(users)
    )


# --- targets ------------------------------------------------------------------


def test_send_id_names_notification_and_device() -> None:
    """Sends could not be matched to their deliveries or deduplicated by providers."""
    assert router.send_id("n1", "phone") == "n1:phone"


def test_only_active_devices_are_targets() -> None:
    """A push would go to a token a provider already said is dead."""
    entry = UserDevices(
        devices=[
            device("phone", "apns", APNS_TOKEN, environment="development"),
            device("old", "fcm", FCM_TOKEN, state="invalid", invalid_reason="gone"),
            device("laptop", "wns", WNS_TOKEN, app="Example.App"),
        ]
    )

    assert router.device_targets(entry) == [
        Target("apns", APNS_TOKEN, "com.example", "phone", "development"),
        Target("wns", WNS_TOKEN, "Example.App", "laptop"),
    ]
    assert router.device_targets(None) == []


def test_raw_tokens_are_normalised_and_deduplicated() -> None:
    """A raw token listed twice, or in upper case, would be pushed to twice."""
    n = note(tokens=[tok("apns", APNS_TOKEN.upper()), tok("apns"), tok("fcm")])

    targets = router.token_targets(n)

    assert [(t.platform, t.token) for t in targets] == [
        ("apns", APNS_TOKEN),
        ("fcm", FCM_TOKEN),
    ]
    assert targets[0].device_id == device_id_for_token(APNS_TOKEN)


@pytest.mark.parametrize(
    ("filters", "passes"),
    [
        ({}, [True, True, True]),
        ({"platforms": ["apns", "wns"]}, [True, False, True]),
        ({"apps": ["example-project"]}, [False, True, False]),
        ({"platforms": ["apns"], "apps": ["example-project"]}, [False, False, False]),
        (
            {"platforms": ["fcm"], "apps": ["example-project", "x"]},
            [False, True, False],
        ),
    ],
)
def test_platform_and_app_filters(filters: dict[str, Any], passes: list[bool]) -> None:
    """A notification for one app or platform would reach the user's other apps."""
    n = note(**filters)
    assert [router.allowed(n, t) for t in THREE] == passes


# --- the routing decision -----------------------------------------------------


def test_one_send_per_live_device_with_its_rendered_request() -> None:
    """A device would miss the push, or get another device's request."""
    routing = route(note(priority="normal"), THREE, expires=NOW + 5000)

    assert routing.deliveries == []
    assert [s.platform for s in routing.sends] == ["apns", "fcm", "wns"]
    apns = routing.sends[0]
    assert apns.send_id == "n1:phone"
    assert (apns.user_id, apns.device_id, apns.token) == ("u1", "phone", APNS_TOKEN)
    assert (apns.app, apns.environment, apns.priority) == (
        "com.example",
        "development",
        "normal",
    )
    assert (apns.attempt, apns.accepted_at_ms, apns.expires_at_ms) == (
        1,
        NOW,
        NOW + 5000,
    )
    assert apns.headers == {"x-platform": "apns"}
    assert json.loads(apns.body) == {
        "token": APNS_TOKEN,
        "title": "Hello",
        "now": NOW,
        "exp": NOW + 5000,
    }
    assert routing.sent == Sent(NOW, {"phone": 7, "tablet": 7, "laptop": 7})


def test_user_without_live_devices_is_dropped_once() -> None:
    """A notification to a user with no device would leave no trace on deliveries."""
    routing = route(note(), [])

    assert routing.sends == []
    assert outcomes(routing) == [("dropped", "no_devices", None)]
    assert routing.deliveries[0].user_id == "u1"
    assert routing.sent is None


def test_filters_that_exclude_every_device_drop_once() -> None:
    """A notification filtered away entirely would look like a user without devices."""
    routing = route(note(platforms=["apns"], apps=["other.app"]), THREE)

    assert routing.sends == []
    assert outcomes(routing) == [("dropped", "filtered", None)]


def test_filters_that_keep_some_devices_report_nothing_for_the_others() -> None:
    """Filtered-out devices would be reported as failures of the notification."""
    routing = route(note(platforms=["fcm"]), THREE)

    assert [s.device_id for s in routing.sends] == ["tablet"]
    assert routing.deliveries == []


def test_too_large_is_rejected_per_device_and_not_remembered() -> None:
    """An oversized push would be sent only to be refused by the provider."""
    routing = route(note(body="huge"), THREE)

    assert routing.sends == []
    assert outcomes(routing) == [
        ("rejected", "payload_too_large", "phone"),
        ("rejected", "payload_too_large", "tablet"),
        ("rejected", "payload_too_large", "laptop"),
    ]
    assert routing.deliveries[0].send_id == "n1:phone"
    assert routing.sent is None


def test_an_illegal_apns_header_is_rejected_per_device() -> None:
    """A header injected past validation would close the APNs connection."""
    n = note().model_copy(
        update={
            "apns": ApnsOverrides.model_construct(
                headers={"x\r\ninjected": "1"}, payload={}
            )
        }
    )
    renderers = {**RENDERERS, "apns": apns.render}

    routing = route(n, THREE, renderers=renderers)

    assert [s.device_id for s in routing.sends] == ["tablet", "laptop"]
    assert outcomes(routing) == [("rejected", "invalid_header", "phone")]
    assert routing.deliveries[0].send_id == "n1:phone"


def test_a_renderer_that_raises_rejects_only_its_platform() -> None:
    """One platform's rendering bug would stop the stream or the other platforms."""

    def broken(
        n: Notification, target: Target, now_ms: int, expires_at_ms: int | None
    ) -> Rendered:
        raise KeyError("boom")

    routing = route(note(), THREE, renderers={**RENDERERS, "fcm": broken})

    assert [s.device_id for s in routing.sends] == ["phone", "laptop"]
    assert outcomes(routing) == [("rejected", "render_failed", "tablet")]


def test_devices_already_sent_by_another_record_are_duplicates() -> None:
    """A notification published twice would push the same device twice."""
    previous = Sent(NOW - 60_000, {"phone": 3, "tablet": 3})

    routing = route(note(), THREE, previous=previous, offset=9)

    assert [s.device_id for s in routing.sends] == ["laptop"]
    assert outcomes(routing) == [
        ("duplicate", "already_sent", "phone"),
        ("duplicate", "already_sent", "tablet"),
    ]
    assert routing.deliveries[1].send_id == "n1:tablet"
    assert routing.sent == Sent(NOW - 60_000, {"phone": 3, "tablet": 3, "laptop": 9})


def test_the_same_record_handled_again_sends_again_marked_replay() -> None:
    """After a crash, repeated sends would be lost as duplicates, or look new."""
    previous = Sent(NOW - 100, {"phone": 7, "tablet": 7})

    routing = route(note(), THREE, previous=previous, offset=7)

    assert [(s.device_id, s.replay) for s in routing.sends] == [
        ("phone", True),
        ("tablet", True),
        ("laptop", False),
    ]
    assert routing.deliveries == []
    assert routing.sent == Sent(NOW - 100, {"phone": 7, "tablet": 7, "laptop": 7})


def test_a_first_routing_is_no_replay() -> None:
    """Every ordinary send would be counted as a repeat after a crash."""
    routing = route(note(), THREE, previous=None, offset=7)

    assert [s.replay for s in routing.sends] == [False, False, False]


def test_rotated_token_on_a_sent_device_is_a_duplicate() -> None:
    """A notification repeated after a token rotation would reach the device twice."""
    rotated = [Target("apns", "b2" * 32, "com.example", "phone", "development")]

    routing = route(note(), rotated, previous=Sent(NOW, {"phone": 1}), offset=2)

    assert outcomes(routing) == [("duplicate", "already_sent", "phone")]


def test_router_deliveries_are_complete() -> None:
    """Analytics would get router outcomes without times, attempts or a latency."""
    [delivery] = route(note(), []).deliveries
    data = json.loads(delivery.model_dump_json())

    assert data["notification_id"] == "n1"
    assert (data["attempts"], data["latency_ms"]) == (0, 0)
    assert data["accepted_at_ms"] == data["completed_at_ms"] == NOW
    assert router.expired(note(), None, NOW).outcome == "expired"


# --- dedup entries ------------------------------------------------------------


def test_routed_key_separates_scope_and_id() -> None:
    """Dedup entries of two users could collide."""
    assert router.routed_key(b"u1", "n1") == b"u1\0n1"
    assert router.routed_key(b"u1", "n1") != router.routed_key(b"u1n", "1")


@given(
    at=st.integers(0, 2**45),
    devices=st.dictionaries(st.text(min_size=1), st.integers(0, 2**62), max_size=20),
)
def test_sent_entries_round_trip(at: int, devices: dict[str, int]) -> None:
    """The dedup table would forget or invent devices a notification was sent to."""
    raw = router.encode_sent(Sent(at, devices))
    assert router.decode_sent(raw, now_ms=at, window_ms=1) == Sent(at, devices)


def test_entries_older_than_the_window_are_ignored() -> None:
    """A notification id reused after the dedup window would never be sent again."""
    raw = router.encode_sent(Sent(NOW - 10_001, {"d": 1}))

    assert router.decode_sent(raw, NOW, window_ms=10_000) is None
    assert router.decode_sent(raw, NOW, window_ms=10_001) is not None


def test_unreadable_entries_are_ignored() -> None:
    """A damaged dedup entry would stop the router."""
    for raw in (b"", b"{", b"[]", b'{"at": "x", "sent": {}}', b'{"sent": {}}'):
        assert router.decode_sent(raw, NOW, 10_000) is None
    assert router.decode_sent(None, NOW, 10_000) is None
