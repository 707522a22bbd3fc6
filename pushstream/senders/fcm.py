"""Firebase Cloud Messaging, HTTP v1 API.

- :func:`render` builds the ``messages:send`` body for one device (pure).
- :func:`classify` turns FCM's answer into a :class:`SendResult` (pure), from
  the ``FcmError`` code in the error's details first and the HTTP status only
  when there is none (PROTOCOLS.md 2.4-2.5): 400 is a dead token only when
  the registration token is the invalid field, never for a bad payload.
- :class:`FcmClient` sends over HTTP/2 with many requests in flight per
  connection, authenticates with each project's service account (OAuth2
  JWT-bearer grant, cached token, one refresh and one retry on a 401), and
  keeps each project under its configured rate.

The project a send goes to is ``Send.app``: the Firebase project id the
device registered with. Backoff between retries is the retry stage's job;
this module only says "retry" and passes on FCM's Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from pushstream.config import FCM_ENDPOINT, ConfigError, FcmProject, Settings
from pushstream.events import Notification, Send, fcm_headers_problem
from pushstream.senders.http2 import (
    DEFAULT_TIMEOUT,
    ConnectionLost,
    H2Options,
    H2Pool,
    InvalidRequest,
    ProtocolError,
    RequestTimeout,
    TransportError,
    client_ssl_context,
)
from pushstream.senders.oauth import (
    GoogleTokenSource,
    ServiceAccount,
    TokenCache,
    TokenError,
)
from pushstream.senders.result import Rendered, ResultOutcome, SendResult, Target

log = logging.getLogger(__name__)

# FCM counts the keys and values of a message: 4096 bytes for a message to a
# device (PROTOCOLS.md 2.3). We count everything but the target, so a message
# we let through is never refused for size.
MAX_MESSAGE_BYTES = 4096
CONTENT_TYPE = "application/json; charset=UTF-8"
# Project and topic quotas refill each minute: without a Retry-After, FCM asks
# senders to wait at least a minute (PROTOCOLS.md 2.5).
QUOTA_RETRY_AFTER_S = 60.0
# Our own ceiling per project, under FCM's default quota of 600,000 a minute.
DEFAULT_RATE_PER_MINUTE = 500_000

FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
APNS_ERROR = "type.googleapis.com/google.firebase.fcm.v1.ApnsError"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"

# The reason a 401 without an FcmError carries: the access token was refused.
UNAUTHENTICATED = "UNAUTHENTICATED"

# Every FcmError code, what it means, and what follows for the token and for
# retrying (PROTOCOLS.md 2.5). INVALID_ARGUMENT is refined by _invalid_argument.
REASONS: Mapping[str, tuple[ResultOutcome, str]] = {
    "UNREGISTERED": (
        "invalid_token",
        "the app instance is gone: uninstalled, unregistered or expired",
    ),
    "SENDER_ID_MISMATCH": (
        "invalid_token",
        "the token belongs to another Firebase project's sender",
    ),
    "INVALID_ARGUMENT": (
        "failed",
        "a field is invalid; a dead token only when the token is that field",
    ),
    "QUOTA_EXCEEDED": (
        "retry",
        "project, topic or device rate exceeded: wait for Retry-After",
    ),
    "UNAVAILABLE": ("retry", "FCM is overloaded: retry after a pause"),
    "INTERNAL": ("retry", "FCM failed internally: retry after a pause"),
    "THIRD_PARTY_AUTH_ERROR": (
        "failed",
        "the APNs or web-push credentials in the Firebase project are wrong",
    ),
    "APNS_AUTH_ERROR": ("failed", "old name of THIRD_PARTY_AUTH_ERROR"),
}

# google.rpc status names of answers without an FcmError.
STATUS_REASONS: Mapping[str, tuple[ResultOutcome, str]] = {
    UNAUTHENTICATED: ("retry", "the access token was refused even after a refresh"),
    "PERMISSION_DENIED": (
        "failed",
        "the service account may not send for this project, or the API is off",
    ),
    "NOT_FOUND": ("failed", "no such Firebase project"),
    "RESOURCE_EXHAUSTED": ("retry", "the project's send quota is used up"),
}


# --- rendering -------------------------------------------------------------------


def render(
    n: Notification, target: Target, now_ms: int, expires_at_ms: int | None
) -> Rendered:
    """The ``messages:send`` request for one device.

    Android gets the remaining time to live as ``ttl``, iOS (through FCM) an
    absolute ``apns-expiration``; without an expiry FCM keeps a message for
    its default of four weeks. A ``ttl`` of 0 ("now or never") is ``"0s"``,
    ``apns-expiration: 0`` and web push ``TTL: 0``: no one stores it.
    ``n.fcm`` blocks are deep-merged last; a None there removes the built
    value. Headers in its ``apns`` and ``webpush`` blocks that break HTTP/2's
    field rules, or that only a sender sets, set ``invalid_header``.
    """
    remaining_ms = None if expires_at_ms is None else max(0, expires_at_ms - now_ms)
    if n.ttl == 0:
        remaining_ms = 0  # expires_at_ms is only pushstream's own grace
    message: dict[str, Any] = {"token": target.token}
    notification = _present(title=n.title, body=n.body, image=n.image)
    if notification:
        message["notification"] = notification
    if n.data:
        message["data"] = dict(n.data)
    message["android"] = _android(n, remaining_ms)
    message["apns"] = _apns(n, now_ms, expires_at_ms)
    message["webpush"] = _webpush(n, remaining_ms)

    invalid = None
    if n.fcm is not None:
        for block in ("android", "apns", "webpush", "fcm_options"):
            override = getattr(n.fcm, block)
            if override:
                message[block] = deep_merge(message.get(block, {}), override)
            if block in ("apns", "webpush") and invalid is None:
                invalid = fcm_headers_problem((override or {}).get("headers"))

    body = _dumps({"message": message})
    size = message_size(message)
    too_large = None
    if size > MAX_MESSAGE_BYTES:
        too_large = f"FCM message is {size} bytes, over the {MAX_MESSAGE_BYTES} limit"
    headers = {"content-type": CONTENT_TYPE}
    return Rendered(headers, body, too_large, invalid_header=invalid)


def _has_alert(n: Notification) -> bool:
    return any((n.title, n.subtitle, n.body, n.title_loc_key, n.body_loc_key))


def _android(n: Notification, remaining_ms: int | None) -> dict[str, Any]:
    android: dict[str, Any] = {"priority": "HIGH" if n.priority == "high" else "NORMAL"}
    if remaining_ms is not None:
        android["ttl"] = duration(remaining_ms)
    if n.collapse_key:
        android["collapse_key"] = n.collapse_key
    if _has_alert(n):
        shown = _present(
            title_loc_key=n.title_loc_key,
            title_loc_args=n.title_loc_args,
            body_loc_key=n.body_loc_key,
            body_loc_args=n.body_loc_args,
            sound=n.sound,
            # A later notification with the same tag replaces this one on
            # screen, as apns-collapse-id does on iOS.
            tag=n.collapse_key,
            click_action=n.category,
            notification_count=n.badge,
        )
        if shown:
            android["notification"] = shown
    return android


def _apns(n: Notification, now_ms: int, expires_at_ms: int | None) -> dict[str, Any]:
    alert = _has_alert(n)
    # Apple refuses priority 10 for background pushes; FCM allows only 5 for
    # data-only messages to iOS (PROTOCOLS.md 1.2, 2.3).
    headers = {
        "apns-priority": "10" if alert and n.priority == "high" else "5",
        "apns-push-type": "alert" if alert else "background",
    }
    if expires_at_ms is not None:
        # 0: deliver now or never (Apple stores nothing).
        now_or_never = n.ttl == 0 or expires_at_ms <= now_ms
        headers["apns-expiration"] = "0" if now_or_never else str(expires_at_ms // 1000)
    if n.collapse_key:
        headers["apns-collapse-id"] = n.collapse_key

    aps: dict[str, Any] = {}
    if n.subtitle or n.title_loc_key or n.body_loc_key:
        # FCM maps only title and body to the alert; anything more needs the
        # whole alert dictionary spelled out.
        aps["alert"] = _present(
            title=n.title,
            subtitle=n.subtitle,
            body=n.body,
            **{
                "title-loc-key": n.title_loc_key,
                "title-loc-args": n.title_loc_args,
                "loc-key": n.body_loc_key,
                "loc-args": n.body_loc_args,
            },
        )
    aps.update(
        _present(
            badge=n.badge,
            sound=n.sound,
            category=n.category,
            **{"thread-id": n.thread_id},
        )
    )
    if n.content_available:
        aps["content-available"] = 1
    if n.mutable_content or n.image:
        # The image is attached by the app's notification service extension.
        aps["mutable-content"] = 1

    apns: dict[str, Any] = {"headers": headers}
    if aps:
        apns["payload"] = {"aps": aps}
    if n.image:
        apns["fcm_options"] = {"image": n.image}
    return apns


_WEBPUSH_TOPIC = re.compile(r"^[A-Za-z0-9_-]{1,32}$")


def _webpush(n: Notification, remaining_ms: int | None) -> dict[str, Any]:
    headers = {"Urgency": "high" if n.priority == "high" else "normal"}
    if remaining_ms is not None:
        headers["TTL"] = str(remaining_ms // 1000)
    if n.collapse_key and _WEBPUSH_TOPIC.match(n.collapse_key):
        # RFC 8030 5.4: a Topic is at most 32 URL-safe base64 characters.
        headers["Topic"] = n.collapse_key
    return {"headers": headers}


def _present(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def duration(ms: int) -> str:
    """A protobuf Duration string, as FCM's ``ttl`` wants: ``"3.5s"``."""
    seconds, millis = divmod(max(0, ms), 1000)
    return f"{seconds}.{millis:03d}s" if millis else f"{seconds}s"


def duration_ms(text: str) -> int | None:
    """Milliseconds of a Duration string, or None when it is not one."""
    match = re.fullmatch(r"(\d+)(?:\.(\d{1,9}))?s", text)
    if match is None:
        return None
    fraction = (match.group(2) or "").ljust(3, "0")[:3]
    return int(match.group(1)) * 1000 + int(fraction)


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in: objects merge, a None removes a key."""
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def message_size(message: Mapping[str, Any]) -> int:
    """The bytes counted against FCM's limit: the message without its target."""
    counted = {
        key: value
        for key, value in message.items()
        if key not in ("token", "topic", "condition")
    }
    return len(_dumps(counted).encode())


def refresh_ttl(body: str, now_ms: int, expires_at_ms: int) -> str:
    """A rendered body whose relative TTLs count from ``now_ms`` again.

    A retried send was rendered earlier: its Android ``ttl`` and web-push
    ``TTL`` would keep the message past its expiry. Never lengthens a TTL.
    """
    remaining_ms = max(0, expires_at_ms - now_ms)
    try:
        document = json.loads(body)
        message = document["message"]
    except (ValueError, KeyError, TypeError):
        return body
    android = message.get("android")
    if isinstance(android, dict) and isinstance(android.get("ttl"), str):
        current = duration_ms(android["ttl"])
        if current is not None and current > remaining_ms:
            android["ttl"] = duration(remaining_ms)
    headers = (message.get("webpush") or {}).get("headers")
    if isinstance(headers, dict) and str(headers.get("TTL", "")).isdigit():
        headers["TTL"] = str(min(int(headers["TTL"]), remaining_ms // 1000))
    return _dumps(document)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# --- classifying -----------------------------------------------------------------


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    now_s: float | None = None,
) -> SendResult:
    """What FCM's answer means for this send and its token.

    ``headers`` have lower-case names (HTTP/2). ``now_s`` (epoch seconds,
    default: now) turns a Retry-After date into seconds when the answer has no
    ``Date`` header.
    """
    answer = _json_object(body)
    if status == 200:
        name = answer.get("name")
        return SendResult(
            "delivered", "ok", 200, name if isinstance(name, str) else None
        )

    error = answer.get("error")
    error = error if isinstance(error, dict) else {}
    details = [d for d in error.get("details") or () if isinstance(d, dict)]
    code = _fcm_error_code(details) or ""
    rpc_status = error.get("status")
    rpc_status = rpc_status if isinstance(rpc_status, str) else ""
    retry_after = retry_after_s(headers, now_s)

    if code == "INVALID_ARGUMENT" or (not code and rpc_status == "INVALID_ARGUMENT"):
        return _invalid_argument(status, error, details)

    outcome: ResultOutcome
    if code in REASONS:
        outcome, _ = REASONS[code]
        reason = code + _apns_detail(details)
    elif not code and rpc_status in STATUS_REASONS:
        outcome, _ = STATUS_REASONS[rpc_status]
        reason = rpc_status + _error_info(details)
    else:
        # UNSPECIFIED_ERROR, a code newer than this table, or no JSON at all.
        outcome = "retry" if status in (408, 429) or status >= 500 else "failed"
        reason = code or rpc_status or f"http_{status}"

    if outcome == "retry" and retry_after is None and status == 429:
        retry_after = QUOTA_RETRY_AFTER_S
    return SendResult(
        outcome,
        reason,
        status,
        retry_after=retry_after if outcome == "retry" else None,
    )


def _invalid_argument(
    status: int, error: Mapping[str, Any], details: list[dict[str, Any]]
) -> SendResult:
    fields = [
        str(violation.get("field"))
        for detail in details
        if detail.get("@type") == BAD_REQUEST
        for violation in detail.get("fieldViolations") or ()
        if isinstance(violation, dict) and violation.get("field")
    ]
    message = str(error.get("message") or "")
    if "message.token" in fields or (
        not fields and "registration token" in message.lower()
    ):
        return SendResult("invalid_token", "INVALID_ARGUMENT message.token", status)
    # A bad payload: the token is fine, the message must be fixed.
    where = ", ".join(fields) if fields else message[:200] or "unspecified field"
    return SendResult("failed", f"INVALID_ARGUMENT {where}", status)


def _fcm_error_code(details: list[dict[str, Any]]) -> str | None:
    for detail in details:
        if detail.get("@type") == FCM_ERROR and isinstance(
            detail.get("errorCode"), str
        ):
            code: str = detail["errorCode"]
            return None if code == "UNSPECIFIED_ERROR" else code
    return None


def _apns_detail(details: list[dict[str, Any]]) -> str:
    for detail in details:
        if detail.get("@type") == APNS_ERROR:
            code = detail.get("statusCode", detail.get("status_code", ""))
            return f" (APNs {code} {detail.get('reason', '')})".replace("  ", " ")
    return ""


def _error_info(details: list[dict[str, Any]]) -> str:
    for detail in details:
        if detail.get("@type") == ERROR_INFO and detail.get("reason"):
            return f" {detail['reason']}"
    return ""


def retry_after_s(
    headers: Mapping[str, str], now_s: float | None = None
) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date)."""
    value = _header(headers, "retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    when = _http_date(value)
    if when is None:
        return None
    served = _http_date(_header(headers, "date") or "")
    reference = (
        served if served is not None else (now_s if now_s is not None else time.time())
    )
    return max(0.0, when - reference)


def _http_date(value: str) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        for key, candidate in headers.items():
            if key.lower() == name:
                return candidate
    return value


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


# --- rate limiting ---------------------------------------------------------------


class RateLimiter:
    """A token bucket: ``rate_per_minute`` on average, bursts of ``burst``.

    Waiters are served in arrival order; only the first of them sleeps.
    ``clock`` (monotonic seconds) and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        rate_per_minute: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self._rate = rate_per_minute / 60.0
        # One second's worth by default: smooth, but no stall after a pause.
        self._burst = max(1.0, burst if burst is not None else self._rate)
        self._tokens = self._burst
        self._clock = clock
        self._sleep = sleep
        self._stamp = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until one more request may go."""
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(
                    self._burst, self._tokens + (now - self._stamp) * self._rate
                )
                self._stamp = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return
                await self._sleep((1.0 - self._tokens) / self._rate)


# --- the client ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FcmCredentials:
    """One Firebase project: its service account and the rate we keep under."""

    project_id: str
    account: ServiceAccount
    rate_per_minute: int = DEFAULT_RATE_PER_MINUTE

    @classmethod
    def from_settings(cls, project: FcmProject, index: int = 0) -> FcmCredentials:
        """Load the project's key; ConfigError naming the setting when it won't do."""
        prefix = f"PUSHSTREAM_FCM__{index}"
        which = f"(project {project.project_id!r})"
        given = (project.service_account_file, project.service_account_json)
        if None not in given:
            raise ConfigError(
                f"{prefix} {which}: set SERVICE_ACCOUNT_FILE or "
                "SERVICE_ACCOUNT_JSON, not both"
            )
        if project.service_account_file is not None:
            account = ServiceAccount.from_file(
                project.service_account_file,
                setting=f"{prefix}__SERVICE_ACCOUNT_FILE {which}",
            )
        elif project.service_account_json is not None:
            account = ServiceAccount.from_json(
                project.service_account_json.get_secret_value(),
                setting=f"{prefix}__SERVICE_ACCOUNT_JSON {which}",
            )
        else:
            raise ConfigError(
                f"{prefix} {which}: set SERVICE_ACCOUNT_FILE or SERVICE_ACCOUNT_JSON"
            )
        return cls(project.project_id, account, project.rate_per_minute)


@dataclass(slots=True)
class _Project:
    path: str
    tokens: TokenCache
    limiter: RateLimiter


class FcmClient:
    """Sends to FCM's ``messages:send`` for every configured Firebase project.

    One HTTP/2 pool to the FCM host carries every project's requests; each
    project has its own access-token cache and rate limiter. ``clock`` and
    ``sleep`` (monotonic seconds) drive token expiry and rate limiting.
    """

    def __init__(
        self,
        projects: Sequence[FcmCredentials],
        *,
        endpoint: str = FCM_ENDPOINT,
        ca_file: Path | None = None,
        request_timeout_s: float = DEFAULT_TIMEOUT,
        max_connections: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        if not projects:
            raise ConfigError("PUSHSTREAM_FCM: no Firebase project is configured")
        parts = urlsplit(endpoint)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(
                f"PUSHSTREAM_ENDPOINTS__FCM: not an https URL: {endpoint}"
            )
        self._host = parts.hostname
        self._port = parts.port or 443
        self._base = parts.path.rstrip("/")
        self._credentials = {p.project_id: p for p in projects}
        self._ca_file = ca_file
        self._timeout = request_timeout_s
        self._max_connections = max_connections
        self._clock = clock
        self._sleep = sleep
        self._projects: dict[str, _Project] = {}
        self._pool: H2Pool | None = None
        self._http: httpx.AsyncClient | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> FcmClient:
        """A client for ``settings.fcm``; ConfigError names a bad credential."""
        projects = [
            FcmCredentials.from_settings(project, index)
            for index, project in enumerate(settings.fcm)
        ]
        return cls(
            projects,
            endpoint=settings.endpoints.fcm,
            ca_file=settings.endpoints.ca_file,
            request_timeout_s=settings.request_timeout_s,
            max_connections=settings.connections_per_host,
        )

    @property
    def token_fetches(self) -> int:
        """Access tokens requested so far, over all projects."""
        return sum(project.tokens.fetches for project in self._projects.values())

    async def __aenter__(self) -> FcmClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the connection pool; safe to call twice."""
        if self._pool is not None:
            return
        cafile = str(self._ca_file) if self._ca_file else None
        try:
            # Loading a trust store reads files: keep it off the event loop.
            h2_context = await asyncio.to_thread(client_ssl_context, cafile)
            http_context = await asyncio.to_thread(
                ssl.create_default_context, cafile=cafile
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"PUSHSTREAM_ENDPOINTS__CA_FILE: cannot load {cafile}: {exc}"
            ) from None
        self._http = httpx.AsyncClient(verify=http_context, timeout=self._timeout)
        for project_id, credentials in self._credentials.items():
            source = GoogleTokenSource(credentials.account, self._http)
            self._projects[project_id] = _Project(
                path=f"{self._base}/v1/projects/{quote(project_id)}/messages:send",
                tokens=TokenCache(source, self._clock, name=f"fcm {project_id}"),
                limiter=RateLimiter(
                    credentials.rate_per_minute, clock=self._clock, sleep=self._sleep
                ),
            )
        options = H2Options(max_connections=self._max_connections)
        self._pool = H2Pool(self._host, self._port, h2_context, options=options)
        await self._pool.start()

    async def aclose(self) -> None:
        """Close connections and token refreshes; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for project in self._projects.values():
            await project.tokens.aclose()
        if self._pool is not None:
            await self._pool.aclose()
        if self._http is not None:
            await self._http.aclose()

    async def send(self, send: Send) -> SendResult:
        """Make one send; never raises for an answer (or the lack of one).

        A 401 without an FcmError means the access token was refused: it is
        dropped, a new one fetched, and the request made once more.
        """
        if self._pool is None:
            raise RuntimeError("FcmClient.send() before start()")
        project = self._projects.get(send.app)
        if project is None:
            return SendResult("failed", "not_configured: no such FCM project")
        body = send.body
        if send.attempt > 1 and send.expires_at_ms is not None:
            body = refresh_ttl(body, time.time_ns() // 1_000_000, send.expires_at_ms)
        payload = body.encode()

        for attempt in (1, 2):
            try:
                access_token = await project.tokens.get()
            except TokenError as exc:
                outcome: ResultOutcome = "retry" if exc.retriable else "failed"
                return SendResult(outcome, f"oauth: {exc.reason}")
            headers = {**send.headers, "authorization": f"Bearer {access_token}"}
            await project.limiter.acquire()
            try:
                response = await self._pool.request(
                    "POST", project.path, headers, payload, self._timeout
                )
            except InvalidRequest:
                return SendResult("failed", "invalid_header")
            except RequestTimeout:
                return SendResult("retry", "timeout")
            except ProtocolError as exc:
                if exc.malformed:  # FCM reset the stream: it will again
                    return SendResult("failed", "protocol_error")
                return SendResult("retry", "protocol_error")
            except ConnectionLost as exc:
                if exc.protocol_error:  # not an outage: see breaker.is_outage
                    return SendResult("retry", "protocol_error")
                return SendResult("retry", "connection_lost")
            except TransportError as exc:
                log.debug("fcm %s: no answer (%s)", _short(send.token), exc)
                return SendResult("retry", "connection_lost")

            result = classify(response.status, response.headers, response.body)
            if attempt == 1 and refused_access_token(result):
                project.tokens.invalidate(access_token)
                continue
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "fcm %s: %s %s", _short(send.token), response.status, result.reason
                )
            return result
        raise AssertionError("unreachable")  # the loop always returns


def refused_access_token(result: SendResult) -> bool:
    """True when FCM refused the access token itself (not APNs credentials)."""
    return result.status == 401 and result.reason.split(" ", 1)[0] == UNAUTHENTICATED


def _short(token: str) -> str:
    return token[:8] + "…"
