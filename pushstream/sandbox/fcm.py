"""A stand-in for FCM's HTTP v1 API and Google's OAuth2 token endpoint.

Routes, on one HTTPS server (HTTP/2 and HTTP/1.1, as Google serves both):

- ``POST /token``: the JWT-bearer grant (RFC 7523). The assertion must be an
  RS256 JWT signed by a service account this sandbox made or was given
  (:meth:`FcmSandbox.make_credentials`, :meth:`FcmSandbox.add_account`), with
  ``kid`` = its ``private_key_id``, ``iss`` = its ``client_email``, ``aud`` =
  its ``token_uri``, a ``scope``, ``exp - iat`` at most 3600 s and ``iat``
  not in the future beyond the allowed skew. Answers ``{"access_token",
  "expires_in", "token_type": "Bearer"}`` or ``400 invalid_grant`` with
  Google's descriptions (PROTOCOLS.md 2.2). Access tokens live
  ``token_lifetime_s``; :meth:`FcmSandbox.expire_tokens` ends them early.
- ``POST /v1/projects/{project}/messages:send``: answers, in this order,
  401 UNAUTHENTICATED without a live bearer token; 404 NOT_FOUND for a
  project nobody configured; 403 PERMISSION_DENIED when the token's service
  account may not send for the project (or lacks the FCM scope); 400
  INVALID_ARGUMENT for a malformed request (JSON, exactly one of
  token/topic/condition, string-only ``data``, reserved data keys, unknown
  fields, ``ttl`` as ``^\\d+(\\.\\d{1,9})?s$`` up to four weeks, Android
  priority, the 4096-byte size limit, 2048 for topics) with the
  ``google.rpc.BadRequest`` field violation; then the token's scenario;
  else ``200 {"name": "projects/{project}/messages/{id}"}``. Errors use
  the ``google.rpc.Status`` envelope with the ``FcmError`` detail of
  PROTOCOLS.md 2.4-2.5.

Scenario tokens (a registration token that starts with ``<scenario>-``;
any other well-formed token is delivered):

======================== =======================================================
``unregistered-…``       404 NOT_FOUND, FcmError UNREGISTERED
``invalid-token-…``      400 INVALID_ARGUMENT, FcmError INVALID_ARGUMENT ("The
                         registration token is not a valid FCM registration
                         token")
``sender-id-mismatch-…`` 403 PERMISSION_DENIED, FcmError SENDER_ID_MISMATCH
``third-party-auth-…``   401 UNAUTHENTICATED, FcmError THIRD_PARTY_AUTH_ERROR
                         with an ApnsError detail (403 InvalidProviderToken)
``internal-…``           500 INTERNAL, FcmError INTERNAL
``unavailable-…``        503 UNAVAILABLE, FcmError UNAVAILABLE, ``Retry-After``
``quota-…``              429 RESOURCE_EXHAUSTED, FcmError QUOTA_EXCEEDED,
                         ``Retry-After``: for the first ``quota_failures``
                         requests of that token, then delivered
``quota-plain-…``        the same 429s in the form without FcmError (ErrorInfo
                         RATE_LIMIT_EXCEEDED, as firebase-admin-go #719 shows)
``slow-…``               delivered after ``slow_s`` seconds
======================== =======================================================

A token outside FCM's alphabet (``A-Z a-z 0-9 _ : - .``, 16 to 4096
characters) is refused like ``invalid-token-…``. ``outage`` makes every send
answer 503 UNAVAILABLE (``outage_mode="503"``) or not answer for
``hang_s`` (``"hang"``); the token endpoint stays up. Each accepted message
is appended to ``accepted``; ``token_requests`` counts token requests.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pushstream.sandbox.server import Request, Response

DEFAULT_PROJECTS = ("sandbox-project", "sandbox-project-2")
DEFAULT_TOKEN_LIFETIME_S = 3599
MAX_ASSERTION_LIFETIME_S = 3600
MAX_CLOCK_SKEW_S = 300  # how far in the future an assertion's iat may be
MAX_MESSAGE_BYTES = 4096
MAX_TOPIC_MESSAGE_BYTES = 2048
MAX_TTL_S = 2_419_200  # four weeks
MAX_ACCEPTED = 100_000  # records kept; older ones are dropped first
# A message's size is that of its compact JSON, which is at most 4.5 times
# the text it was read from: whitespace and escapes only shrink, and the
# number that grows most is 1e15 (4 bytes, written 1000000000000000.0).
MAX_JSON_GROWTH = 5

SCOPES = (
    "https://www.googleapis.com/auth/firebase.messaging",
    "https://www.googleapis.com/auth/cloud-platform",
)
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
APNS_ERROR = "type.googleapis.com/google.firebase.fcm.v1.ApnsError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
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
_SEND_PATH = re.compile(r"^/v1/projects/([^/]+)/messages:send$")
_TOKEN = re.compile(r"^[A-Za-z0-9_:\-.]{16,4096}$")
_TOPIC = re.compile(r"^[A-Za-z0-9\-_.~%]{1,900}$")
_DURATION = re.compile(r"^(\d+)(\.\d{1,9})?s$")
_RESERVED_DATA = ("from", "message_type")
_RESERVED_PREFIXES = ("google.", "gcm.")
_BAD_TIMEFRAME = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
    "reasonable timeframe. Check your iat and exp values in the JWT claim."
)
_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access "
    "token, login cookie or other valid authentication credential. See "
    "https://developers.google.com/identity/sign-in/web/devconsole-project."
)


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
# extra details, whether a Retry-After goes with it); see the module docstring.
_SCENARIO_ANSWERS: dict[
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


@dataclass(slots=True)
class _Account:
    client_email: str
    key_id: str
    public_key: rsa.RSAPublicKey
    token_uri: str
    projects: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _AccessToken:
    client_email: str
    scopes: frozenset[str]
    expires_at: float


class _Refusal(Exception):
    """A send refused with a google.rpc.Status error."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


class FcmSandbox:
    """The FCM stand-in: ``await handle(request)`` answers one request.

    ``base_url`` (``https://host:port``, set once the server listens) is what
    :meth:`make_credentials` points service accounts and settings at.
    ``clock`` gives epoch seconds, for assertions and token lifetimes;
    ``record=False`` keeps ``accepted`` empty (for load tests).
    """

    def __init__(
        self,
        base_url: str = "",
        *,
        token_lifetime_s: int = DEFAULT_TOKEN_LIFETIME_S,
        quota_failures: int = 1,
        retry_after_s: int = 1,
        slow_s: float = 30.0,
        hang_s: float = 3600.0,
        record: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url
        self.token_lifetime_s = token_lifetime_s
        self.quota_failures = quota_failures
        self.retry_after_s = retry_after_s
        self.slow_s = slow_s
        self.hang_s = hang_s
        self.record = record
        self.outage = False
        self.outage_mode: Literal["503", "hang"] = "503"
        self.accepted: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self.token_requests = 0
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, _AccessToken] = {}
        self._quota_seen: Counter[str] = Counter()
        self._message_ids = 0

    # --- set-up --------------------------------------------------------------------

    def add_account(
        self,
        client_email: str,
        key_id: str,
        public_key: rsa.RSAPublicKey,
        token_uri: str,
        projects: Iterable[str],
    ) -> None:
        """Let a service account get tokens and send for ``projects``."""
        account = self._accounts.get(client_email)
        if account is None or account.key_id != key_id:
            account = _Account(client_email, key_id, public_key, token_uri)
            self._accounts[client_email] = account
        account.token_uri = token_uri
        account.projects.update(projects)

    def write_service_account(
        self, path: Path, project_id: str, token_uri: str | None = None
    ) -> Path:
        """Write (or reuse) a service-account key file for ``project_id``.

        A key already at ``path`` is kept (its ``token_uri`` is updated), so a
        restarted sandbox keeps accepting a worker configured earlier. New
        keys are RSA 2048, made now; the file is readable by its owner only.
        """
        token_uri = token_uri or self._url("/token")
        found = _read_key(path)
        if found is None:
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
            info: dict[str, Any] = {
                "type": "service_account",
                "project_id": project_id,
                "private_key_id": secrets.token_hex(20),
                "private_key": pem,
                "client_email": f"sandbox-{secrets.token_hex(4)}"
                f"@{project_id}.iam.gserviceaccount.com",
                "client_id": str(secrets.randbelow(10**21)),
                "auth_uri": "https://accounts.google.com/o/oauth2/auth",
                "token_uri": token_uri,
            }
        else:
            info, key = found
        info["token_uri"] = token_uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        self.add_account(
            info["client_email"],
            info["private_key_id"],
            key.public_key(),
            token_uri,
            [project_id],
        )
        return path

    def make_credentials(
        self,
        folder: Path,
        token_uri: str | None = None,
        projects: Sequence[str] = DEFAULT_PROJECTS,
    ) -> dict[str, str]:
        """One service account per project, written into ``folder``; returns
        the PUSHSTREAM_* settings that point a worker at them and at this
        sandbox (``token_uri`` defaults to ``<base_url>/token``)."""
        entries = []
        for project in projects:
            path = self.write_service_account(
                folder / f"fcm-{project}.json", project, token_uri
            )
            entries.append({"project_id": project, "service_account_file": str(path)})
        values = {"PUSHSTREAM_FCM": json.dumps(entries)}
        if self.base_url:
            values["PUSHSTREAM_ENDPOINTS__FCM"] = self.base_url
        return values

    def expire_tokens(self) -> int:
        """End every access token issued so far; returns how many were live.
        Their next use answers 401 UNAUTHENTICATED."""
        now = self._clock()
        live = [t for t in self._tokens.values() if t.expires_at > now]
        for token in live:
            token.expires_at = now
        return len(live)

    # --- requests ------------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        """Answer one request (the :class:`SandboxServer` handler)."""
        path = req.path.partition("?")[0]
        if path == "/token":
            self.token_requests += 1
            response = self._token(req)
            self.stats[f"token {response.status}"] += 1
            return response
        match = _SEND_PATH.match(path)
        if match is None or req.method != "POST":
            response = _status(404, "NOT_FOUND", "Requested entity was not found.")
        else:
            response = await self._send(req, match.group(1))
        self.stats[f"send {response.status}"] += 1
        return response

    # --- the token endpoint --------------------------------------------------------

    def _token(self, req: Request) -> Response:
        if req.method != "POST":
            return _oauth_error(405, "invalid_request", "Method not allowed.")
        form = {
            k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()
        }
        if form.get("grant_type") != JWT_BEARER:
            return _oauth_error(
                400,
                "unsupported_grant_type",
                "Invalid grant_type: " + form.get("grant_type", ""),
            )
        assertion = form.get("assertion", "")
        try:
            header = jwt.get_unverified_header(assertion)
            unverified = jwt.decode(assertion, options={"verify_signature": False})
        except jwt.PyJWTError:
            return _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
        account = self._accounts.get(str(unverified.get("iss")))
        if account is None:
            return _oauth_error(
                400, "invalid_grant", "Invalid grant: account not found"
            )
        if header.get("alg") != "RS256" or header.get("kid") != account.key_id:
            return _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
        try:
            claims = jwt.decode(
                assertion,
                account.public_key,
                algorithms=["RS256"],
                audience=account.token_uri,
                # Time claims are checked below, with Google's own message.
                options={
                    "require": ["iat", "exp", "aud"],
                    "verify_exp": False,
                    "verify_iat": False,
                },
            )
        except jwt.InvalidAudienceError:
            return _oauth_error(
                400, "invalid_grant", "Invalid JWT: Failed audience check."
            )
        except jwt.PyJWTError:
            return _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")

        now = self._clock()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (
            not isinstance(iat, int)
            or not isinstance(exp, int)
            or exp - iat > MAX_ASSERTION_LIFETIME_S
            or exp <= iat
            or iat > now + MAX_CLOCK_SKEW_S
            or exp <= now
        ):
            return _oauth_error(400, "invalid_grant", _BAD_TIMEFRAME)
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.split():
            return _oauth_error(
                400,
                "invalid_scope",
                "Invalid oauth scope or ID token audience provided.",
            )

        access_token = "ya29.sandbox-" + secrets.token_urlsafe(32)
        self._tokens[access_token] = _AccessToken(
            account.client_email,
            frozenset(scope.split()),
            now + self.token_lifetime_s,
        )
        return _json(
            200,
            {
                "access_token": access_token,
                "expires_in": self.token_lifetime_s,
                "token_type": "Bearer",
            },
        )

    # --- messages:send -------------------------------------------------------------

    async def _send(self, req: Request, project: str) -> Response:
        if self.outage:
            if self.outage_mode == "hang":
                await asyncio.sleep(self.hang_s)
            return _fcm_error(
                503, "UNAVAILABLE", "The service is currently unavailable."
            )
        try:
            self._authorize(req, project)
            body = _parse_body(req.body)
            message = body["message"]
            _check_message(message, len(req.body))
            token = message.get("token")
            if token is not None:
                scenario = await self._scenario(token)
                if scenario is not None:
                    return scenario
        except _Refusal as refusal:
            return refusal.response

        if body.get("validate_only") is True:
            return _json(200, {"name": f"projects/{project}/messages/fake_message_id"})
        self._message_ids += 1
        name = (
            f"projects/{project}/messages/0:{int(self._clock() * 1e6)}"
            f"%{self._message_ids:016x}"
        )
        if self.record:
            self._record(req, project, message, name)
        return _json(200, {"name": name})

    def _authorize(self, req: Request, project: str) -> None:
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        issued = self._tokens.get(value) if scheme.lower() == "bearer" else None
        if issued is None or issued.expires_at <= self._clock():
            details = []
            if issued is not None:
                details.append(_error_info("ACCESS_TOKEN_EXPIRED", "googleapis.com"))
            raise _Refusal(_status(401, "UNAUTHENTICATED", _UNAUTHENTICATED, details))
        if not any(project in a.projects for a in self._accounts.values()):
            raise _Refusal(_status(404, "NOT_FOUND", "Requested entity was not found."))
        account = self._accounts.get(issued.client_email)
        if not issued.scopes.intersection(SCOPES):
            raise _Refusal(
                _status(
                    403,
                    "PERMISSION_DENIED",
                    "Request had insufficient authentication scopes.",
                    [_error_info("ACCESS_TOKEN_SCOPE_INSUFFICIENT", "googleapis.com")],
                )
            )
        if account is None or project not in account.projects:
            raise _Refusal(
                _status(
                    403,
                    "PERMISSION_DENIED",
                    "Permission 'cloudmessaging.messages.create' denied on resource "
                    f"'//cloudresourcemanager.googleapis.com/projects/{project}' "
                    "(or it may not exist).",
                    [_error_info("IAM_PERMISSION_DENIED", "iam.googleapis.com")],
                )
            )

    async def _scenario(self, token: str) -> Response | None:
        """The scripted answer of a scenario token, or None to deliver."""
        kind = scenario_of(token)
        if kind in ("quota", "quota-plain"):
            self._quota_seen[token] += 1
            if self._quota_seen[token] > self.quota_failures:
                return None
        if kind == "slow":
            await asyncio.sleep(self.slow_s)
            return None
        answer = _SCENARIO_ANSWERS.get(kind) if kind else None
        if answer is None:
            return None
        code, error_code, status, message, details, throttles = answer
        headers = [("retry-after", str(self.retry_after_s))] if throttles else []
        if error_code is None:
            return _status(code, status, message, details, headers=headers)
        return _fcm_error(code, error_code, message, status, details, headers=headers)

    def _record(
        self, req: Request, project: str, message: dict[str, Any], name: str
    ) -> None:
        headers = {k: v for k, v in req.headers.items() if k != "authorization"}
        self.accepted.append(
            {
                "platform": "fcm",
                "token": message.get("token"),
                "topic": message.get("topic"),
                "condition": message.get("condition"),
                "app": project,
                "provider_id": name,
                "headers": headers,
                "message": message,
                "body_size": len(req.body),
                "http_version": req.http_version,
                "time": time.time(),
            }
        )
        if len(self.accepted) > MAX_ACCEPTED:
            del self.accepted[: len(self.accepted) - MAX_ACCEPTED]

    def _url(self, path: str) -> str:
        if not self.base_url:
            raise ValueError("FcmSandbox.base_url is not set: give the token_uri")
        return self.base_url.rstrip("/") + path


def scenario_of(token: str) -> str | None:
    """The scenario a registration token asks for (see the module docstring)."""
    if not _TOKEN.match(token):
        return "invalid-token"
    if not token.startswith(_SCENARIO_PREFIXES):
        return None
    for name in _SCENARIOS_LONGEST_FIRST:
        if token.startswith(name + "-"):
            return name
    return None


# --- checking a message -----------------------------------------------------------


def _parse_body(raw: bytes) -> dict[str, Any]:
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


def _check_message(message: dict[str, Any], body_size: int) -> None:
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
        raise _Refusal(
            _fcm_error(
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


# --- answers -------------------------------------------------------------------------


def _bad_field(field_name: str, description: str) -> _Refusal:
    violation = {"field": field_name, "description": description}
    return _Refusal(
        _status(
            400,
            "INVALID_ARGUMENT",
            description,
            [{"@type": BAD_REQUEST, "fieldViolations": [violation]}],
        )
    )


def _invalid_json(description: str, field_name: str = "") -> _Refusal:
    violation = {"description": description}
    if field_name:
        violation = {"field": field_name, **violation}
    return _Refusal(
        _status(
            400,
            "INVALID_ARGUMENT",
            description,
            [{"@type": BAD_REQUEST, "fieldViolations": [violation]}],
        )
    )


def _error_info(reason: str, domain: str, **metadata: str) -> dict[str, Any]:
    info: dict[str, Any] = {"@type": ERROR_INFO, "reason": reason, "domain": domain}
    info["metadata"] = {"service": "fcm.googleapis.com", **metadata}
    return info


def _fcm_error(
    code: int,
    error_code: str,
    message: str,
    status: str | None = None,
    extra: Sequence[dict[str, Any]] = (),
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    details = [{"@type": FCM_ERROR, "errorCode": error_code}, *extra]
    return _status(code, status or error_code, message, details, headers=headers)


def _status(
    code: int,
    status: str,
    message: str,
    details: Sequence[dict[str, Any]] = (),
    *,
    headers: Sequence[tuple[str, str]] = (),
) -> Response:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = list(details)
    return _json(code, {"error": error}, headers)


def _oauth_error(code: int, error: str, description: str) -> Response:
    return _json(code, {"error": error, "error_description": description})


def _json(
    code: int, body: dict[str, Any], headers: Sequence[tuple[str, str]] = ()
) -> Response:
    return Response(
        code,
        [("content-type", "application/json; charset=UTF-8"), *headers],
        json.dumps(body).encode(),
    )


def _read_key(path: Path) -> tuple[dict[str, Any], rsa.RSAPrivateKey] | None:
    """A service-account key file made earlier, or None to make a new one."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        # Our own key: skip the slow consistency check of its RSA primes.
        key = serialization.load_pem_private_key(
            info["private_key"].encode(), None, unsafe_skip_rsa_key_validation=True
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(key, rsa.RSAPrivateKey):
        return None
    if not all(
        isinstance(info.get(k), str) for k in ("client_email", "private_key_id")
    ):
        return None
    return info, key
