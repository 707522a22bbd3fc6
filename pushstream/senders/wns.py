"""Windows Push Notification Services (WNS): rendering, the answer table and
the client (access tokens: :mod:`pushstream.senders.wns_auth`).

WNS takes one HTTP/1.1 POST per notification to the device's *channel URI*
(PROTOCOLS.md 3.3): no chunked bodies, no pipelining, no
``Expect: 100-continue``, a body of at most 5000 bytes, and a bearer token
from the app's OAuth client-credentials grant (login.live.com for UWP apps,
Microsoft Entra ID for Windows App SDK apps).

The channel URI is the device's token, and it comes from a client: before
the bearer token goes to one, the URI must pass the channel allow-list
(:func:`pushstream.senders.allowlist.channel_problem`), the same check the
registry applies when the device registers. It is never logged in full.

Notifications go out on :class:`~pushstream.senders.http1.Http1Pool`, our
own keep-alive HTTP/1.1 client (httpx's pool cost about a millisecond of CPU
per send); the rare token requests use httpx.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import NamedTuple
from urllib.parse import parse_qsl, quote, urlencode, urlsplit
from xml.sax.saxutils import escape

import httpx

from pushstream.config import ConfigError, Endpoints, Settings, WnsApp
from pushstream.events import Notification, Send, WnsOverrides
from pushstream.senders import http1
from pushstream.senders.allowlist import channel_problem
from pushstream.senders.oauth import TokenCache, TokenError
from pushstream.senders.result import Rendered, ResultOutcome, SendResult, Target
from pushstream.senders.wns_auth import WnsTokenSource, client_secret, token_request

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 5000  # WNS answers 413 above this (PROTOCOLS.md 3.3).
MAX_REASON_DETAIL = 200
# HTTP/1.1 carries one request per connection at a time: this many sends to
# one regional host at once, the others wait for a connection. Idle ones close
# after a few seconds, so hosts no longer sent to hold none.
MAX_CONNECTIONS = 24

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

    The type is ``n.wns.type`` when given; otherwise a toast for ``n.wns.xml``
    or text to show (title, subtitle or body), and a raw notification for
    ``n.wns.raw`` or when there is no text (a data-only push). A toast, tile
    or badge is built from the unified content unless ``n.wns.xml`` is given;
    a raw body is ``n.wns.raw`` or, without it, the content as compact JSON.
    ``X-WNS-TTL`` is the time left until ``expires_at_ms``. A ``ttl`` of 0
    ("now or never") has no X-WNS-TTL (WNS has no zero) and
    ``X-WNS-Cache-Policy: no-cache``, so WNS keeps nothing for a device that
    is offline. ``too_large`` is set above 5000 bytes.
    """
    wns = n.wns or WnsOverrides()
    kind = _kind(n, wns)
    body = _body(n, wns, kind)
    headers = {
        "X-WNS-Type": f"wns/{kind}",
        "Content-Type": _CONTENT_TYPES[kind],
        "X-WNS-PRIORITY": _PRIORITIES[n.priority],
    }
    if expires_at_ms is not None and n.ttl != 0:
        headers["X-WNS-TTL"] = str(ttl_seconds(expires_at_ms, now_ms))
    if wns.cache_policy:
        headers["X-WNS-Cache-Policy"] = wns.cache_policy
    if n.ttl == 0:
        headers["X-WNS-Cache-Policy"] = "no-cache"
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
    if wns.xml is not None:
        return "toast"
    if wns.raw is None and (n.title or n.subtitle or n.body):
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


# --- the client --------------------------------------------------------------------

# Printable ASCII: kept as it is in a request target.
_PRINTABLE_ASCII = "".join(map(chr, range(0x21, 0x7F)))

# Headers a Send may not set: the client owns authentication and framing.
_RESERVED = {
    "x-wns-ttl",
    "authorization",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "expect",
    "ms-cv",
}


@dataclass(frozen=True, slots=True)
class _AppConfig:
    app: WnsApp
    setting: str  # PUSHSTREAM_WNS__<i>: where the app is configured


class ChannelUrl(NamedTuple):
    """Where a channel's notifications go: the origin and the request target
    (path and query, as the channel URI has them)."""

    host: str
    port: int
    target: str


@dataclass(slots=True)
class _Session:
    pool: http1.Http1Pool
    token_http: httpx.AsyncClient
    tokens: dict[str, TokenCache]


class WnsClient:
    """Sends :class:`~pushstream.events.Send` values to WNS channels.

    One access token per app (``Send.app`` is the app's ``package``), cached
    until shortly before it expires. A 401 makes the client fetch a new token
    and try once more. A channel URI that fails the allow-list is answered
    ``failed``/``untrusted_channel`` without any request. ``send`` never
    raises for a provider's answer: no answer becomes ``retry`` with reason
    ``timeout`` or ``connection_lost``.
    """

    def __init__(
        self,
        apps: Iterable[tuple[WnsApp, str]],
        *,
        endpoints: Endpoints | None = None,
        allowed_hosts: Iterable[str] = (),
        request_timeout_s: float = 10.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._apps = {app.package: _AppConfig(app, setting) for app, setting in apps}
        self._endpoints = endpoints or Endpoints()
        self._allowed_hosts = tuple(allowed_hosts)
        self._timeout = request_timeout_s
        self._max_connections = max_connections
        self._session: _Session | None = None
        self._lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> WnsClient:
        """A client for every configured app; ConfigError names a bad setting."""
        apps = []
        seen: set[str] = set()
        for index, app in enumerate(settings.wns):
            setting = f"PUSHSTREAM_WNS__{index}"
            if app.package in seen:
                raise ConfigError(
                    f"{setting}__PACKAGE: {app.package!r} is configured twice"
                )
            if app.client_secret is None and app.client_secret_file is None:
                raise ConfigError(
                    f"{setting}__CLIENT_SECRET: app {app.package!r} has no client "
                    "secret (set client_secret or client_secret_file)"
                )
            if app.auth == "entra" and not app.tenant_id:
                raise ConfigError(
                    f"{setting}__TENANT_ID: app {app.package!r} uses Entra ID "
                    "and needs its tenant id"
                )
            seen.add(app.package)
            apps.append((app, setting))
        return cls(
            apps,
            endpoints=settings.endpoints,
            allowed_hosts=settings.wns_allowed_hosts,
            request_timeout_s=settings.request_timeout_s,
            max_connections=min(settings.max_in_flight, MAX_CONNECTIONS),
        )

    async def __aenter__(self) -> WnsClient:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Read the secrets and open the connection pool (safe to call twice).

        Raises ConfigError naming the setting of a missing or unreadable
        secret file, or of an unreadable CA file.
        """
        async with self._lock:
            if self._session is not None:
                return
            secrets = await asyncio.to_thread(self._read_secrets)
            context = await asyncio.to_thread(_ssl_context, self._endpoints.ca_file)
            # Waiting for a free connection is bounded by the caller's own
            # in-flight limit; connecting and answering are timed.
            pool = http1.Http1Pool(
                context,
                max_connections=self._max_connections,
                timeout=self._timeout,
                connect_timeout=self._timeout,
            )
            token_http = httpx.AsyncClient(
                verify=context, follow_redirects=False, timeout=self._timeout
            )
            tokens = {}
            for package, config in self._apps.items():
                url, form = token_request(config.app, secrets[package], self._endpoints)
                source = WnsTokenSource(url, form, token_http)
                tokens[package] = TokenCache(source, name=f"wns {package}")
            self._session = _Session(pool, token_http, tokens)
            log.info("WNS client started (%d apps)", len(tokens))

    async def aclose(self) -> None:
        """Close the pool and stop token refreshes (safe to call twice)."""
        async with self._lock:
            session, self._session = self._session, None
            if session is None:
                return
            for cache in session.tokens.values():
                await cache.aclose()
            await session.pool.aclose()
            await session.token_http.aclose()
            log.info("WNS client closed")

    async def send(self, send: Send) -> SendResult:
        """POST one notification to its channel and classify the answer."""
        session = self._session
        if session is None:
            raise RuntimeError("WnsClient.send() before start()")
        tokens = session.tokens.get(send.app)
        if tokens is None:
            return SendResult("failed", "unknown_app")
        url = self.channel_url(send.token)
        if url is None:
            log.debug("WNS channel %s is not trusted", shorten_channel(send.token))
            return SendResult("failed", "untrusted_channel")

        headers = _request_headers(send)
        body = utf8(send.body)
        for attempt in (1, 2):
            try:
                token = await tokens.get()
            except TokenError as exc:
                outcome: ResultOutcome = "retry" if exc.retriable else "failed"
                return SendResult(outcome, f"access_token: {exc.reason}")
            headers["Authorization"] = f"Bearer {token}"
            try:
                response = await session.pool.request(
                    url.host, url.port, "POST", url.target, headers.items(), body
                )
            except http1.Timeout:
                return SendResult("retry", "timeout")
            except http1.InvalidRequest:
                # A header h11 refuses to write, or not ASCII: nothing was sent.
                return SendResult("failed", "invalid_header")
            except http1.TransportError:
                return SendResult("retry", "connection_lost")
            if response.status != 401 or attempt == 2:
                break
            # Expected at least daily: tokens expire (PROTOCOLS.md 3.5).
            tokens.invalidate(token)
            log.debug(
                "WNS refused the access token of %s; fetching a new one", send.app
            )

        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "WNS %s: %d %s (msg %s, cv %s)",
                shorten_channel(send.token),
                response.status,
                response.headers.get("x-wns-status", ""),
                response.headers.get("x-wns-msg-id", ""),
                headers["MS-CV"],
            )
        return classify(response.status, response.headers, response.body)

    def channel_url(self, uri: str) -> ChannelUrl | None:
        """Where to POST, or None when the channel is not trusted.

        Host and port come from the parser the allow-list uses
        (``urlsplit``), so the host checked is the host that gets the bearer
        token. The target is the URI's path and query as written; characters
        outside ASCII, which no WNS channel has, are percent-encoded as UTF-8.
        """
        if channel_problem(uri, self._allowed_hosts) is not None:
            return None
        try:
            parts = urlsplit(uri)
            port = parts.port or 443
        except ValueError:
            return None
        host = parts.hostname
        if not host or not host.isascii():
            return None
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        if not target.isascii():
            target = quote(target, safe=_PRINTABLE_ASCII)
        return ChannelUrl(host, port, target)

    def _read_secrets(self) -> dict[str, str]:
        return {
            package: client_secret(config.app, config.setting)
            for package, config in self._apps.items()
        }


def _request_headers(send: Send) -> dict[str, str]:
    headers = {k: v for k, v in send.headers.items() if k.lower() not in _RESERVED}
    if send.expires_at_ms is not None and not send.now_or_never:
        # The router rendered the TTL for its own moment; a retry goes later.
        now_ms = time.time_ns() // 1_000_000
        headers["X-WNS-TTL"] = str(ttl_seconds(send.expires_at_ms, now_ms))
    headers["MS-CV"] = base64.b64encode(os.urandom(12)).decode() + ".0"
    return headers


def _ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"PUSHSTREAM_ENDPOINTS__CA_FILE: cannot load {ca_file}: {exc}"
            ) from None
    return context
