"""Checking the body of an FCM v1 ``messages:send`` request as FCM does.

:func:`parse_body` reads the request's JSON; :func:`check_message` refuses
what FCM refuses in its ``message``: a field FCM does not know, not exactly
one of token, topic and condition, a malformed topic, ``data`` values that
are not strings or keys FCM reserves, headers and notification fields that
are not strings, an Android ``ttl`` or ``priority`` FCM cannot read, and a
message over 4096 bytes (2048 to a topic or condition) as FCM counts them.
A refusal raises :class:`~pushstream.sandbox.fcm_answers.Refusal` with a
400 INVALID_ARGUMENT answer, carrying the ``google.rpc.BadRequest`` field
violation where FCM gives one. No I/O: pure checks of what they are given.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pushstream.sandbox.fcm_answers import (
    BAD_REQUEST,
    Refusal,
    fcm_error,
    rpc_error,
)

MAX_MESSAGE_BYTES = 4096
MAX_TOPIC_MESSAGE_BYTES = 2048
MAX_TTL_S = 2_419_200  # four weeks
# A message's size is that of its compact JSON, which is at most 4.5 times
# the text it was read from: whitespace and escapes only shrink, and the
# number that grows most is 1e15 (4 bytes, written 1000000000000000.0).
MAX_JSON_GROWTH = 5

_TOPIC = re.compile(r"^[A-Za-z0-9\-_.~%]{1,900}$")
_DURATION = re.compile(r"^(\d+)(\.\d{1,9})?s$")
_RESERVED_DATA = ("from", "message_type")
_RESERVED_PREFIXES = ("google.", "gcm.")


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The fields FCM knows, per object; anything else is "Unknown name".
_FIELDS = {
    "message": _names(
        "name data notification android webpush apns fcm_options token topic condition"
    ),
    "message.notification": _names("title body image"),
    "message.android": _names(
        "collapse_key priority ttl restricted_package_name data notification "
        "fcm_options direct_boot_ok bandwidth_constrained_ok restricted_satellite_ok"
    ),
    "message.android.notification": _names(
        "title body icon color sound tag click_action body_loc_key body_loc_args "
        "title_loc_key title_loc_args channel_id ticker sticky event_time "
        "local_only notification_priority default_sound default_vibrate_timings "
        "default_light_settings vibrate_timings visibility notification_count "
        "light_settings image bypass_proxy_notification proxy"
    ),
    "message.apns": _names("headers payload fcm_options live_activity_token"),
    "message.webpush": _names("headers data notification fcm_options"),
    "message.fcm_options": _names("analytics_label"),
}


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body: a JSON object with a ``message`` object and maybe
    ``validate_only``, and nothing else."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise _invalid_json(
            "Invalid JSON payload received. Unexpected token."
        ) from None
    if not isinstance(body, dict):
        raise _invalid_json("Invalid JSON payload received. Expected an object.")
    for name in body:
        if name not in ("message", "validate_only"):
            raise _invalid_json(
                "Invalid JSON payload received. "
                f'Unknown name "{name}": Cannot find field.'
            )
    if not isinstance(body.get("message"), dict):
        raise _bad_field("message", "The message is missing.")
    return body


def check_message(message: dict[str, Any], body_size: int) -> None:
    """400 for what FCM refuses in a message; ``body_size`` is the request
    body's length in bytes."""
    _known_fields("message", message)
    targets = [name for name in ("token", "topic", "condition") if name in message]
    if len(targets) != 1:
        raise _bad_field(
            "message", "Exactly one of token, topic or condition must be specified."
        )
    target = targets[0]
    if not isinstance(message[target], str):
        raise _bad_field(f"message.{target}", f"Invalid value at 'message.{target}'")
    if target == "topic" and not _TOPIC.match(message["topic"]):
        raise _bad_field("message.topic", "Invalid topic name.")

    _check_data("message.data", message.get("data"))
    _check_strings("message.notification", message.get("notification"))
    android = message.get("android")
    if android is not None:
        _check_android(android)
    apns = message.get("apns")
    if apns is not None:
        _known_fields("message.apns", apns)
        _string_map("message.apns.headers", apns.get("headers"))
        if "payload" in apns and not isinstance(apns["payload"], dict):
            raise _bad_field(
                "message.apns.payload", "The APNs payload is not an object."
            )
    webpush = message.get("webpush")
    if webpush is not None:
        _known_fields("message.webpush", webpush)
        _string_map("message.webpush.headers", webpush.get("headers"))
        _check_data("message.webpush.data", webpush.get("data"))
    if message.get("fcm_options") is not None:
        _known_fields("message.fcm_options", message["fcm_options"])

    limit = MAX_MESSAGE_BYTES if target == "token" else MAX_TOPIC_MESSAGE_BYTES
    if body_size * MAX_JSON_GROWTH <= limit:
        return  # too small to be too big: no need to measure it
    counted = {
        k: v for k, v in message.items() if k not in ("token", "topic", "condition")
    }
    size = len(json.dumps(counted, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limit:
        raise Refusal(
            fcm_error(
                400,
                "INVALID_ARGUMENT",
                f"Message is too big: {size} bytes, the limit is {limit}.",
            )
        )


def _check_android(android: Any) -> None:
    _known_fields("message.android", android)
    priority = android.get("priority")
    if priority is not None and (
        not isinstance(priority, str) or priority.upper() not in ("NORMAL", "HIGH")
    ):
        raise _bad_field(
            "message.android.priority",
            "Invalid value at 'message.android.priority' "
            f"(type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), "
            f"{json.dumps(priority)}",
        )
    ttl = android.get("ttl")
    if ttl is not None:
        match = _DURATION.match(ttl) if isinstance(ttl, str) else None
        if match is None or int(match.group(1)) > MAX_TTL_S:
            raise _bad_field(
                "message.android.ttl",
                "Invalid value at 'message.android.ttl' "
                f"(type.googleapis.com/google.protobuf.Duration), {json.dumps(ttl)}",
            )
    _check_data("message.android.data", android.get("data"))
    notification = android.get("notification")
    if notification is not None:
        _known_fields("message.android.notification", notification)


def _check_data(where: str, data: Any) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise _bad_field(where, f"Invalid value at '{where}'")
    for index, (key, value) in enumerate(data.items()):
        if not isinstance(value, str):
            field_name = f"{where}[{index}].value"
            raise _bad_field(
                field_name,
                f"Invalid value at '{field_name}' (TYPE_STRING), {json.dumps(value)}",
            )
        if key in _RESERVED_DATA or key.startswith(_RESERVED_PREFIXES):
            raise _bad_field(where, f"Invalid data payload key: {key}")


def _check_strings(where: str, value: Any) -> None:
    if value is None:
        return
    _known_fields(where, value)
    for name, item in value.items():
        if not isinstance(item, str):
            raise _bad_field(f"{where}.{name}", f"Invalid value at '{where}.{name}'")


def _string_map(where: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise _bad_field(where, f"Invalid value at '{where}'")
    for index, item in enumerate(value.values()):
        if not isinstance(item, str):
            field_name = f"{where}[{index}].value"
            raise _bad_field(
                field_name, f"Invalid value at '{field_name}' (TYPE_STRING)"
            )


def _known_fields(where: str, value: Any) -> None:
    if not isinstance(value, dict):
        raise _bad_field(where, f"Invalid value at '{where}'")
    for name in value:
        if name not in _FIELDS[where]:
            raise _invalid_json(
                f'Invalid JSON payload received. Unknown name "{name}" at '
                f"'{where}': Cannot find field.",
                where,
            )


def _bad_field(field_name: str, description: str) -> Refusal:
    violation = {"field": field_name, "description": description}
    return Refusal(
        rpc_error(
            400,
            "INVALID_ARGUMENT",
            description,
            [{"@type": BAD_REQUEST, "fieldViolations": [violation]}],
        )
    )


def _invalid_json(description: str, field_name: str = "") -> Refusal:
    violation = {"description": description}
    if field_name:
        violation = {"field": field_name, **violation}
    return Refusal(
        rpc_error(
            400,
            "INVALID_ARGUMENT",
            description,
            [{"@type": BAD_REQUEST, "fieldViolations": [violation]}],
        )
    )
