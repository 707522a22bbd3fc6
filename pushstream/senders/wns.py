"""Windows Push Notification Services (WNS): rendering, the answer table,
access tokens and the client.

WNS takes one HTTP/1.1 POST per notification to the device's *channel URI*
(PROTOCOLS.md 3.3): no chunked bodies, no pipelining, no
``Expect: 100-continue``, a body of at most 5000 bytes, and a bearer token
from the app's OAuth client-credentials grant (login.live.com for UWP apps,
Microsoft Entra ID for Windows App SDK apps).

The channel URI is the device's token, and it comes from a client: before
the bearer token goes to one, the URI must pass the channel allow-list
(:func:`pushstream.senders.allowlist.channel_problem`), the same check the
registry applies when the device registers. It is never logged in full.
"""

from __future__ import annotations

import email.utils
import json
import re
import time
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit
from xml.sax.saxutils import escape

from pushstream.events import Notification, WnsOverrides
from pushstream.senders.result import Rendered, ResultOutcome, SendResult, Target

MAX_BODY_BYTES = 5000  # WNS answers 413 above this (PROTOCOLS.md 3.3).
MAX_REASON_DETAIL = 200

_CONTENT_TYPES = {
    "toast": "text/xml",
    "tile": "text/xml",
    "badge": "text/xml",
    "raw": "application/octet-stream",
}
# X-WNS-PRIORITY: 1 high (the toast default), 2 medium (the tile/badge default).
_PRIORITIES = {"high": "1", "normal": "2"}
_DIGITS = re.compile("[0-9]+")
_SOUND_SCHEMES = ("ms-winsoundevent:", "ms-appx:", "ms-appdata:")
# Characters XML 1.0 cannot carry at all, escaped or not (and lone surrogates).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Fields a raw notification carries when no raw body is given.
_RAW_FIELDS = {
    "title",
    "subtitle",
    "body",
    "title_loc_key",
    "title_loc_args",
    "body_loc_key",
    "body_loc_args",
    "badge",
    "data",
}


# --- rendering ---------------------------------------------------------------------


def render(
    n: Notification, target: Target, now_ms: int, expires_at_ms: int | None
) -> Rendered:
    """Build the WNS headers (without Authorization) and body for one channel.

    The type is ``n.wns.type`` when given; otherwise a toast when there is
    text to show (title, subtitle or body) and a raw notification when there
    is none (a data-only push). A toast, tile or badge is built from the
    unified content unless ``n.wns.xml`` is given; a raw body is ``n.wns.raw``
    or, without it, the content as compact JSON. ``X-WNS-TTL`` is the time
    left until ``expires_at_ms``. ``too_large`` is set above 5000 bytes.
    """
    wns = n.wns or WnsOverrides()
    kind = _kind(n, wns)
    body = _body(n, wns, kind)
    headers = {
        "X-WNS-Type": f"wns/{kind}",
        "Content-Type": _CONTENT_TYPES[kind],
        "X-WNS-PRIORITY": _PRIORITIES[n.priority],
    }
    if expires_at_ms is not None:
        headers["X-WNS-TTL"] = str(ttl_seconds(expires_at_ms, now_ms))
    if wns.cache_policy:
        headers["X-WNS-Cache-Policy"] = wns.cache_policy
    if wns.tag:
        headers["X-WNS-Tag"] = wns.tag
    if wns.group:
        headers["X-WNS-Group"] = wns.group
    if wns.request_for_status:
        headers["X-WNS-RequestForStatus"] = "true"

    size = len(utf8(body))
    too_large = None
    if size > MAX_BODY_BYTES:
        too_large = f"the WNS body is {size} bytes; the limit is {MAX_BODY_BYTES}"
    return Rendered(headers=headers, body=body, too_large=too_large)


def ttl_seconds(expires_at_ms: int, now_ms: int) -> int:
    """Whole seconds left, at least 1: WNS has no "now or never" value, and
    one second is the closest to it."""
    return max(1, (expires_at_ms - now_ms) // 1000)


def utf8(body: str) -> bytes:
    """The bytes WNS receives for a body (a lone surrogate becomes U+FFFD)."""
    return body.encode("utf-8", "replace")


def _kind(n: Notification, wns: WnsOverrides) -> str:
    if "type" in wns.model_fields_set:
        return wns.type
    if wns.xml is not None or n.title or n.subtitle or n.body:
        return "toast"
    return "raw"


def _body(n: Notification, wns: WnsOverrides, kind: str) -> str:
    if kind == "raw":
        if wns.raw is not None:
            return wns.raw
        content = n.model_dump(include=_RAW_FIELDS, exclude_none=True)
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    if wns.xml is not None:
        return wns.xml
    if kind == "tile":
        return tile_xml(n)
    if kind == "badge":
        return badge_xml(n)
    return toast_xml(n)


def toast_xml(n: Notification) -> str:
    """A ToastGeneric toast: title, subtitle and body lines, a hero image, and
    the data as the launch arguments (a query string the app receives when
    the user taps it). Every value is XML-escaped."""
    launch = f" launch={_attr(urlencode(n.data))}" if n.data else ""
    parts = [f"<text>{_text(line)}</text>" for line in _lines(n)]
    if n.image:
        parts.append(f'<image placement="hero" src={_attr(n.image)}/>')
    audio = ""
    if n.sound and n.sound.startswith(_SOUND_SCHEMES):
        audio = f"<audio src={_attr(n.sound)}/>"
    binding = '<binding template="ToastGeneric">' + "".join(parts) + "</binding>"
    return f"<toast{launch}><visual>{binding}</visual>{audio}</toast>"


def tile_xml(n: Notification) -> str:
    """An adaptive tile (medium and wide) with the title and body."""
    texts = ""
    if n.title:
        texts += f'<text hint-style="subtitle">{_text(n.title)}</text>'
    if n.body:
        texts += (
            f'<text hint-style="captionSubtle" hint-wrap="true">{_text(n.body)}</text>'
        )
    bindings = "".join(
        f'<binding template="{template}">{texts}</binding>'
        for template in ("TileMedium", "TileWide")
    )
    return f"<tile><visual>{bindings}</visual></tile>"


def badge_xml(n: Notification) -> str:
    """A numeric badge; without ``badge`` the value "none" clears it."""
    value = "none" if n.badge is None else str(n.badge)
    return f'<badge value="{value}"/>'


def _lines(n: Notification) -> list[str]:
    return [line for line in (n.title, n.subtitle, n.body) if line]


def _text(value: str) -> str:
    # A parser turns a literal CR into LF; the reference keeps it.
    return escape(_NOT_XML.sub("", value), {"\r": "&#13;"})


def _attr(value: str) -> str:
    # Attribute values are normalized too: keep whitespace by reference.
    entities = {'"': "&quot;", "\r": "&#13;", "\n": "&#10;", "\t": "&#9;"}
    return '"' + escape(_NOT_XML.sub("", value), entities) + '"'


# --- classifying -------------------------------------------------------------------

# Every documented status (PROTOCOLS.md 3.5): what it means for the channel and
# for retrying. A 401 reaches this table only when a fresh token was refused
# too: the client first fetches a new token and tries once more.
STATUS_TABLE: dict[int, tuple[ResultOutcome, str]] = {
    400: ("failed", "bad_request"),  # headers wrong or conflicting: fix the sender
    401: ("failed", "unauthorized"),  # access token invalid even after a refresh
    403: ("failed", "forbidden"),  # the token's app is not the channel's app
    404: ("invalid_token", "channel_not_found"),  # delete the channel
    405: ("failed", "method_not_allowed"),
    406: ("retry", "throttled"),  # this sender is over its rate
    410: ("invalid_token", "channel_expired"),  # delete the channel
    413: ("failed", "payload_too_large"),
    500: ("retry", "internal_error"),
    503: ("retry", "unavailable"),
}

# X-WNS-Status of a 200 answer (PROTOCOLS.md 3.4). "received" means WNS took
# the notification, not that the device showed it.
WNS_STATUS_TABLE: dict[str, tuple[ResultOutcome, str]] = {
    "received": ("delivered", "received"),
    "dropped": ("dropped", "dropped"),  # offline device, or the client refused it
    "channelthrottled": ("retry", "channel_throttled"),  # this channel's rate
}


def classify(status: int, headers: Mapping[str, str], body: bytes) -> SendResult:
    """Turn one WNS answer into a :class:`SendResult`.

    ``provider_id`` is ``X-WNS-Msg-ID``. ``retry_after`` comes from
    ``Retry-After`` (seconds or an HTTP date) or, as older WNS servers send
    it, ``X-WNS-CONTINUE-AFTER``. A failure's reason is the code, then
    ``": "`` and WNS's ``X-WNS-Error-Description`` when it gave one. A 410 that
    says "domain blocked" blocks the sender, not the channel: it fails
    without invalidating the channel. An undocumented status is retried when
    it is 429 or 5xx and fails otherwise.
    """
    h = {name.lower(): value for name, value in headers.items()}
    msg_id = h.get("x-wns-msg-id") or None
    if status == 200:
        wns_status = h.get("x-wns-status", "").strip().lower()
        outcome, reason = WNS_STATUS_TABLE.get(wns_status, ("delivered", "accepted"))
        retry_after = _retry_after(h) if outcome == "retry" else None
        return SendResult(outcome, reason, status, msg_id, retry_after)

    described = _detail(h.get("x-wns-error-description", ""))
    if status == 401 and "token expired" in h.get("www-authenticate", "").lower():
        outcome, reason = "failed", "token_expired"
    elif status == 410 and _domain_blocked(described, body):
        outcome, reason = "failed", "domain_blocked"
    elif status in STATUS_TABLE:
        outcome, reason = STATUS_TABLE[status]
    elif status == 429 or status >= 500:
        outcome, reason = "retry", f"http_{status}"
    else:
        outcome, reason = "failed", f"http_{status}"

    if described and outcome == "failed":
        reason = f"{reason}: {described}"
    retry_after = _retry_after(h) if outcome == "retry" else None
    return SendResult(outcome, reason, status, msg_id, retry_after)


def _detail(text: str) -> str:
    return " ".join(_NOT_XML.sub("", text).split())[:MAX_REASON_DETAIL]


def _domain_blocked(described: str, body: bytes) -> bool:
    text = described.lower() + " " + body[:1000].decode("utf-8", "replace").lower()
    return "domain blocked" in text


def _retry_after(h: Mapping[str, str]) -> float | None:
    for name in ("retry-after", "x-wns-continue-after"):
        seconds = parse_retry_after(h.get(name, ""))
        if seconds is not None:
            return seconds
    return None


def parse_retry_after(value: str, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delta seconds or an HTTP
    date, RFC 9110 10.2.3); None when it is absent or unreadable."""
    value = value.strip()
    if not value:
        return None
    if _DIGITS.fullmatch(value):
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, moment.timestamp() - now)


def shorten_channel(uri: str) -> str:
    """A channel URI fit for logs: its host and the first 8 characters of its
    token, never the whole URI (the URI *is* the device's token)."""
    try:
        parts = urlsplit(uri)
        host = parts.hostname or "?"
    except ValueError:
        return uri[:8] + "…"
    token = dict(parse_qsl(parts.query)).get("token", parts.path.lstrip("/"))
    return f"{host}/{token[:8]}…"
