"""APNs rules without I/O: rendering, the reason table, provider tokens, credentials."""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import ssl
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from pushstream.config import ApnsApp, ConfigError
from pushstream.events import ApnsOverrides, Notification, describe_error
from pushstream.senders import apns, apns_auth
from pushstream.senders.apns_auth import ProviderToken
from pushstream.senders.http2 import field_problem
from pushstream.senders.result import Target

TOKEN = "ab" * 32
TARGET = Target(platform="apns", token=TOKEN, app="com.example.app", device_id="d1")
NOW_MS = 1_700_000_000_000
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def note(**fields: Any) -> Notification:
    fields.setdefault("id", "n1")
    return Notification(**fields)


def rendered(
    n: Notification, expires_at_ms: int | None = None
) -> tuple[dict[str, str], dict[str, Any]]:
    out = apns.render(n, TARGET, NOW_MS, expires_at_ms)
    assert out.too_large is None
    return out.headers, json.loads(out.body)


# --- render: payload ----------------------------------------------------------------


def test_alert_fields_go_into_the_alert_dictionary() -> None:
    """The notification's title, subtitle, body and loc keys show on the phone."""
    n = note(
        title="T",
        subtitle="S",
        body="B",
        title_loc_key="TK",
        title_loc_args=["a"],
        body_loc_key="BK",
        body_loc_args=["b", "c"],
    )
    _, payload = rendered(n)
    assert payload["aps"]["alert"] == {
        "title": "T",
        "subtitle": "S",
        "body": "B",
        "title-loc-key": "TK",
        "title-loc-args": ["a"],
        "loc-key": "BK",
        "loc-args": ["b", "c"],
    }


def test_badge_sound_thread_category_and_mutable_content() -> None:
    """Badge, sound, grouping, actions and the service extension reach the device."""
    n = note(
        body="B",
        badge=0,
        sound="ping.aiff",
        thread_id="chat-1",
        category="REPLY",
        mutable_content=True,
    )
    _, payload = rendered(n)
    aps = payload["aps"]
    assert aps["badge"] == 0  # 0 clears the badge, so it must be sent
    assert aps["sound"] == "ping.aiff"
    assert aps["thread-id"] == "chat-1"
    assert aps["category"] == "REPLY"
    assert aps["mutable-content"] == 1
    assert "content-available" not in aps


def test_data_keys_are_top_level_and_cannot_replace_aps() -> None:
    """Custom data arrives beside aps; a data key named 'aps' cannot wipe the alert."""
    _, payload = rendered(note(body="B", data={"chat": "42", "aps": "oops"}))
    assert payload["chat"] == "42"
    assert payload["aps"] == {"alert": {"body": "B"}}


def test_override_payload_merges_into_aps_and_top_level() -> None:
    """An override's aps keys (alert merged, null removes) and extra keys are sent."""
    n = note(
        title="T",
        body="B",
        sound="a.aiff",
        data={"k": "data"},
        apns={
            "payload": {
                "aps": {
                    "alert": {"launch-image": "img.png", "body": "B2"},
                    "sound": None,
                    "interruption-level": "time-sensitive",
                },
                "k": "override",
                "extra": {"nested": [1, 2]},
            }
        },
    )
    _, payload = rendered(n)
    assert payload["aps"] == {
        "alert": {"title": "T", "body": "B2", "launch-image": "img.png"},
        "interruption-level": "time-sensitive",
    }
    assert payload["k"] == "override"
    assert payload["extra"] == {"nested": [1, 2]}


def test_body_is_compact_utf8_json() -> None:
    """Non-ASCII text is counted as UTF-8 bytes, not inflated by escapes."""
    out = apns.render(note(body="héllo ✓"), TARGET, NOW_MS, None)
    assert out.body == '{"aps":{"alert":{"body":"héllo ✓"}}}'


# --- render: headers ----------------------------------------------------------------


def test_alert_push_defaults() -> None:
    """A plain alert goes out as push type alert, priority 10, to the bundle id."""
    headers, _ = rendered(note(title="Hi"))
    assert headers["apns-push-type"] == "alert"
    assert headers["apns-priority"] == "10"
    assert headers["apns-topic"] == "com.example.app"
    assert "apns-expiration" not in headers
    assert "apns-collapse-id" not in headers
    assert "authorization" not in headers


def test_content_available_only_is_a_background_push() -> None:
    """A silent push is a background push with priority 5, as APNs requires."""
    headers, payload = rendered(note(content_available=True, data={"sync": "1"}))
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert payload["aps"] == {"content-available": 1}


def test_data_only_notification_becomes_a_background_push() -> None:
    """A data-only notification still wakes the app instead of arriving empty."""
    headers, payload = rendered(note(data={"sync": "1"}))
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert payload["aps"] == {"content-available": 1}


def test_alert_with_content_available_stays_an_alert() -> None:
    """A visible push that also wakes the app keeps push type alert."""
    headers, payload = rendered(note(body="B", content_available=True))
    assert headers["apns-push-type"] == "alert"
    assert payload["aps"]["content-available"] == 1


def test_normal_priority_is_power_aware() -> None:
    """priority=normal maps to apns-priority 5 so the device may batch it."""
    headers, _ = rendered(note(body="B", priority="normal"))
    assert headers["apns-priority"] == "5"


@pytest.mark.parametrize(
    ("push_type", "suffix"),
    [
        ("alert", ""),
        ("background", ""),
        ("mdm", ""),
        ("voip", ".voip"),
        ("complication", ".complication"),
        ("fileprovider", ".pushkit.fileprovider"),
        ("location", ".location-query"),
        ("liveactivity", ".push-type.liveactivity"),
        ("pushtotalk", ".voip-ptt"),
    ],
)
def test_push_type_sets_the_topic_suffix(push_type: str, suffix: str) -> None:
    """Each push type goes to the topic Apple expects for it (else TopicDisallowed)."""
    headers, _ = rendered(note(body="B", apns={"push_type": push_type}))
    assert headers["apns-push-type"] == push_type
    assert headers["apns-topic"] == "com.example.app" + suffix


def test_expiration_is_absolute_epoch_seconds() -> None:
    """apns-expiration is a moment, not a ttl: a ttl would mean 1970 to Apple."""
    headers, _ = rendered(note(body="B", ttl=60), expires_at_ms=NOW_MS + 60_500)
    assert headers["apns-expiration"] == str(NOW_MS // 1000 + 61)


def test_ttl_zero_means_now_or_never() -> None:
    """ttl 0 asks APNs not to store the notification (apns-expiration 0)."""
    headers, _ = rendered(note(body="B", ttl=0), expires_at_ms=NOW_MS + 30_000)
    assert headers["apns-expiration"] == "0"


def test_collapse_id_is_at_most_64_bytes() -> None:
    """A collapse key of 64 multi-byte characters is shortened, not refused by APNs."""
    headers, _ = rendered(note(body="B", collapse_key="score"))
    assert headers["apns-collapse-id"] == "score"

    long_key = "é" * 64  # 128 bytes
    headers, _ = rendered(note(body="B", collapse_key=long_key))
    collapse = headers["apns-collapse-id"]
    assert len(collapse.encode()) <= 64
    other, _ = rendered(note(body="B", collapse_key="è" * 64))
    assert other["apns-collapse-id"] != collapse


def test_apns_id_is_stable_per_send() -> None:
    """A send made again after a crash carries the same apns-id as the first."""
    first, _ = rendered(note(body="B"))
    again, _ = rendered(note(body="changed"))
    other = apns.render(
        note(body="B"),
        Target(platform="apns", token=TOKEN, app="com.example.app", device_id="d2"),
        NOW_MS,
        None,
    ).headers
    assert UUID_RE.match(first["apns-id"])
    assert first["apns-id"] == again["apns-id"]
    assert other["apns-id"] != first["apns-id"]
    assert first["apns-id"] == str(uuid.UUID(first["apns-id"]))


def test_override_headers_pass_through_in_lower_case() -> None:
    """Extra APNs headers a notification asks for would not reach Apple."""
    headers, _ = rendered(
        note(
            body="B",
            apns={"headers": {"APNS-Priority": "5", "apns-collapse-id": "c 1"}},
        )
    )
    assert headers["apns-priority"] == "5"
    assert headers["apns-collapse-id"] == "c 1"
    assert headers["apns-topic"] == "com.example.app"


BAD_HEADERS = [
    {"x\r\ninjected": "1"},
    {"x-ok": "a\r\nx-injected: 1"},
    {"x-ok": "nul\x00"},
    {"x-ok": " padded"},
    {"x-caf\u00e9": "1"},
    {"x-ok": "caf\u00e9"},
    {"": "1"},
    {":path": "/3/device/x"},
    {"Authorization": "bearer stolen"},
    {"apns-topic": "com.example.other"},
    {"host": "api.push.apple.com"},
    {"content-length": "1"},
    {"connection": "close"},
    {"apns-priority": "5", "APNS-Priority": "10"},
]


@pytest.mark.parametrize("headers", BAD_HEADERS)
def test_notification_with_illegal_or_reserved_headers_is_refused(
    headers: dict[str, str],
) -> None:
    """A header that breaks HTTP/2 or steals the topic would be sent to Apple."""
    with pytest.raises(ValidationError) as caught:
        note(body="B", apns={"headers": headers})
    reason = describe_error(caught.value)
    assert reason.startswith("apns.headers: ")
    assert "header " in reason
    assert "\r" not in reason
    assert "\n" not in reason


@pytest.mark.parametrize("headers", BAD_HEADERS)
def test_render_rejects_illegal_headers_that_skipped_validation(
    headers: dict[str, str],
) -> None:
    """A notification built without validation would still inject a header."""
    n = note(body="B").model_copy(
        update={"apns": ApnsOverrides.model_construct(headers=headers, payload={})}
    )
    out = apns.render(n, TARGET, NOW_MS, None)
    assert out.invalid_header is not None
    assert out.headers["apns-topic"] == "com.example.app"


@given(st.text(max_size=80))
def test_any_collapse_key_becomes_a_legal_collapse_id(key: str) -> None:
    """A collapse key with a control character would kill the APNs connection."""
    collapse = apns.collapse_id_for(key)
    assert len(collapse.encode()) <= apns.COLLAPSE_ID_MAX_BYTES
    assert field_problem("apns-collapse-id", collapse) is None
    assert collapse == key or collapse == hashlib.sha256(key.encode()).hexdigest()


def _body_of_size(n: Notification, size: int) -> Notification:
    base = len(apns.render(n, TARGET, NOW_MS, None).body.encode())
    return n.model_copy(update={"data": {"pad": "x" * (size - base)}})


def test_payload_limit_4096() -> None:
    """A 4096-byte payload is sent; 4097 bytes is refused before reaching Apple."""
    fits = _body_of_size(note(body="B", data={"pad": ""}), 4096)
    out = apns.render(fits, TARGET, NOW_MS, None)
    assert len(out.body.encode()) == 4096
    assert out.too_large is None

    over = _body_of_size(note(body="B", data={"pad": ""}), 4097)
    out = apns.render(over, TARGET, NOW_MS, None)
    assert out.too_large is not None
    assert "4097" in out.too_large


def test_voip_payload_limit_5120() -> None:
    """VoIP pushes may be up to 5120 bytes, per Apple."""
    n = note(body="B", data={"pad": ""}, apns={"push_type": "voip"})
    assert apns.render(_body_of_size(n, 5120), TARGET, NOW_MS, None).too_large is None
    assert apns.render(_body_of_size(n, 5121), TARGET, NOW_MS, None).too_large


# --- classify ---------------------------------------------------------------------

# Written out from Apple's table, independently of apns.REASONS.
EXPECTED = {
    (400, "BadCollapseId"): "failed",
    (400, "BadDeviceToken"): "invalid_token",
    (400, "BadExpirationDate"): "failed",
    (400, "BadMessageId"): "failed",
    (400, "BadPriority"): "failed",
    (400, "BadTopic"): "failed",
    (400, "DeviceTokenNotForTopic"): "invalid_token",
    (400, "DuplicateHeaders"): "failed",
    (400, "IdleTimeout"): "retry",
    (400, "InvalidPushType"): "failed",
    (400, "MissingDeviceToken"): "failed",
    (400, "MissingTopic"): "failed",
    (400, "PayloadEmpty"): "failed",
    (400, "TopicDisallowed"): "failed",
    (403, "BadCertificate"): "failed",
    (403, "BadCertificateEnvironment"): "failed",
    (403, "ExpiredProviderToken"): "retry",
    (403, "Forbidden"): "failed",
    (403, "InvalidProviderToken"): "failed",
    (403, "MissingProviderToken"): "failed",
    (403, "UnrelatedKeyIdInToken"): "retry",
    (403, "BadEnvironmentKeyInToken"): "failed",
    (403, "BadEnvironmentKeyIdInToken"): "failed",
    (404, "BadPath"): "failed",
    (405, "MethodNotAllowed"): "failed",
    (410, "ExpiredToken"): "invalid_token",
    (410, "Unregistered"): "invalid_token",
    (413, "PayloadTooLarge"): "failed",
    (429, "TooManyProviderTokenUpdates"): "retry",
    (429, "TooManyRequests"): "retry",
    (500, "InternalServerError"): "retry",
    (503, "ServiceUnavailable"): "retry",
    (503, "Shutdown"): "retry",
}


def error(reason: str, **extra: Any) -> bytes:
    return json.dumps({"reason": reason, **extra}).encode()


def test_every_documented_reason_is_in_the_table() -> None:
    """No reason Apple documents is classified by the unknown-reason fallback."""
    assert {reason for _, reason in EXPECTED} == set(apns.REASONS)
    for (status, reason), _ in EXPECTED.items():
        assert apns.REASONS[reason].status == status


@pytest.mark.parametrize(("status", "reason"), sorted(EXPECTED))
def test_each_reason_has_its_outcome(status: int, reason: str) -> None:
    """Each APNs refusal leads to the right action: drop token, retry or fail."""
    result = apns.classify(status, {"apns-id": "x"}, error(reason))
    assert result.outcome == EXPECTED[(status, reason)]
    assert result.reason == reason
    assert result.status == status


def test_success_carries_the_apns_id() -> None:
    """A delivered push records Apple's apns-id for tracing in Apple's console."""
    result = apns.classify(
        200, {"apns-id": "0a1b2c3d-0000-4000-8000-000000000000"}, b""
    )
    assert result.outcome == "delivered"
    assert result.provider_id == "0a1b2c3d-0000-4000-8000-000000000000"


def test_unregistered_carries_apples_timestamp_in_ms() -> None:
    """A 410 keeps Apple's invalidation time, so a newer registration survives it."""
    result = apns.classify(410, {}, error("Unregistered", timestamp=1_700_000_123_456))
    assert result.outcome == "invalid_token"
    assert result.invalidated_at_ms == 1_700_000_123_456


def test_token_updates_throttle_backs_off() -> None:
    """TooManyProviderTokenUpdates is retried only after a pause, never at once."""
    result = apns.classify(429, {}, error("TooManyProviderTokenUpdates"))
    assert result.outcome == "retry"
    assert result.retry_after is not None
    assert result.retry_after >= 60


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, "failed"),
        (403, "failed"),
        (410, "invalid_token"),
        (429, "retry"),
        (500, "retry"),
        (502, "retry"),
        (503, "retry"),
        (418, "failed"),
    ],
)
def test_unknown_reason_falls_back_on_the_status(status: int, outcome: str) -> None:
    """A reason Apple adds later is still handled sensibly by its status class."""
    result = apns.classify(status, {}, error("SomethingNew"))
    assert result.outcome == outcome
    assert result.reason == "SomethingNew"


def test_unreadable_error_body() -> None:
    """A 5xx with an HTML body from a proxy is retried, its reason names the status."""
    result = apns.classify(502, {}, b"<html>bad gateway</html>")
    assert result.outcome == "retry"
    assert result.reason == "HTTP 502"


def test_retry_after_header_is_used_when_present() -> None:
    """If APNs (or a proxy) says when to come back, the retry waits that long."""
    result = apns.classify(503, {"retry-after": "7"}, error("ServiceUnavailable"))
    assert result.retry_after == 7.0


@given(st.integers(100, 599), st.binary(max_size=200), st.text(max_size=20))
def test_classify_never_raises(status: int, body: bytes, header: str) -> None:
    """Whatever comes back from the wire, the sender gets an outcome, not a crash."""
    result = apns.classify(status, {"apns-id": header, "retry-after": header}, body)
    assert result.outcome in ("delivered", "invalid_token", "retry", "failed")
    assert result.reason.isprintable()


# --- provider tokens --------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def decode(
    token: str, key: ec.EllipticCurvePrivateKey
) -> tuple[dict[str, Any], dict[str, Any]]:
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(
        token,
        key.public_key(),
        algorithms=["ES256"],
        options={"verify_iat": False},
    )
    return header, claims


def test_token_is_a_valid_es256_jwt_for_apple() -> None:
    """APNs accepts the token: ES256 over kid, iss and iat, checked by pyjwt."""
    key = make_key()
    token = ProviderToken(
        "TEAM123456", "KEY1234567", key, FakeClock(1_700_000_000)
    ).current()
    header, claims = decode(token, key)
    assert header["alg"] == "ES256"
    assert header["kid"] == "KEY1234567"
    assert claims["iss"] == "TEAM123456"
    assert 0 <= 1_700_000_000 - claims["iat"] < apns_auth.TOKEN_GRID_S
    assert set(claims) == {"iss", "iat"}


def test_token_is_reused_then_replaced_after_50_minutes() -> None:
    """One token serves every request until it is 50 minutes old, then a new one."""
    clock = FakeClock(apns_auth.TOKEN_GRID_S * 1000)  # on the grid: iat == now
    tokens = ProviderToken("TEAM123456", "KEY1234567", make_key(), clock)
    first = tokens.current()
    clock.now += 49 * 60
    assert tokens.current() == first
    clock.now += 60
    second = tokens.current()
    assert second != first
    assert tokens.minted == 2
    assert tokens.iat == apns_auth.TOKEN_GRID_S * 1000 + 50 * 60


def test_tokens_never_change_more_often_than_every_20_minutes() -> None:
    """Over two hours of steady sending, token changes are at least 20 min apart."""
    clock = FakeClock(1_700_000_000.0)
    tokens = ProviderToken("TEAM123456", "KEY1234567", make_key(), clock)
    changes: list[float] = []
    last = None
    for _ in range(7200):
        token = tokens.current()
        if token != last:
            changes.append(clock.now)
            last = token
        assert clock.now - tokens.iat < 60 * 60  # never stale for Apple
        clock.now += 1
    gaps = [b - a for a, b in itertools.pairwise(changes)]
    assert gaps
    assert min(gaps) >= apns_auth.TOKEN_MIN_INTERVAL_S


def test_processes_sharing_a_key_present_the_same_token() -> None:
    """Two workers started minutes apart send the same token, not two 'updates'."""
    key = make_key()
    start = apns_auth.TOKEN_GRID_S * 1000 + 60
    a = ProviderToken("TEAM123456", "KEY1234567", key, FakeClock(start))
    b = ProviderToken("TEAM123456", "KEY1234567", key, FakeClock(start + 300))
    assert a.current() == b.current()


def test_expired_token_is_renewed_only_when_20_minutes_old() -> None:
    """ExpiredProviderToken on an old token renews it; on a fresh one it does not."""
    clock = FakeClock(apns_auth.TOKEN_GRID_S * 1000)
    tokens = ProviderToken("TEAM123456", "KEY1234567", make_key(), clock)
    first = tokens.current()
    clock.now += 5 * 60
    assert tokens.renew_after_expired(first) is False
    assert tokens.current() == first

    clock.now += 20 * 60
    assert tokens.renew_after_expired(first) is True
    second = tokens.current()
    assert second != first
    assert tokens.iat == int(clock.now)
    # A request that was rejected with the old token just uses the new one.
    assert tokens.renew_after_expired(first) is True
    assert tokens.minted == 2


def test_provider_token_repr_hides_the_key() -> None:
    """Printing the token holder in a log shows ids only, never the private key."""
    text = repr(ProviderToken("TEAM123456", "KEY1234567", make_key()))
    assert "TEAM123456" in text
    assert "PRIVATE" not in text


# --- credentials ------------------------------------------------------------------


def p8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def token_app(**fields: Any) -> ApnsApp:
    values: dict[str, Any] = {
        "bundle_id": "com.example.app",
        "key_id": "KEY1234567",
        "team_id": "TEAM123456",
    }
    values.update(fields)
    return ApnsApp(**values)


def test_signing_key_from_file_and_from_text(tmp_path: Path) -> None:
    """A .p8 key works both as a mounted file and as the text of a variable."""
    key = make_key()
    path = tmp_path / "AuthKey.p8"
    path.write_bytes(p8(key))
    from_file = apns_auth.load_signing_key(token_app(key_file=path), 0)
    from_text = apns_auth.load_signing_key(
        token_app(key=SecretStr(p8(key).decode())), 0
    )
    assert from_file.private_numbers() == key.private_numbers()
    assert from_text.private_numbers() == key.private_numbers()


@pytest.mark.parametrize(
    ("fields", "setting"),
    [
        ({}, "PUSHSTREAM_APNS__3__KEY_FILE"),
        ({"key_file": Path("/nonexistent/AuthKey.p8")}, "PUSHSTREAM_APNS__3__KEY_FILE"),
        ({"key": SecretStr("not a key")}, "PUSHSTREAM_APNS__3__KEY"),
        (
            {"key": SecretStr(p8(rsa.generate_private_key(65537, 2048)).decode())},
            "PUSHSTREAM_APNS__3__KEY",
        ),
        (
            {"key": SecretStr(p8(ec.generate_private_key(ec.SECP384R1())).decode())},
            "PUSHSTREAM_APNS__3__KEY",
        ),
        ({"key_id": "short", "key": SecretStr("x")}, "PUSHSTREAM_APNS__3__KEY_ID"),
        ({"team_id": None, "key": SecretStr("x")}, "PUSHSTREAM_APNS__3__TEAM_ID"),
    ],
)
def test_bad_signing_key_names_the_setting(
    fields: dict[str, Any], setting: str
) -> None:
    """A missing, unreadable or wrong key stops start-up with the setting to fix."""
    with pytest.raises(ConfigError) as caught:
        apns_auth.load_signing_key(token_app(**fields), 3)
    message = str(caught.value)
    assert message.startswith(setting + ":")
    assert "BEGIN" not in message


def make_cert(
    key: ec.EllipticCurvePrivateKey,
    bundle_id: str = "com.example.app",
    days: int = 365,
    start: datetime | None = None,
) -> x509.Certificate:
    start = start or datetime.now(UTC) - timedelta(days=1)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.USER_ID, bundle_id),
            x509.NameAttribute(
                NameOID.COMMON_NAME, f"Apple Push Services: {bundle_id}"
            ),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=days))
        .sign(key, hashes.SHA256())
    )


def context() -> ssl.SSLContext:
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def test_pem_certificate_with_encrypted_key(tmp_path: Path) -> None:
    """A PEM certificate whose key is protected by cert_password loads."""
    key = make_key()
    cert = make_cert(key)
    path = tmp_path / "push.pem"
    path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    app = ApnsApp(
        bundle_id="com.example.app",
        auth="certificate",
        cert_file=path,
        cert_password=SecretStr("s3cret"),
    )
    loaded = apns_auth.load_client_certificate(context(), app, 0)
    assert apns_auth.certificate_topics(loaded) == ["com.example.app"]

    wrong = app.model_copy(update={"cert_password": SecretStr("nope")})
    with pytest.raises(ConfigError, match="PUSHSTREAM_APNS__0__CERT_FILE"):
        apns_auth.load_client_certificate(context(), wrong, 0)


def test_pkcs12_certificate_leaves_no_key_file_behind(tmp_path: Path) -> None:
    """A .p12 bundle loads, and its unencrypted key does not stay on disk."""
    key = make_key()
    cert = make_cert(key)
    path = tmp_path / "push.p12"
    path.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"push", key, cert, None, serialization.BestAvailableEncryption(b"pw")
        )
    )
    app = ApnsApp(
        bundle_id="com.example.app",
        auth="certificate",
        cert_file=path,
        cert_password=SecretStr("pw"),
    )
    tmp = Path(tempfile.gettempdir())
    before = set(tmp.glob("apns-*.pem"))
    apns_auth.load_client_certificate(context(), app, 0)
    assert set(tmp.glob("apns-*.pem")) == before

    wrong = app.model_copy(update={"cert_password": SecretStr("bad")})
    with pytest.raises(ConfigError, match="PKCS#12"):
        apns_auth.load_client_certificate(context(), wrong, 0)


def test_expired_certificate_is_refused_at_start(tmp_path: Path) -> None:
    """An expired push certificate stops start-up instead of failing every send."""
    key = make_key()
    cert = make_cert(key, days=10, start=datetime.now(UTC) - timedelta(days=20))
    path = tmp_path / "old.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + p8(key))
    app = ApnsApp(bundle_id="com.example.app", auth="certificate", cert_file=path)
    with pytest.raises(ConfigError, match="valid only"):
        apns_auth.load_client_certificate(context(), app, 2)


def test_certificate_file_without_key_is_refused(tmp_path: Path) -> None:
    """A PEM file missing its private key is reported with the setting to fix."""
    path = tmp_path / "cert-only.pem"
    path.write_bytes(make_cert(make_key()).public_bytes(serialization.Encoding.PEM))
    app = ApnsApp(bundle_id="com.example.app", auth="certificate", cert_file=path)
    with pytest.raises(ConfigError, match="PUSHSTREAM_APNS__1__CERT_FILE"):
        apns_auth.load_client_certificate(context(), app, 1)


def test_jwt_parts_are_unpadded_base64url() -> None:
    """The token has three unpadded base64url parts and a 64-byte raw signature."""
    token = ProviderToken("TEAM123456", "KEY1234567", make_key()).current()
    parts = token.split(".")
    assert len(parts) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in parts)
    assert len(base64.urlsafe_b64decode(parts[2] + "==")) == 64
