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

import asyncio
import dataclasses
import hashlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec

from pushstream.config import ApnsApp, ConfigError, Endpoints, Settings
from pushstream.events import (
    APNS_SENDER_HEADERS,
    APNS_TOKEN_RE,
    Environment,
    Notification,
    Send,
    header_problem,
    headers_problem,
)
from pushstream.senders import http2
from pushstream.senders.apns_auth import (
    Clock,
    ProviderToken,
    certificate_topics,
    load_client_certificate,
    load_signing_key,
    setting_name,
)
from pushstream.senders.result import Rendered, ResultOutcome, SendResult, Target

log = logging.getLogger(__name__)

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

# APNs sends no Retry-After; after TooManyProviderTokenUpdates Apple advises
# to stop and wait, so the retry is pushed out at least this far.
TOKEN_UPDATES_BACKOFF_S = 60.0


def apns_id_for(send_id: str) -> str:
    """The apns-id of a send: a UUID (lowercase, 8-4-4-4-12) fixed by its id."""
    return str(uuid.uuid5(APNS_ID_NAMESPACE, send_id))


def collapse_id_for(key: str) -> str:
    """A collapse key as an apns-collapse-id of at most 64 bytes.

    Longer keys (UTF-8 can make 64 characters up to 256 bytes), and keys that
    are no valid HTTP/2 header value (control characters, non-ASCII), are
    replaced by their SHA-256 in hex, exactly 64 bytes, so distinct keys stay
    distinct.
    """
    fits = len(key.encode()) <= COLLAPSE_ID_MAX_BYTES
    if fits and header_problem("apns-collapse-id", key) is None:
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
    at the top level; ``overrides.headers`` replace the built headers. An
    override header that is no valid HTTP/2 field, or one only the sender
    sets (authorization, apns-topic, host, content-length, pseudo-headers),
    sets ``invalid_header`` instead: sent, it would make APNs close the
    connection with every request on it.

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
    invalid = None
    if overrides is not None and overrides.headers:
        invalid = headers_problem(overrides.headers, APNS_SENDER_HEADERS)
        if invalid is None:
            headers.update((k.lower(), v) for k, v in overrides.headers.items())

    size = len(body.encode())
    limit = VOIP_PAYLOAD_LIMIT if push_type == "voip" else PAYLOAD_LIMIT
    too_large = None
    if size > limit:
        too_large = f"APNs payload is {size} bytes; the limit is {limit}"
    return Rendered(headers, body, too_large=too_large, invalid_header=invalid)


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


# --- the client -------------------------------------------------------------------

DEFAULT_REQUEST_TIMEOUT = 10.0
"""Seconds from sending a request (or queueing for a stream) to its answer."""
DEFAULT_CONNECTIONS = 2
"""HTTP/2 connections per credential and host."""
NOT_CONFIGURED = "not_configured"
"""The reason of a send for an app without APNs credentials (as the runner's)."""
MALFORMED_TOKEN = "malformed_token"
INVALID_HEADER = "invalid_header"
"""A send whose headers break HTTP/2's field rules: refused, never sent."""
PROTOCOL_ERROR = "protocol_error"

# Headers whose value is new on every request: kept out of the HPACK table,
# where they would only push out the reusable ones (see http2.H2Options).
UNIQUE_HEADERS = frozenset({"apns-id"})

# Answers after which the connection itself is suspect: the next requests go
# to a fresh one (Apple: reconnect after IdleTimeout and Shutdown; a key id
# differing from the connection's first needs its own connection).
_RECONNECT_REASONS = frozenset({"IdleTimeout", "Shutdown", "UnrelatedKeyIdInToken"})


@dataclass(slots=True)
class _Credential:
    """One way of authenticating, shared by every app that uses it."""

    name: str
    context: ssl.SSLContext
    tokens: ProviderToken | None = None


class ApnsClient:
    """Sends rendered APNs requests, authenticated, over pooled HTTP/2.

    One connection pool per credential (a (team, key) for token auth, a
    certificate file for certificate auth) and per APNs host; a send's
    ``environment`` picks the production or development host. Every app of a
    credential shares its pools and its provider token.

    :meth:`send` never raises for an answer: it returns a
    :class:`SendResult`. When no answer comes it returns ``retry`` with
    reason ``timeout``, ``connection_lost``, ``connect_failed`` or
    ``protocol_error``; a request cut off by a GOAWAY or a lost connection
    is first sent once more on another connection. A request APNs resets as
    malformed fails (``protocol_error``), and one whose headers break
    HTTP/2's field rules fails without being sent (``invalid_header``):
    either would otherwise be retried, or close the connection under the
    requests beside it. ExpiredProviderToken is
    answered by renewing the token (at most once per 20 minutes) and sending
    once more. In-flight requests per connection follow the server's live
    MAX_CONCURRENT_STREAMS (see :mod:`pushstream.senders.http2`).
    """

    def __init__(
        self,
        apps: Sequence[ApnsApp],
        endpoints: Endpoints | None = None,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        connections: int = DEFAULT_CONNECTIONS,
        h2_options: http2.H2Options | None = None,
        clock: Clock = time.time,
    ) -> None:
        self._app_settings = tuple(apps)
        self._endpoints = endpoints or Endpoints()
        self._timeout = request_timeout
        options = h2_options or http2.H2Options(max_connections=connections)
        self._h2_options = dataclasses.replace(
            options, never_indexed=options.never_indexed | UNIQUE_HEADERS
        )
        self._clock = clock
        self._apps: dict[str, _Credential] = {}
        self._hosts: dict[str, tuple[str, int]] = {}
        self._pools: dict[tuple[str, str], http2.H2Pool] = {}
        self._warned: set[tuple[str, str]] = set()
        self._started = False
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> ApnsClient:
        """A client for every APNs app in ``settings`` (not started yet)."""
        return cls(
            settings.apns,
            settings.endpoints,
            request_timeout=settings.request_timeout_s,
            connections=settings.connections_per_host,
        )

    async def __aenter__(self) -> ApnsClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def provider_tokens(self) -> dict[tuple[str, str], ProviderToken]:
        """The provider token of each (team id, key id) in use."""
        return {
            (c.tokens.team_id, c.tokens.key_id): c.tokens
            for c in self._apps.values()
            if c.tokens is not None
        }

    def stats(self) -> dict[str, http2.PoolStats]:
        """Each open pool's numbers, named "<credential> @ <host:port>"."""
        return {
            f"{credential} @ {pool.host}:{pool.port}": pool.stats()
            for (credential, _), pool in self._pools.items()
        }

    async def start(self) -> None:
        """Read and check every credential; raises ConfigError naming the
        setting. Connections open on first use. Safe to call twice."""
        if self._started:
            return
        self._apps, self._hosts = await asyncio.to_thread(self._load)
        self._started = True
        log.info(
            "APNs client ready: %d app(s), %d credential(s)",
            len(self._apps),
            len({id(c) for c in self._apps.values()}),
        )

    async def aclose(self) -> None:
        """Close every connection; in-flight sends end as retries. Idempotent."""
        self._closed = True
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(pool.aclose() for pool in pools))

    async def send(self, send: Send) -> SendResult:
        """Send one rendered request and classify APNs' answer."""
        if not self._started or self._closed:
            raise RuntimeError("ApnsClient.send() needs start() and no aclose()")
        credential = self._apps.get(send.app)
        if credential is None:
            return SendResult("failed", NOT_CONFIGURED)
        if not APNS_TOKEN_RE.match(send.token):
            return SendResult("invalid_token", MALFORMED_TOKEN)

        pool = self._pool(credential, send.environment)
        path = "/3/device/" + send.token
        body = send.body.encode()
        headers = {k.lower(): v for k, v in send.headers.items()}
        headers.pop("authorization", None)
        resent = renewed = False
        while True:
            bearer = credential.tokens.current() if credential.tokens else None
            if bearer is not None:
                headers["authorization"] = "bearer " + bearer
            try:
                response = await pool.request(
                    "POST", path, headers, body, self._timeout
                )
            except http2.RequestTimeout:
                return SendResult("retry", "timeout")
            except http2.ConnectError:
                return SendResult("retry", "connect_failed")
            except http2.InvalidRequest:
                return SendResult("failed", INVALID_HEADER)
            except http2.ConnectionLost as exc:
                if not resent:
                    resent = True
                    continue
                # Killed twice for breaking HTTP/2: maybe by this request,
                # maybe by one beside it; retried later, not an outage.
                reason = PROTOCOL_ERROR if exc.protocol_error else "connection_lost"
                return SendResult("retry", reason)
            except http2.ProtocolError as exc:
                if exc.retryable and not resent:
                    resent = True
                    continue
                outcome: ResultOutcome = "failed" if exc.malformed else "retry"
                return SendResult(outcome, PROTOCOL_ERROR)

            result = classify(response.status, response.headers, response.body)
            if (
                result.reason == "ExpiredProviderToken"
                and credential.tokens is not None
                and bearer is not None
                and not renewed
            ):
                renewed = True
                if credential.tokens.renew_after_expired(bearer):
                    continue
            self._after(credential, pool, send, result)
            return result

    def _after(
        self,
        credential: _Credential,
        pool: http2.H2Pool,
        send: Send,
        result: SendResult,
    ) -> None:
        log.debug(
            "APNs %s for %s… (%s): %s",
            result.outcome,
            send.token[:8],
            send.app,
            result.reason,
        )
        if result.reason in _RECONNECT_REASONS:
            pool.reset()
        known = REASONS.get(result.reason)
        alarming = (known is not None and known.meaning == _CONFIG) or (
            known is None and result.reason != DELIVERED
        )
        if result.reason == "TooManyProviderTokenUpdates":
            alarming = True
        key = (send.app, result.reason)
        if alarming and key not in self._warned:
            self._warned.add(key)
            meaning = known.meaning if known else "a reason not in Apple's table"
            log.warning(
                "APNs answers %s %s for app %s (%s): %s",
                result.status,
                result.reason,
                send.app,
                credential.name,
                meaning,
            )

    def _pool(self, credential: _Credential, environment: Environment) -> http2.H2Pool:
        pool = self._pools.get((credential.name, environment))
        if pool is None:
            host, port = self._hosts[environment]
            pool = http2.H2Pool(
                host,
                port,
                credential.context,
                server_hostname=host,
                options=self._h2_options,
            )
            self._pools[(credential.name, environment)] = pool
        return pool

    # -- loading (blocking; runs in a thread) ----------------------------------------

    def _load(self) -> tuple[dict[str, _Credential], dict[str, tuple[str, int]]]:
        endpoints = self._endpoints
        hosts = {
            "production": _host(endpoints.apns_production, "apns_production"),
            "development": _host(endpoints.apns_development, "apns_development"),
        }
        cafile = None
        if endpoints.ca_file is not None:
            if not endpoints.ca_file.is_file():
                raise ConfigError(
                    f"PUSHSTREAM_ENDPOINTS__CA_FILE: no such file: {endpoints.ca_file}"
                )
            cafile = str(endpoints.ca_file)

        apps: dict[str, _Credential] = {}
        credentials: dict[tuple[str, ...], _Credential] = {}
        keys: dict[tuple[str, str], ec.EllipticCurvePublicNumbers] = {}
        for index, app in enumerate(self._app_settings):
            if app.bundle_id in apps:
                raise ConfigError(
                    f"{setting_name(index, 'bundle_id')}: {app.bundle_id} is listed "
                    "twice"
                )
            if app.auth == "token":
                apps[app.bundle_id] = self._token_credential(
                    app, index, cafile, credentials, keys
                )
            else:
                apps[app.bundle_id] = self._cert_credential(
                    app, index, cafile, credentials
                )
        _warn_shared_teams(credentials.values())
        return apps, hosts

    def _token_credential(
        self,
        app: ApnsApp,
        index: int,
        cafile: str | None,
        credentials: dict[tuple[str, ...], _Credential],
        keys: dict[tuple[str, str], ec.EllipticCurvePublicNumbers],
    ) -> _Credential:
        key = load_signing_key(app, index)
        # load_signing_key refuses an app without both ids.
        assert app.team_id is not None
        assert app.key_id is not None
        ids = (app.team_id, app.key_id)
        numbers = key.public_key().public_numbers()
        if keys.setdefault(ids, numbers) != numbers:
            raise ConfigError(
                f"{setting_name(index, 'key_id')}: key {app.key_id} of team "
                f"{app.team_id} is configured with two different keys"
            )
        credential = credentials.get(("token", *ids))
        if credential is None:
            credential = _Credential(
                name=f"team {app.team_id} key {app.key_id}",
                context=_context(cafile),
                tokens=ProviderToken(app.team_id, app.key_id, key, self._clock),
            )
            credentials[("token", *ids)] = credential
        return credential

    def _cert_credential(
        self,
        app: ApnsApp,
        index: int,
        cafile: str | None,
        credentials: dict[tuple[str, ...], _Credential],
    ) -> _Credential:
        path = app.cert_file.resolve() if app.cert_file else None
        credential = credentials.get(("certificate", str(path)))
        if credential is None:
            context = _context(cafile)
            cert = load_client_certificate(context, app, index)
            topics = certificate_topics(cert)
            if topics and app.bundle_id not in topics:
                log.warning(
                    "the APNs certificate of %s is issued for %s",
                    app.bundle_id,
                    ", ".join(topics),
                )
            credential = _Credential(
                name=f"certificate {path.name if path else '?'}", context=context
            )
            credentials[("certificate", str(path))] = credential
        return credential


def _context(cafile: str | None) -> ssl.SSLContext:
    try:
        return http2.client_ssl_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"PUSHSTREAM_ENDPOINTS__CA_FILE: cannot load {cafile}: {exc}"
        ) from None


def _host(url: str, field: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            f"PUSHSTREAM_ENDPOINTS__{field.upper()}: APNs needs an https:// URL, "
            f"not {url!r}"
        )
    try:
        port = parts.port or 443
    except ValueError:
        raise ConfigError(f"PUSHSTREAM_ENDPOINTS__{field.upper()}: bad port") from None
    return parts.hostname, port


def _warn_shared_teams(credentials: Iterable[_Credential]) -> None:
    teams: dict[str, int] = {}
    for credential in credentials:
        if credential.tokens is not None:
            team = credential.tokens.team_id
            teams[team] = teams.get(team, 0) + 1
    for team, count in teams.items():
        if count > 1:
            log.warning(
                "%d APNs keys of team %s are in use; Apple counts token updates "
                "per team, so they may draw TooManyProviderTokenUpdates",
                count,
                team,
            )
