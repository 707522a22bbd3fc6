"""WNS rendering and answer classification, without any network."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl
from xml.etree import ElementTree

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushstream.config import ConfigError, Endpoints, Settings, WnsApp
from pushstream.events import Notification, Send
from pushstream.senders import wns, wns_auth
from pushstream.senders.oauth import TokenError
from pushstream.senders.result import SendResult, Target

CHANNEL = "https://db3.notify.windows.com/?token=AwYAAAB3secretpart"
TARGET = Target(platform="wns", token=CHANNEL, app="Contoso.App", device_id="d1")
NOW_MS = 1_700_000_000_000


def note(**fields: Any) -> Notification:
    fields.setdefault("id", "n1")
    return Notification.model_validate(fields)


def texts(xml: str) -> list[str]:
    return [el.text or "" for el in ElementTree.fromstring(xml).iter("text")]


# --- render ------------------------------------------------------------------------


def test_toast_is_the_default_with_title_and_body() -> None:
    """A plain notification would not show up as a Windows toast."""
    r = wns.render(note(title="Hi", body="There"), TARGET, NOW_MS, None)

    assert r.headers["X-WNS-Type"] == "wns/toast"
    assert r.headers["Content-Type"] == "text/xml"
    assert texts(r.body) == ["Hi", "There"]
    assert r.too_large is None


def test_toast_carries_image_and_data_as_launch_arguments() -> None:
    """Tapping a toast would not hand the app its data, or the image would be lost."""
    n = note(title="t", image="https://cdn.example/a.png?x=1&y=2", data={"a": "1&2"})
    toast = ElementTree.fromstring(wns.render(n, TARGET, NOW_MS, None).body)

    assert dict(parse_qsl(toast.attrib["launch"])) == {"a": "1&2"}
    image = toast.find("./visual/binding/image")
    assert image is not None
    assert image.attrib["src"] == "https://cdn.example/a.png?x=1&y=2"


@given(
    title=st.text(max_size=50),
    body=st.text(max_size=50),
    data=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)
def test_any_text_makes_well_formed_toast_xml(
    title: str, body: str, data: dict[str, str]
) -> None:
    """A quote, ampersand or control character in a title would break the toast."""
    n = note(title="T" + title, body="B" + body, data=data)
    toast = ElementTree.fromstring(wns.render(n, TARGET, NOW_MS, None).body)

    shown = [el.text or "" for el in toast.iter("text")]
    # XML cannot carry control characters: they are left out, the rest is kept.
    assert shown == [
        wns._NOT_XML.sub("", "T" + title),
        wns._NOT_XML.sub("", "B" + body),
    ]
    # The launch arguments are percent-encoded: the data comes back exactly.
    launch = toast.attrib.get("launch", "")
    assert dict(parse_qsl(launch, keep_blank_values=True)) == data


def test_given_xml_is_sent_as_is() -> None:
    """A hand-written toast XML would be replaced by a generated one."""
    xml = '<toast><visual><binding template="ToastGeneric"/></visual></toast>'
    r = wns.render(note(title="ignored", wns={"xml": xml}), TARGET, NOW_MS, None)

    assert r.body == xml
    assert r.headers["X-WNS-Type"] == "wns/toast"


def test_raw_uses_octet_stream_and_the_given_body() -> None:
    """A raw notification would reach the app with the wrong type or body."""
    r = wns.render(note(wns={"type": "raw", "raw": "ping"}), TARGET, NOW_MS, None)

    assert r.headers["X-WNS-Type"] == "wns/raw"
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.body == "ping"


def test_a_raw_body_makes_a_raw_notification() -> None:
    """A raw body given for Windows would be dropped in favour of a toast."""
    r = wns.render(note(title="t", wns={"raw": "ping"}), TARGET, NOW_MS, None)

    assert (r.headers["X-WNS-Type"], r.body) == ("wns/raw", "ping")


def test_data_only_notification_becomes_raw_json() -> None:
    """A silent data push would show an empty toast on Windows."""
    r = wns.render(note(data={"k": "v"}, badge=3), TARGET, NOW_MS, None)

    assert r.headers["X-WNS-Type"] == "wns/raw"
    assert json.loads(r.body) == {"data": {"k": "v"}, "badge": 3}


def test_tile_and_badge_are_built_from_content() -> None:
    """A tile or badge update would carry the wrong text or count."""
    tile = wns.render(note(title="T", body="B", wns={"type": "tile"}), TARGET, 0, None)
    badge = wns.render(note(title="T", badge=7, wns={"type": "badge"}), TARGET, 0, None)

    assert tile.headers["X-WNS-Type"] == "wns/tile"
    assert texts(tile.body) == ["T", "B", "T", "B"]  # medium and wide bindings
    assert badge.headers["X-WNS-Type"] == "wns/badge"
    assert ElementTree.fromstring(badge.body).attrib == {"value": "7"}


def test_optional_headers_follow_the_overrides() -> None:
    """Tags, groups, cache policy or a status request would not reach WNS."""
    n = note(
        title="t",
        priority="normal",
        wns={
            "type": "tile",
            "tag": "score",
            "group": "games",
            "cache_policy": "no-cache",
            "request_for_status": True,
        },
    )
    h = wns.render(n, TARGET, NOW_MS, None).headers

    assert h["X-WNS-Tag"] == "score"
    assert h["X-WNS-Group"] == "games"
    assert h["X-WNS-Cache-Policy"] == "no-cache"
    assert h["X-WNS-RequestForStatus"] == "true"
    assert h["X-WNS-PRIORITY"] == "2"


def test_defaults_leave_optional_headers_out() -> None:
    """WNS would get headers nobody asked for (a TTL on a notification without one)."""
    h = wns.render(note(title="t"), TARGET, NOW_MS, None).headers

    assert set(h) == {"X-WNS-Type", "Content-Type", "X-WNS-PRIORITY"}
    assert h["X-WNS-PRIORITY"] == "1"


@pytest.mark.parametrize(
    ("left_ms", "ttl"), [(3_600_000, "3600"), (1_500, "1"), (999, "1"), (-5, "1")]
)
def test_ttl_is_the_time_left(left_ms: int, ttl: str) -> None:
    """A notification would outlive its TTL in WNS's offline cache."""
    r = wns.render(note(title="t"), TARGET, NOW_MS, NOW_MS + left_ms)

    assert r.headers["X-WNS-TTL"] == ttl


def test_now_or_never_has_no_ttl_and_is_not_cached() -> None:
    """A ttl 0 toast would wait in WNS's cache for an offline device."""
    n = note(title="t", ttl=0, wns={"cache_policy": "cache"})
    h = wns.render(n, TARGET, NOW_MS, NOW_MS + 30_000).headers

    assert "X-WNS-TTL" not in h
    assert h["X-WNS-Cache-Policy"] == "no-cache"


def test_a_retried_now_or_never_send_gets_no_ttl() -> None:
    """The client would give a ttl 0 toast a TTL of its grace period on a retry."""
    send = Send(
        send_id="n1:d1",
        notification_id="n1",
        device_id="d1",
        platform="wns",
        app="Contoso.App",
        token=CHANNEL,
        attempt=2,
        accepted_at_ms=NOW_MS,
        expires_at_ms=NOW_MS + 30_000,
        now_or_never=True,
        headers={"X-WNS-Type": "wns/toast", "X-WNS-Cache-Policy": "no-cache"},
        body="<toast/>",
    )
    assert "X-WNS-TTL" not in wns._request_headers(send)
    timed = send.model_copy(update={"now_or_never": False})
    assert "X-WNS-TTL" in wns._request_headers(timed)


def test_body_over_5000_bytes_is_too_large() -> None:
    """An oversized toast would be sent and refused with 413 instead of rejected."""
    fits = wns.render(note(wns={"type": "raw", "raw": "x" * 5000}), TARGET, 0, None)
    # 2501 two-byte characters: 2501 characters, but 5002 bytes.
    over = wns.render(note(wns={"type": "raw", "raw": "é" * 2501}), TARGET, 0, None)

    assert fits.too_large is None
    assert over.too_large is not None
    assert "5002" in over.too_large


# --- classify ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wns_status", "outcome", "reason"),
    [
        ("received", "delivered", "received"),
        ("dropped", "dropped", "dropped"),
        ("channelthrottled", "retry", "channel_throttled"),
        ("RECEIVED", "delivered", "received"),
    ],
)
def test_200_follows_x_wns_status(wns_status: str, outcome: str, reason: str) -> None:
    """A dropped or throttled toast would be counted as delivered."""
    headers = {"X-WNS-Status": wns_status, "X-WNS-Msg-ID": "3CE38FF109E03A74"}
    result = wns.classify(200, headers, b"")

    assert (result.outcome, result.reason, result.status) == (outcome, reason, 200)
    assert result.provider_id == "3CE38FF109E03A74"


@pytest.mark.parametrize(
    ("status", "outcome", "reason"),
    [
        (400, "failed", "bad_request"),
        (401, "failed", "unauthorized"),
        (403, "failed", "forbidden"),
        (404, "invalid_token", "channel_not_found"),
        (405, "failed", "method_not_allowed"),
        (406, "retry", "throttled"),
        (410, "invalid_token", "channel_expired"),
        (413, "failed", "payload_too_large"),
        (500, "retry", "internal_error"),
        (503, "retry", "unavailable"),
        (429, "retry", "http_429"),
        (502, "retry", "http_502"),
        (418, "failed", "http_418"),
    ],
)
def test_every_status_has_an_outcome(status: int, outcome: str, reason: str) -> None:
    """A dead channel would be retried forever, or a throttled send given up."""
    result = wns.classify(status, {}, b"")

    assert (result.outcome, result.reason, result.status) == (outcome, reason, status)


def test_failure_reason_carries_the_error_description() -> None:
    """An operator would not learn which header WNS refused."""
    headers = {"x-wns-error-description": "Invalid X-WNS-Type\r\n header"}
    result = wns.classify(400, headers, b"")

    assert result.reason == "bad_request: Invalid X-WNS-Type header"


def test_expired_token_401_is_named() -> None:
    """A persistent token-expired 401 would look like a wrong secret."""
    headers = {"WWW-Authenticate": 'Bearer error="invalid_token", Token expired'}

    assert wns.classify(401, headers, b"").reason == "token_expired"


def test_domain_blocked_410_does_not_invalidate_the_channel() -> None:
    """A blocked sending domain would wipe every Windows device from the table."""
    headers = {"X-WNS-Error-Description": "Domain Blocked"}
    result = wns.classify(410, headers, b"")

    assert result.outcome == "failed"
    assert result.reason.startswith("domain_blocked")


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"Retry-After": "30"}, 30.0),
        ({"X-WNS-CONTINUE-AFTER": "12"}, 12.0),
        ({"Retry-After": "7", "X-WNS-CONTINUE-AFTER": "12"}, 7.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_throttling_honours_retry_after(
    headers: dict[str, str], seconds: float | None
) -> None:
    """A throttled sender would retry before WNS allows it."""
    result = wns.classify(406, headers, b"")

    assert result == SendResult("retry", "throttled", 406, None, seconds)


def test_retry_after_as_an_http_date() -> None:
    """A 503 with a date in Retry-After would be retried at once."""
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=90), usegmt=True)

    assert wns.parse_retry_after(later, now=now.timestamp()) == 90.0
    assert wns.parse_retry_after("²") is None


def test_shortened_channel_hides_the_token() -> None:
    """A device's channel URI would be written to the logs."""
    short = wns.shorten_channel(CHANNEL)

    assert short == "db3.notify.windows.com/AwYAAAB3…"
    assert "secretpart" not in short
    assert wns.shorten_channel("https://[::1") == "https://…"


# --- access tokens and settings ----------------------------------------------------

LIVE = WnsApp(package="Contoso.App", client_id="ms-app://S-1-15-2-1", auth="live")
ENTRA = WnsApp(
    package="Contoso.Desk", client_id="0000-app", auth="entra", tenant_id="t/1"
)


def test_live_token_request() -> None:
    """A UWP app's token request would go to the wrong place or ask the wrong scope."""
    url, form = wns_auth.token_request(LIVE, "s3cret", Endpoints())

    assert url == "https://login.live.com/accesstoken.srf"
    assert form == {
        "grant_type": "client_credentials",
        "client_id": "ms-app://S-1-15-2-1",
        "client_secret": "s3cret",
        "scope": "notify.windows.com",
    }


def test_entra_token_request() -> None:
    """A Windows App SDK app would ask login.live.com, which cannot serve it."""
    url, form = wns_auth.token_request(ENTRA, "s3cret", Endpoints())

    assert url == "https://login.microsoftonline.com/t%2F1/oauth2/v2.0/token"
    assert form["scope"] == "https://wns.windows.com/.default"
    assert form["client_id"] == "0000-app"


@pytest.mark.parametrize("expires_in", [86400, "86399", 3599.5])
def test_token_answer_with_numeric_or_string_lifetime(expires_in: object) -> None:
    """Entra's string-typed expires_in would make every token fetch fail."""
    body = json.dumps({"access_token": "tok", "expires_in": expires_in}).encode()

    token, lifetime = wns_auth.parse_token(200, body)

    assert token == "tok"
    assert lifetime == float(str(expires_in))


@pytest.mark.parametrize(
    ("status", "body", "retriable"),
    [
        (400, b'{"error": "invalid_client"}', False),
        (401, b'{"error": "invalid_client"}', False),
        (503, b"", True),
        (200, b"<html>", True),
        (200, b'{"access_token": "t", "expires_in": "soon"}', True),
        (200, b'{"access_token": "t", "expires_in": true}', True),
        (200, b'{"expires_in": 10}', True),
    ],
)
def test_token_failures(status: int, body: bytes, retriable: bool) -> None:
    """A wrong secret would be retried forever, or an outage called a config error."""
    with pytest.raises(TokenError) as caught:
        wns_auth.parse_token(status, body)

    assert caught.value.retriable is retriable


def settings_with(*apps: dict[str, object]) -> Settings:
    return Settings.model_validate({"wns": apps})


@pytest.mark.parametrize(
    ("apps", "setting"),
    [
        ([{"package": "A", "client_id": "c"}], "PUSHSTREAM_WNS__0__CLIENT_SECRET"),
        (
            [
                {"package": "A", "client_id": "c", "client_secret": "s"},
                {
                    "package": "B",
                    "client_id": "c",
                    "auth": "entra",
                    "client_secret": "s",
                },
            ],
            "PUSHSTREAM_WNS__1__TENANT_ID",
        ),
        (
            [
                {"package": "A", "client_id": "c", "client_secret": "s"},
                {"package": "A", "client_id": "d", "client_secret": "s"},
            ],
            "PUSHSTREAM_WNS__1__PACKAGE",
        ),
    ],
)
def test_bad_app_settings_name_the_setting(
    apps: list[dict[str, object]], setting: str
) -> None:
    """A misconfigured app would fail at its first send instead of at start-up."""
    with pytest.raises(ConfigError, match=setting):
        wns.WnsClient.from_settings(settings_with(*apps))


@pytest.mark.parametrize(
    ("uri", "trusted"),
    [
        ("https://db3.notify.windows.com/?token=AwYAAAB", True),
        ("https://db3.notify.windows.com:443/?token=AwYAAAB", True),
        ("https://127.0.0.1:8443/?token=x", True),
        ("https://127.0.0.1:8444/?token=x", False),
        ("http://db3.notify.windows.com/?token=x", False),
        ("https://db3.notify.windows.com.evil.example/?token=x", False),
        ("https://evil.example\\@db3.notify.windows.com/", False),
        ("https://a..notify.windows.com/?token=x", False),
        ("https://" + "a" * 64 + ".notify.windows.com/?token=x", False),
    ],
)
def test_channel_url_follows_the_allow_list(uri: str, trusted: bool) -> None:
    """The app's bearer token would be sent to a host that is not WNS."""
    settings = Settings.model_validate({"wns_allowed_hosts": ["127.0.0.1:8443"]})
    client = wns.WnsClient.from_settings(settings)

    assert (client.channel_url(uri) is not None) is trusted


@pytest.mark.parametrize(
    ("uri", "where"),
    [
        (
            "https://DB3.notify.windows.com/?token=AwYAAAB%2Fx",
            ("db3.notify.windows.com", 443, "/?token=AwYAAAB%2Fx"),
        ),
        (
            "https://127.0.0.1:8443/p/q?token=x&b=1",
            ("127.0.0.1", 8443, "/p/q?token=x&b=1"),
        ),
        ("https://127.0.0.1:8443?token=x", ("127.0.0.1", 8443, "/?token=x")),
        (
            "https://127.0.0.1:8443/?token=caf\u00e9",
            ("127.0.0.1", 8443, "/?token=caf%C3%A9"),
        ),
    ],
)
def test_channel_url_keeps_the_uri_as_written(
    uri: str, where: tuple[str, int, str]
) -> None:
    """A channel URI would be rewritten (WNS treats it as opaque) or sent to
    another host than the one the allow-list checked."""
    settings = Settings.model_validate({"wns_allowed_hosts": ["127.0.0.1:8443"]})
    client = wns.WnsClient.from_settings(settings)

    assert client.channel_url(uri) == where
