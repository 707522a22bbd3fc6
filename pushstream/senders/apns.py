"""Apple Push Notification service: request building, answers, and the client.

Three layers, the first two without I/O:

- :func:`render` turns a :class:`~pushstream.events.Notification` into the
  headers and JSON body of one APNs request (the router calls it);
- :func:`classify` turns APNs' answer (status, headers, body) into a
  :class:`~pushstream.senders.result.SendResult`, using :data:`REASONS`, the
  one table of every reason Apple documents;
- :class:`ApnsClient` adds authentication (a provider token or a client
  certificate, see :mod:`pushstream.senders.apns_auth`) and sends over
  pooled HTTP/2 connections.

Rules cited below are Apple's, as summarised in the project's protocol notes
("Sending notification requests to APNs", "Handling notification responses
from APNs").
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pushstream.events import Notification
from pushstream.senders.result import Rendered, ResultOutcome, SendResult, Target

PAYLOAD_LIMIT = 4096
VOIP_PAYLOAD_LIMIT = 5120
COLLAPSE_ID_MAX_BYTES = 64
PRIORITY_NOW = "10"
PRIORITY_POWER_AWARE = "5"

# apns-topic is the bundle id plus a suffix that depends on the push type.
TOPIC_SUFFIXES = {
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "location": ".location-query",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
}

# apns-id is derived from the send id, so a send made again after a crash
# carries the same id as the first attempt. The namespace is arbitrary but
# fixed forever: changing it changes every apns-id.
APNS_ID_NAMESPACE = uuid.UUID("6f1c1d3e-8a42-4e0c-9a57-2f6b0c2d9e11")

# Headers a notification's overrides may not set: the sender owns them.
_RESERVED_HEADERS = frozenset({"authorization", "content-length", "host"})

# APNs sends no Retry-After; after TooManyProviderTokenUpdates Apple advises
# to stop and wait, so the retry is pushed out at least this far.
TOKEN_UPDATES_BACKOFF_S = 60.0


def apns_id_for(send_id: str) -> str:
    """The apns-id of a send: a UUID (lowercase, 8-4-4-4-12) fixed by its id."""
    return str(uuid.uuid5(APNS_ID_NAMESPACE, send_id))


def collapse_id_for(key: str) -> str:
    """A collapse key as an apns-collapse-id of at most 64 bytes.

    Longer keys (UTF-8 can make 64 characters up to 256 bytes) are replaced
    by their SHA-256 in hex, exactly 64 bytes, so distinct keys stay distinct.
    """
    if len(key.encode()) <= COLLAPSE_ID_MAX_BYTES:
        return key
    return hashlib.sha256(key.encode()).hexdigest()


def render(
    n: Notification, target: Target, now_ms: int, expires_at_ms: int | None
) -> Rendered:
    """Build the APNs request of one notification for one device.

    The body is ``{"aps": {...}, <data keys>, <override keys>}``. A
    notification with nothing to show (no alert, badge or sound) is sent as
    a background push (``content-available: 1``, priority 5) so the app
    still receives its data. ``overrides.payload`` is merged last: its
    ``aps`` into the built one (a null value removes a key), its other keys
    at the top level; ``overrides.headers`` replace the built headers,
    except ``authorization``, which only the sender sets.

    ``expires_at_ms`` becomes apns-expiration in epoch seconds; a ttl of 0
    becomes ``0`` (deliver now or never). ``now_ms`` is accepted for the
    common signature of the providers' renderers; APNs takes absolute times.
    """
    overrides = n.apns
    aps = _aps(n)
    extra: dict[str, Any] = {}
    if overrides is not None:
        for key, value in overrides.payload.items():
            if key == "aps" and isinstance(value, dict):
                _merge_aps(aps, value)
            else:
                extra[key] = value

    push_type = overrides.push_type if overrides and overrides.push_type else None
    if push_type is None:
        push_type = "alert" if _shows_something(aps) else "background"
    if push_type == "background":
        aps.setdefault("content-available", 1)

    payload: dict[str, Any] = {"aps": aps}
    payload.update((k, v) for k, v in n.data.items() if k != "aps")
    payload.update((k, v) for k, v in extra.items() if k != "aps")
    body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))

    headers = _headers(n, target, push_type, expires_at_ms)
    if overrides is not None:
        for name, value in overrides.headers.items():
            name = name.lower()
            if name not in _RESERVED_HEADERS and not name.startswith(":"):
                headers[name] = value

    size = len(body.encode())
    limit = VOIP_PAYLOAD_LIMIT if push_type == "voip" else PAYLOAD_LIMIT
    too_large = None
    if size > limit:
        too_large = f"APNs payload is {size} bytes; the limit is {limit}"
    return Rendered(headers=headers, body=body, too_large=too_large)


def _aps(n: Notification) -> dict[str, Any]:
    alert: dict[str, Any] = {}
    for key, value in (
        ("title", n.title),
        ("subtitle", n.subtitle),
        ("body", n.body),
        ("title-loc-key", n.title_loc_key),
        ("title-loc-args", n.title_loc_args),
        ("loc-key", n.body_loc_key),
        ("loc-args", n.body_loc_args),
    ):
        if value is not None:
            alert[key] = value

    aps: dict[str, Any] = {}
    if alert:
        aps["alert"] = alert
    if n.badge is not None:
        aps["badge"] = n.badge
    for key, text in (
        ("sound", n.sound),
        ("thread-id", n.thread_id),
        ("category", n.category),
    ):
        if text is not None:
            aps[key] = text
    if n.content_available:
        aps["content-available"] = 1
    if n.mutable_content:
        aps["mutable-content"] = 1
    return aps


def _merge_aps(aps: dict[str, Any], given: Mapping[str, Any]) -> None:
    for key, value in given.items():
        if value is None:
            aps.pop(key, None)
        elif key == "alert" and isinstance(value, dict):
            current = aps.get("alert")
            merged = dict(current) if isinstance(current, dict) else {}
            merged.update(value)
            aps["alert"] = {k: v for k, v in merged.items() if v is not None}
        else:
            aps[key] = value


def _shows_something(aps: Mapping[str, Any]) -> bool:
    return any(key in aps for key in ("alert", "badge", "sound"))


def _headers(
    n: Notification, target: Target, push_type: str, expires_at_ms: int | None
) -> dict[str, str]:
    power_aware = push_type == "background" or n.priority == "normal"
    headers = {
        "apns-push-type": push_type,
        "apns-priority": PRIORITY_POWER_AWARE if power_aware else PRIORITY_NOW,
        "apns-topic": target.app + TOPIC_SUFFIXES.get(push_type, ""),
        "apns-id": apns_id_for(f"{n.id}:{target.device_id}"),
    }
    if n.ttl == 0:
        headers["apns-expiration"] = "0"
    elif expires_at_ms is not None:
        # Round up: a ttl of 1.5 s must not end before it started.
        headers["apns-expiration"] = str(-(-expires_at_ms // 1000))
    if n.collapse_key:
        headers["apns-collapse-id"] = collapse_id_for(n.collapse_key)
    return headers


# --- answers ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reason:
    """What one APNs reason means: its status, our outcome, and why."""

    status: int
    outcome: ResultOutcome
    meaning: str
    retry_after: float | None = None


_FIX = "the request is wrong; sending it again as is fails again"
_CONFIG = "pushstream's APNs configuration is wrong; fix it, don't resend"

# Every reason Apple documents, with what it means for the token and for
# retrying. ExpiredProviderToken is first handled inside the client (a fresh
# token and one more attempt); what reaches the table is the second refusal.
REASONS: dict[str, Reason] = {
    "BadCollapseId": Reason(400, "failed", _FIX),
    "BadDeviceToken": Reason(
        400, "invalid_token", "token malformed or of the other environment"
    ),
    "BadExpirationDate": Reason(400, "failed", _FIX),
    "BadMessageId": Reason(400, "failed", _FIX),
    "BadPriority": Reason(400, "failed", _FIX),
    "BadTopic": Reason(400, "failed", _CONFIG),
    "DeviceTokenNotForTopic": Reason(
        400, "invalid_token", "token belongs to another app or push type"
    ),
    "DuplicateHeaders": Reason(400, "failed", _FIX),
    "IdleTimeout": Reason(400, "retry", "connection idle too long; reconnect"),
    "InvalidPushType": Reason(400, "failed", _FIX),
    "MissingDeviceToken": Reason(400, "failed", _FIX),
    "MissingTopic": Reason(400, "failed", _CONFIG),
    "PayloadEmpty": Reason(400, "failed", _FIX),
    "TopicDisallowed": Reason(400, "failed", _CONFIG),
    "BadCertificate": Reason(403, "failed", _CONFIG),
    "BadCertificateEnvironment": Reason(403, "failed", _CONFIG),
    "ExpiredProviderToken": Reason(
        403, "retry", "provider token still refused after a refresh (clock skew?)"
    ),
    "Forbidden": Reason(403, "failed", "APNs refuses this action; don't retry"),
    "InvalidProviderToken": Reason(403, "failed", _CONFIG),
    "MissingProviderToken": Reason(403, "failed", _CONFIG),
    "UnrelatedKeyIdInToken": Reason(403, "retry", "key changed on a connection"),
    "BadEnvironmentKeyInToken": Reason(403, "failed", _CONFIG),
    "BadEnvironmentKeyIdInToken": Reason(403, "failed", _CONFIG),
    "BadPath": Reason(404, "failed", _FIX),
    "MethodNotAllowed": Reason(405, "failed", _FIX),
    "ExpiredToken": Reason(410, "invalid_token", "the device token expired"),
    "Unregistered": Reason(410, "invalid_token", "token no longer active for topic"),
    "PayloadTooLarge": Reason(413, "failed", "payload over APNs' size limit"),
    "TooManyProviderTokenUpdates": Reason(
        429,
        "retry",
        "the team's provider token changed too often; reuse it and wait",
        retry_after=TOKEN_UPDATES_BACKOFF_S,
    ),
    "TooManyRequests": Reason(429, "retry", "too many pushes to this device"),
    "InternalServerError": Reason(500, "retry", "APNs failed; retry with backoff"),
    "ServiceUnavailable": Reason(503, "retry", "APNs unavailable; retry later"),
    "Shutdown": Reason(503, "retry", "APNs server shutting down; reconnect"),
}

DELIVERED: Final = "delivered"


def classify(status: int, headers: Mapping[str, str], body: bytes) -> SendResult:
    """Turn APNs' answer to one request into a :class:`SendResult`.

    200 is ``delivered`` with the apns-id as ``provider_id``. Otherwise the
    body's ``reason`` is looked up in :data:`REASONS`; a reason Apple has
    not documented falls back on its status: 410 means the token is gone,
    429 and 5xx are retried, any other status fails. A 410's ``timestamp``
    (milliseconds, per Apple) becomes ``invalidated_at_ms``.
    """
    provider_id = headers.get("apns-id")
    if status == 200:
        return SendResult(DELIVERED, DELIVERED, status, provider_id)

    fields = _error_fields(body)
    reason = fields.get("reason")
    known = REASONS.get(reason) if isinstance(reason, str) else None
    if known is not None and isinstance(reason, str):
        outcome, name, retry_after = known.outcome, reason, known.retry_after
    else:
        outcome, name, retry_after = _fallback(status), _describe(reason, status), None

    retry_after = _retry_after(headers) or retry_after
    invalidated_at = None
    if outcome == "invalid_token":
        invalidated_at = _timestamp_ms(fields.get("timestamp"))
    return SendResult(
        outcome,
        name,
        status,
        provider_id,
        retry_after=retry_after if outcome == "retry" else None,
        invalidated_at_ms=invalidated_at,
    )


def reason_of(body: bytes) -> str | None:
    """The ``reason`` of an APNs error body (or GOAWAY debug data), if any."""
    reason = _error_fields(body).get("reason")
    return reason if isinstance(reason, str) else None


def _error_fields(body: bytes) -> dict[str, Any]:
    try:
        fields = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return fields if isinstance(fields, dict) else {}


def _fallback(status: int) -> ResultOutcome:
    if status == 410:
        return "invalid_token"
    if status == 429 or status >= 500:
        return "retry"
    if 200 <= status < 300:
        return "delivered"
    return "failed"


def _describe(reason: object, status: int) -> str:
    if isinstance(reason, str) and reason.isascii() and reason.isprintable():
        return reason[:64] or f"HTTP {status}"
    return f"HTTP {status}"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= 86_400 else None


def _timestamp_ms(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value) if value > 0 else None
