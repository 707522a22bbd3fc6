"""FCM's pure rules: the message we build and what each answer means."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from pushstream.events import FcmOverrides, Notification, describe_error
from pushstream.senders import fcm
from pushstream.senders.fcm import RateLimiter, classify, render
from pushstream.senders.result import Target

TOKEN = "fcm-token-" + "a1B2_c3-D4:e5" * 10
TARGET = Target(platform="fcm", token=TOKEN, app="demo-project", device_id="d1")
NOW_MS = 1_700_000_000_000


def note(**fields: Any) -> Notification:
    fields.setdefault("id", "n-1")
    content = ("title", "body", "title_loc_key", "data", "content_available")
    if not any(key in fields for key in content):
        fields["title"] = "Hello"
    return Notification(**fields)


def message_of(n: Notification, expires_at_ms: int | None = None) -> dict[str, Any]:
    rendered = render(n, TARGET, NOW_MS, expires_at_ms)
    assert rendered.too_large is None
    document = json.loads(rendered.body)
    assert set(document) == {"message"}
    message: dict[str, Any] = document["message"]
    return message


# --- render ----------------------------------------------------------------------


def test_basic_message_targets_the_token_with_title_body_image_and_data() -> None:
    """The device would get nothing, or the wrong text, from a malformed message."""
    n = note(
        title="Hi", body="There", image="https://img.example/a.png", data={"k": "v"}
    )
    rendered = render(n, TARGET, NOW_MS, None)
    message = json.loads(rendered.body)["message"]
    assert message["token"] == TOKEN
    assert message["notification"] == {
        "title": "Hi",
        "body": "There",
        "image": "https://img.example/a.png",
    }
    assert message["data"] == {"k": "v"}
    assert rendered.headers == {"content-type": "application/json; charset=UTF-8"}
    assert "topic" not in message
    assert "condition" not in message


def test_high_priority_alert_maps_to_each_platform() -> None:
    """A high-priority notification would arrive late on Android, iOS or the web."""
    message = message_of(note(title="Hi", priority="high"))
    assert message["android"]["priority"] == "HIGH"
    assert message["apns"]["headers"]["apns-priority"] == "10"
    assert message["apns"]["headers"]["apns-push-type"] == "alert"
    assert message["webpush"]["headers"]["Urgency"] == "high"


def test_normal_priority_maps_to_each_platform() -> None:
    """A low-priority notification would wake devices it should not."""
    message = message_of(note(title="Hi", priority="normal"))
    assert message["android"]["priority"] == "NORMAL"
    assert message["apns"]["headers"]["apns-priority"] == "5"
    assert message["webpush"]["headers"]["Urgency"] == "normal"


def test_ttl_is_the_time_left_until_expiry() -> None:
    """A notification would outlive its expiry on the device's provider."""
    expires = NOW_MS + 3_600_500
    message = message_of(note(), expires)
    assert message["android"]["ttl"] == "3600.500s"
    assert message["apns"]["headers"]["apns-expiration"] == str(expires // 1000)
    assert message["webpush"]["headers"]["TTL"] == "3600"


def test_no_expiry_leaves_fcm_default_and_expired_means_now_or_never() -> None:
    """A notification without ttl would get a made-up one, an expired one a long one."""
    message = message_of(note(), None)
    assert "ttl" not in message["android"]
    assert "apns-expiration" not in message["apns"]["headers"]
    assert "TTL" not in message["webpush"]["headers"]

    late = message_of(note(), NOW_MS - 5)
    assert late["android"]["ttl"] == "0s"
    assert late["apns"]["headers"]["apns-expiration"] == "0"
    assert late["webpush"]["headers"]["TTL"] == "0"


def test_now_or_never_is_stored_by_no_one_even_when_retried() -> None:
    """A ttl 0 message would be kept by FCM, APNs or web push for its grace period."""
    grace_end = NOW_MS + 30_000
    body = render(note(ttl=0), TARGET, NOW_MS, grace_end).body
    message = json.loads(body)["message"]

    assert message["android"]["ttl"] == "0s"
    assert message["apns"]["headers"]["apns-expiration"] == "0"
    assert message["webpush"]["headers"]["TTL"] == "0"
    again = json.loads(fcm.refresh_ttl(body, NOW_MS + 5_000, grace_end))["message"]
    assert again["android"]["ttl"] == "0s"
    assert again["webpush"]["headers"]["TTL"] == "0"


def test_silent_push_is_a_background_data_message() -> None:
    """iOS would refuse a silent push sent with alert type or priority 10."""
    message = message_of(note(content_available=True, data={"sync": "1"}))
    assert "notification" not in message
    assert "notification" not in message["android"]
    assert message["apns"]["headers"]["apns-push-type"] == "background"
    assert message["apns"]["headers"]["apns-priority"] == "5"
    assert message["apns"]["payload"]["aps"] == {"content-available": 1}


def test_ios_fields_go_into_aps() -> None:
    """Badge, sound, category, thread or subtitle would be missing on iPhones."""
    n = note(
        title="T",
        subtitle="S",
        body="B",
        badge=3,
        sound="ding.caf",
        category="REPLY",
        thread_id="chat-7",
        mutable_content=True,
    )
    aps = message_of(n)["apns"]["payload"]["aps"]
    assert aps == {
        "alert": {"title": "T", "subtitle": "S", "body": "B"},
        "badge": 3,
        "sound": "ding.caf",
        "category": "REPLY",
        "thread-id": "chat-7",
        "mutable-content": 1,
    }


def test_localized_text_reaches_android_and_ios() -> None:
    """Localized notifications would show raw keys or nothing."""
    n = note(
        title_loc_key="GREETING",
        title_loc_args=["Ann"],
        body_loc_key="NEW_MSG",
        body_loc_args=["3"],
        sound="default",
    )
    message = message_of(n)
    assert message["android"]["notification"] == {
        "title_loc_key": "GREETING",
        "title_loc_args": ["Ann"],
        "body_loc_key": "NEW_MSG",
        "body_loc_args": ["3"],
        "sound": "default",
    }
    assert message["apns"]["payload"]["aps"]["alert"] == {
        "title-loc-key": "GREETING",
        "title-loc-args": ["Ann"],
        "loc-key": "NEW_MSG",
        "loc-args": ["3"],
    }


def test_collapse_key_replaces_older_notifications_everywhere() -> None:
    """A newer notification would pile up beside the one it should replace."""
    message = message_of(note(title="Score", collapse_key="match-42", badge=1))
    assert message["android"]["collapse_key"] == "match-42"
    assert message["android"]["notification"]["tag"] == "match-42"
    assert message["android"]["notification"]["notification_count"] == 1
    assert message["apns"]["headers"]["apns-collapse-id"] == "match-42"
    assert message["webpush"]["headers"]["Topic"] == "match-42"

    odd = message_of(note(title="Score", collapse_key="match 42!"))
    assert "Topic" not in odd["webpush"]["headers"]


def test_image_is_passed_to_ios_with_mutable_content() -> None:
    """iOS devices would show notifications without their image."""
    message = message_of(note(title="Pic", image="https://img.example/p.png"))
    assert message["apns"]["fcm_options"] == {"image": "https://img.example/p.png"}
    assert message["apns"]["payload"]["aps"]["mutable-content"] == 1


def test_overrides_are_deep_merged_and_none_removes() -> None:
    """Per-platform overrides would be lost, or would wipe the built fields."""
    n = note(
        title="Hi",
        collapse_key="c1",
        fcm={
            "android": {
                "notification": {"channel_id": "news", "tag": None},
                "restricted_package_name": "com.example",
            },
            "apns": {"headers": {"apns-priority": "5"}},
            "webpush": {"fcm_options": {"link": "https://example.com/x"}},
            "fcm_options": {"analytics_label": "campaign-1"},
        },
    )
    message = message_of(n)
    android = message["android"]
    assert android["priority"] == "HIGH"
    assert android["collapse_key"] == "c1"
    assert android["restricted_package_name"] == "com.example"
    assert android["notification"] == {"channel_id": "news"}
    assert message["apns"]["headers"]["apns-priority"] == "5"
    assert message["apns"]["headers"]["apns-push-type"] == "alert"
    assert message["webpush"]["fcm_options"] == {"link": "https://example.com/x"}
    assert message["webpush"]["headers"]["Urgency"] == "high"
    assert message["fcm_options"] == {"analytics_label": "campaign-1"}


@pytest.mark.parametrize(
    "fcm_block",
    [
        {"apns": {"headers": {"apns-collapse-id": "a\r\nb"}}},
        {"apns": {"headers": {"x\r\ninjected": "1"}}},
        {"apns": {"headers": {"authorization": "bearer x"}}},
        {"apns": {"headers": "apns-priority: 5"}},
        {"webpush": {"headers": {"TTL": "60\u00a0"}}},
        {"webpush": {"headers": {":authority": "example.com"}}},
    ],
)
def test_illegal_headers_in_fcm_blocks_are_refused(fcm_block: dict[str, Any]) -> None:
    """A header FCM hands on to APNs or web push would break their HTTP/2."""
    with pytest.raises(ValidationError) as caught:
        note(fcm=fcm_block)
    assert describe_error(caught.value).startswith("fcm.")

    unchecked = note().model_copy(
        update={"fcm": FcmOverrides.model_construct(**fcm_block)}
    )
    assert render(unchecked, TARGET, NOW_MS, None).invalid_header is not None


def test_null_fcm_header_still_removes_the_built_one() -> None:
    """Removing a built APNs header through FCM would be refused as invalid."""
    n = note(fcm={"apns": {"headers": {"apns-push-type": None}}})
    rendered = render(n, TARGET, NOW_MS, None)
    assert rendered.invalid_header is None
    assert (
        "apns-push-type" not in json.loads(rendered.body)["message"]["apns"]["headers"]
    )


def _sized(extra_bytes: int) -> Notification:
    """A notification whose message is exactly 4096 + extra_bytes bytes."""
    base = note(data={"k": ""})
    size = fcm.message_size(
        json.loads(render(base, TARGET, NOW_MS, None).body)["message"]
    )
    room = fcm.MAX_MESSAGE_BYTES - size + extra_bytes
    # Two-byte characters plus one ASCII letter when the room is odd: the
    # limit is in bytes, not characters.
    return note(data={"k": "é" * (room // 2) + "x" * (room % 2)})


def test_size_limit_is_4096_bytes() -> None:
    """FCM would refuse oversized messages, or we would refuse fitting ones."""
    at_limit = render(_sized(0), TARGET, NOW_MS, None)
    assert at_limit.too_large is None
    over = render(_sized(1), TARGET, NOW_MS, None)
    assert over.too_large is not None
    assert "4096" in over.too_large


def test_long_token_does_not_count_against_the_limit() -> None:
    """Devices with long tokens would be refused messages that fit."""
    long_target = Target(platform="fcm", token="t" * 3000, app="p", device_id="d")
    assert render(_sized(0), long_target, NOW_MS, None).too_large is None


@given(
    data=st.dictionaries(
        st.text(min_size=1, max_size=20), st.text(max_size=200), max_size=30
    ),
    title=st.one_of(st.none(), st.text(min_size=1, max_size=300)),
)
def test_rendered_body_is_json_with_the_data_unchanged(
    data: dict[str, str], title: str | None
) -> None:
    """Any text in a notification would reach the device altered or not at all."""
    n = Notification(id="n", data=data, title=title, content_available=True)
    rendered = render(n, TARGET, NOW_MS, None)
    message = json.loads(rendered.body)["message"]
    assert message.get("data", {}) == data
    assert all(isinstance(value, str) for value in message.get("data", {}).values())
    too_big = fcm.message_size(message) > fcm.MAX_MESSAGE_BYTES
    assert (rendered.too_large is not None) == too_big


@given(st.integers(min_value=0, max_value=28 * 86_400_000))
def test_duration_round_trips(ms: int) -> None:
    """A ttl would reach FCM in a form it refuses, or with another value."""
    text = fcm.duration(ms)
    assert fcm.duration_ms(text) == ms
    assert re.fullmatch(r"\d+(\.\d{1,9})?s", text)


def test_retried_send_gets_the_remaining_ttl_never_a_longer_one() -> None:
    """A retried notification would be kept by FCM past its expiry."""
    expires = NOW_MS + 60_000
    body = render(note(), TARGET, NOW_MS, expires).body
    later = json.loads(fcm.refresh_ttl(body, NOW_MS + 45_000, expires))["message"]
    assert later["android"]["ttl"] == "15s"
    assert later["webpush"]["headers"]["TTL"] == "15"

    short = render(note(fcm={"android": {"ttl": "5s"}}), TARGET, NOW_MS, expires)
    kept = json.loads(fcm.refresh_ttl(short.body, NOW_MS + 1_000, expires))
    assert kept["message"]["android"]["ttl"] == "5s"


# --- classify --------------------------------------------------------------------


def error_body(
    code: int,
    status: str,
    message: str = "",
    *,
    fcm_code: str | None = None,
    fields: list[str] | None = None,
    extra: list[dict[str, Any]] | None = None,
) -> bytes:
    details: list[dict[str, Any]] = []
    if fcm_code:
        details.append({"@type": fcm.FCM_ERROR, "errorCode": fcm_code})
    if fields:
        details.append(
            {
                "@type": fcm.BAD_REQUEST,
                "fieldViolations": [
                    {"field": f, "description": f"Invalid value at '{f}'"}
                    for f in fields
                ],
            }
        )
    details += extra or []
    error = {"code": code, "message": message, "status": status, "details": details}
    return json.dumps({"error": error}).encode()


def test_success_carries_the_message_name() -> None:
    """Deliveries would lack FCM's message id, or success would not count."""
    body = b'{"name": "projects/p/messages/0:1500415314455276%31bd1c96"}'
    result = classify(200, {}, body)
    assert result.outcome == "delivered"
    assert result.provider_id == "projects/p/messages/0:1500415314455276%31bd1c96"
    assert result.status == 200


@pytest.mark.parametrize(
    ("status", "rpc", "code"),
    [
        (404, "NOT_FOUND", "UNREGISTERED"),
        (403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
    ],
)
def test_dead_tokens(status: int, rpc: str, code: str) -> None:
    """Dead tokens would be pushed to forever, wasting quota."""
    result = classify(status, {}, error_body(status, rpc, "x", fcm_code=code))
    assert result.outcome == "invalid_token"
    assert result.reason == code
    assert result.status == status


def test_invalid_argument_about_the_token_invalidates_it() -> None:
    """A malformed token would stay in the table and fail every push."""
    body = error_body(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        fcm_code="INVALID_ARGUMENT",
    )
    assert classify(400, {}, body).outcome == "invalid_token"
    named = error_body(400, "INVALID_ARGUMENT", "bad", fields=["message.token"])
    assert classify(400, {}, named).outcome == "invalid_token"


@pytest.mark.parametrize(
    "body",
    [
        error_body(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'message.data[0].value' (TYPE_STRING), 1",
            fcm_code="INVALID_ARGUMENT",
            fields=["message.data[0].value"],
        ),
        error_body(
            400,
            "INVALID_ARGUMENT",
            "Invalid value at 'message.data[0].value' (TYPE_STRING), 1",
            fields=["message.data[0].value"],
        ),
    ],
)
def test_invalid_argument_about_the_payload_keeps_the_token(body: bytes) -> None:
    """A bad payload would delete a good device token."""
    result = classify(400, {}, body)
    assert result.outcome == "failed"
    assert "message.data[0].value" in result.reason


def test_unexplained_invalid_argument_keeps_the_token() -> None:
    """A vague 400 would delete a good device token."""
    body = error_body(
        400,
        "INVALID_ARGUMENT",
        "Request contains an invalid argument.",
        fcm_code="INVALID_ARGUMENT",
    )
    result = classify(400, {}, body)
    assert result.outcome == "failed"
    assert result.reason.startswith("INVALID_ARGUMENT")


def test_quota_exceeded_honours_retry_after() -> None:
    """Throttled sends would be retried too early or dropped."""
    body = error_body(429, "RESOURCE_EXHAUSTED", "quota", fcm_code="QUOTA_EXCEEDED")
    result = classify(429, {"retry-after": "30"}, body)
    assert (result.outcome, result.reason, result.retry_after) == (
        "retry",
        "QUOTA_EXCEEDED",
        30.0,
    )


def test_quota_429_without_fcm_error_is_a_retry_after_a_minute() -> None:
    """Google's plain RESOURCE_EXHAUSTED 429 would be treated as a hard failure."""
    info = {
        "@type": fcm.ERROR_INFO,
        "reason": "RATE_LIMIT_EXCEEDED",
        "metadata": {"quota_limit": "SendsPerMinutePerProject"},
    }
    body = error_body(429, "RESOURCE_EXHAUSTED", "Quota exceeded", extra=[info])
    result = classify(429, {}, body)
    assert result.outcome == "retry"
    assert result.reason == "RESOURCE_EXHAUSTED RATE_LIMIT_EXCEEDED"
    assert result.retry_after == fcm.QUOTA_RETRY_AFTER_S


def test_unavailable_retry_after_as_http_date() -> None:
    """A Retry-After given as a date would be ignored."""
    headers = {
        "retry-after": "Wed, 21 Oct 2015 07:28:30 GMT",
        "date": "Wed, 21 Oct 2015 07:28:00 GMT",
    }
    body = error_body(503, "UNAVAILABLE", "busy", fcm_code="UNAVAILABLE")
    result = classify(503, headers, body)
    assert (result.outcome, result.retry_after) == ("retry", 30.0)


def test_internal_is_retried_without_a_fixed_pause() -> None:
    """FCM's internal errors would fail notifications that a retry delivers."""
    result = classify(500, {}, error_body(500, "INTERNAL", "x", fcm_code="INTERNAL"))
    assert (result.outcome, result.reason, result.retry_after) == (
        "retry",
        "INTERNAL",
        None,
    )


def test_third_party_auth_error_fails_and_keeps_the_token() -> None:
    """Wrong APNs credentials in Firebase would delete every iOS token."""
    apns = {
        "@type": fcm.APNS_ERROR,
        "statusCode": 403,
        "reason": "InvalidProviderToken",
    }
    body = error_body(
        401, "UNAUTHENTICATED", "auth", fcm_code="THIRD_PARTY_AUTH_ERROR", extra=[apns]
    )
    result = classify(401, {}, body)
    assert result.outcome == "failed"
    assert result.reason == "THIRD_PARTY_AUTH_ERROR (APNs 403 InvalidProviderToken)"
    old = error_body(401, "UNAUTHENTICATED", "auth", fcm_code="APNS_AUTH_ERROR")
    assert classify(401, {}, old).outcome == "failed"


def test_plain_401_asks_for_a_new_access_token() -> None:
    """An expired access token would fail sends instead of being refreshed."""
    body = error_body(401, "UNAUTHENTICATED", "Request had invalid authentication")
    result = classify(401, {}, body)
    assert result.reason == fcm.UNAUTHENTICATED
    assert result.outcome == "retry"
    assert fcm.refused_access_token(result)

    info = {"@type": fcm.ERROR_INFO, "reason": "ACCESS_TOKEN_EXPIRED"}
    expired = classify(401, {}, error_body(401, "UNAUTHENTICATED", "x", extra=[info]))
    assert expired.reason == "UNAUTHENTICATED ACCESS_TOKEN_EXPIRED"
    assert fcm.refused_access_token(expired)

    apns = error_body(401, "UNAUTHENTICATED", "x", fcm_code="THIRD_PARTY_AUTH_ERROR")
    assert not fcm.refused_access_token(classify(401, {}, apns))


@pytest.mark.parametrize(
    ("status", "rpc"), [(403, "PERMISSION_DENIED"), (404, "NOT_FOUND")]
)
def test_project_errors_fail_without_touching_the_token(status: int, rpc: str) -> None:
    """A wrong project id or missing permission would delete every token."""
    result = classify(status, {}, error_body(status, rpc, "denied"))
    assert result.outcome == "failed"
    assert result.reason == rpc


@pytest.mark.parametrize(
    ("status", "body", "outcome", "reason"),
    [
        (502, b"<html>Bad Gateway</html>", "retry", "http_502"),
        (413, b"", "failed", "http_413"),
        (
            500,
            error_body(500, "INTERNAL", "?", fcm_code="UNSPECIFIED_ERROR"),
            "retry",
            "INTERNAL",
        ),
        (
            400,
            error_body(400, "FAILED_PRECONDITION", "?", fcm_code="SOMETHING_NEW"),
            "failed",
            "SOMETHING_NEW",
        ),
        (
            503,
            error_body(503, "UNAVAILABLE", "?", fcm_code="SOMETHING_NEW"),
            "retry",
            "SOMETHING_NEW",
        ),
    ],
)
def test_unknown_answers_fall_back_on_the_status(
    status: int, body: bytes, outcome: str, reason: str
) -> None:
    """An answer not in the table would crash the sender or be misfiled."""
    result = classify(status, {}, body)
    assert (result.outcome, result.reason, result.status) == (outcome, reason, status)


@pytest.mark.parametrize("value", ["soon", "-5", "nan", ""])
def test_unusable_retry_after_is_ignored(value: str) -> None:
    """A garbled Retry-After would crash the sender or stall a retry."""
    after = fcm.retry_after_s({"retry-after": value})
    assert after is None or after == 0.0


@given(status=st.integers(min_value=100, max_value=599), body=st.binary(max_size=300))
def test_classify_never_raises_nor_drops_a_token_on_noise(
    status: int, body: bytes
) -> None:
    """A strange answer would crash the sender or delete a good token."""
    result = classify(status, {"retry-after": "x"}, body)
    assert result.outcome in ("delivered", "invalid_token", "retry", "failed")
    if status != 200:
        assert result.outcome != "invalid_token"


# --- the rate limiter ------------------------------------------------------------


class FakeTime:
    """A clock that moves only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds


async def test_rate_limiter_bounds_grants_by_elapsed_time() -> None:
    """A project would exceed its quota and be throttled by FCM."""
    time = FakeTime()
    limiter = RateLimiter(60, burst=5, clock=time, sleep=time.sleep)
    granted: list[float] = []

    async def one() -> None:
        await limiter.acquire()
        granted.append(time.now)

    await asyncio.gather(*(one() for _ in range(25)))
    assert len(granted) == 25
    for count, at in enumerate(granted, start=1):
        assert count <= 5 + at * 1.0 + 1e-9
    assert granted[4] == 0.0
    assert 20.0 - 1e-6 <= time.now <= 20.0 + 1e-6
