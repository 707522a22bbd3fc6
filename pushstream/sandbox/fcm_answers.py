"""What the FCM stand-in answers: Google's error envelopes, and the
scripted answer of each scenario token.

Errors of the send endpoint use the ``google.rpc.Status`` envelope
(:func:`rpc_error`), with the ``FcmError`` detail where FCM puts one
(:func:`fcm_error`; PROTOCOLS.md 2.4-2.5). A check that refuses a send
raises :class:`Refusal` with its answer. :func:`scenario_of` reads the
scenario a registration token asks for, and :data:`SCENARIO_ANSWERS` holds
what each answers (the table is in :mod:`pushstream.sandbox.fcm`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from pushstream.sandbox.server import Response

FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
APNS_ERROR = "type.googleapis.com/google.firebase.fcm.v1.ApnsError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


class Refusal(Exception):
    """A send refused with a google.rpc.Status error."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


def rpc_error(
    code: int,
    status: str,
    message: str,
    details: Sequence[dict[str, Any]] = (),
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    """A ``google.rpc.Status`` error answer: HTTP ``code``, ``status`` (its
    name, e.g. NOT_FOUND), ``message`` and ``details``."""
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = list(details)
    return json_answer(code, {"error": error}, headers)


def fcm_error(
    code: int,
    error_code: str,
    message: str,
    status: str | None = None,
    extra: Sequence[dict[str, Any]] = (),
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    """A ``google.rpc.Status`` error whose details start with the
    ``FcmError`` ``error_code``; ``status`` defaults to ``error_code``."""
    details = [{"@type": FCM_ERROR, "errorCode": error_code}, *extra]
    return rpc_error(code, status or error_code, message, details, headers=headers)


def error_info(reason: str, domain: str, **metadata: str) -> dict[str, Any]:
    """A ``google.rpc.ErrorInfo`` detail of the FCM service."""
    info: dict[str, Any] = {"@type": ERROR_INFO, "reason": reason, "domain": domain}
    info["metadata"] = {"service": "fcm.googleapis.com", **metadata}
    return info


def json_answer(
    code: int, body: dict[str, Any], headers: Sequence[tuple[str, str]] = ()
) -> Response:
    """A JSON answer, with the content type Google gives its own."""
    return Response(
        code,
        [("content-type", "application/json; charset=UTF-8"), *headers],
        json.dumps(body).encode(),
    )


# --- scenario tokens ----------------------------------------------------------

SCENARIOS = (
    "unregistered",
    "invalid-token",
    "sender-id-mismatch",
    "third-party-auth",
    "internal",
    "unavailable",
    "quota",
    "quota-plain",
    "slow",
)

# Longest first: "quota-plain-…" is not "quota-…".
_SCENARIOS_LONGEST_FIRST = sorted(SCENARIOS, key=len, reverse=True)
_SCENARIO_PREFIXES = tuple(f"{name}-" for name in SCENARIOS)
_TOKEN = re.compile(r"^[A-Za-z0-9_:\-.]{16,4096}$")


def scenario_of(token: str) -> str | None:
    """The scenario a registration token asks for, or None for an ordinary
    token; the table in :mod:`pushstream.sandbox.fcm` lists them."""
    if not _TOKEN.match(token):
        return "invalid-token"
    if not token.startswith(_SCENARIO_PREFIXES):
        return None
    for name in _SCENARIOS_LONGEST_FIRST:
        if token.startswith(name + "-"):
            return name
    return None


_APNS_REFUSAL = {
    "@type": APNS_ERROR,
    "statusCode": 403,
    "reason": "InvalidProviderToken",
}
_QUOTA_INFO = {
    "@type": ERROR_INFO,
    "reason": "RATE_LIMIT_EXCEEDED",
    "domain": "googleapis.com",
    "metadata": {
        "service": "fcm.googleapis.com",
        "quota_limit": "SendsPerMinutePerProject",
        "quota_metric": "fcm.googleapis.com/send_requests",
    },
}
# scenario -> (HTTP status, FcmError code or None, google.rpc status, message,
# extra details, whether a Retry-After goes with it); the table in the docstring of
# pushstream.sandbox.fcm says the same.
SCENARIO_ANSWERS: dict[
    str, tuple[int, str | None, str, str, list[dict[str, Any]], bool]
] = {
    "invalid-token": (
        400,
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        [],
        False,
    ),
    "unregistered": (
        404,
        "UNREGISTERED",
        "NOT_FOUND",
        "Requested entity was not found.",
        [],
        False,
    ),
    "sender-id-mismatch": (
        403,
        "SENDER_ID_MISMATCH",
        "PERMISSION_DENIED",
        "SenderId mismatch",
        [],
        False,
    ),
    "third-party-auth": (
        401,
        "THIRD_PARTY_AUTH_ERROR",
        "UNAUTHENTICATED",
        "Auth error from APNS or Web Push Service",
        [_APNS_REFUSAL],
        False,
    ),
    "internal": (500, "INTERNAL", "INTERNAL", "Internal error encountered.", [], False),
    "unavailable": (
        503,
        "UNAVAILABLE",
        "UNAVAILABLE",
        "The service is currently unavailable.",
        [],
        True,
    ),
    "quota": (
        429,
        "QUOTA_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests'.",
        [],
        True,
    ),
    "quota-plain": (
        429,
        None,
        "RESOURCE_EXHAUSTED",
        "Quota exceeded for quota metric 'Send requests' and limit "
        "'Send requests per minute per project'.",
        [_QUOTA_INFO],
        True,
    ),
}
