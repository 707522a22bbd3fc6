"""A stand-in for WNS and its two token endpoints, on one HTTPS server.

Routes (serve them over HTTP/1.1: WNS documents nothing else):

- ``POST /accesstoken.srf``: login.live.com's client-credentials grant
  (``scope=notify.windows.com``) for apps with ``auth="live"``.
- ``POST /{tenant}/oauth2/v2.0/token``: Microsoft Entra ID v2's grant
  (``scope=https://wns.windows.com/.default``) for apps with ``auth="entra"``.
- ``POST /?token=<channel token>``: a channel. :meth:`WnsSandbox.channel_uri`
  makes the URIs (``https://127.0.0.1:<port>/?token=...``).

Token endpoints check the form: a wrong client id or secret answers
``400 invalid_client``, a wrong scope ``400 invalid_scope``, a wrong grant
``400 unsupported_grant_type``, a wrong Entra tenant ``400
unauthorized_client``. Access tokens live ``token_lifetime_s`` (default one
day, as at Microsoft); :meth:`WnsSandbox.expire_tokens` ends them early.
``entra_string_numbers`` answers Entra's numbers as strings, as Microsoft's
own sample shows them.

A channel answers, in this order (PROTOCOLS.md 3.5):

- 405 for a method other than POST;
- 401 without a known bearer token, with ``WWW-Authenticate`` saying
  "Token expired" when the token has expired;
- 404 for a channel token that does not decode, 410 for an expired channel;
- 403 when the access token's app is not the channel's app;
- 400 without Content-Length (chunked bodies never reach the handler: the
  server refuses them), with a missing or unknown ``X-WNS-Type``, with a
  Content-Type that does not fit the type, or with a malformed optional
  header (tag, group, TTL, cache policy, priority, request-for-status);
- 413 for a body over 5000 bytes;
- the channel's scenario, else ``200`` with ``X-WNS-Status: received``.

Every channel answer carries ``X-WNS-Status``, ``X-WNS-Msg-ID``,
``X-WNS-Debug-Trace`` and ``MS-CV`` (the request's, when it sent one);
``X-WNS-DeviceConnectionStatus`` only when ``X-WNS-RequestForStatus: true``
asked for it. Errors carry ``X-WNS-Error-Description``.

A channel token is ``<scenario>.<app package, base64url>.<random>``, so the
app check needs no state. Scenarios:

==================== =====================================================
``ok``               200, ``X-WNS-Status: received``
``expired``          410 Gone: the channel expired (delete it)
``unknown``          404 Not Found: no such channel (delete it)
``throttled``        406 Not Acceptable with ``Retry-After`` (``retry_after_s``)
``dropped``          200, ``X-WNS-Status: dropped`` (device offline)
``channelthrottled`` 200, ``X-WNS-Status: channelthrottled``
``unavailable``      503 Service Unavailable with ``Retry-After``
``failing``          500 Internal Server Error
``slow``             200 after ``slow_s`` seconds
==================== =====================================================

:meth:`WnsSandbox.set_scenario` changes one channel's scenario at run time.
``outage`` makes every channel answer 503 (``outage_mode="503"``) or never
answer (``"hang"``). Each accepted notification is appended to ``accepted``
(platform, channel URI as ``token``, app, ``provider_id``, type, headers
without Authorization, body, ``body_size``, ``xml_ok``, time); ``stats``
counts channel answers by status, ``token_requests`` token grants by flow.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit
from xml.etree import ElementTree

from pushstream.sandbox.certs import SandboxCerts
from pushstream.sandbox.server import Handler, Request, Response, SandboxServer

SCENARIOS = (
    "ok",
    "expired",
    "unknown",
    "throttled",
    "dropped",
    "channelthrottled",
    "unavailable",
    "failing",
    "slow",
)
MAX_BODY_BYTES = 5000
DEFAULT_TOKEN_LIFETIME_S = 86400
MAX_ACCEPTED = 100_000  # records kept; older ones are dropped first
LIVE_SCOPE = "notify.windows.com"
ENTRA_SCOPE = "https://wns.windows.com/.default"

_TYPES = {
    "wns/toast": "text/xml",
    "wns/tile": "text/xml",
    "wns/badge": "text/xml",
    "wns/raw": "application/octet-stream",
}
_ENTRA_PATH = re.compile(r"^/([^/?]+)/oauth2/v2\.0/token$")
_ALNUM16 = re.compile(r"^[A-Za-z0-9]{1,16}$")
_DIGITS = re.compile(r"^[0-9]{1,10}$")
_HEADER_CHECKS = (
    ("x-wns-tag", _ALNUM16),
    ("x-wns-group", _ALNUM16),
    ("x-wns-ttl", _DIGITS),
    ("x-wns-cache-policy", re.compile("^(cache|no-cache)$")),
    ("x-wns-requestforstatus", re.compile("^(true|false)$", re.I)),
    ("x-wns-priority", re.compile("^[1-4]$")),
)


@dataclass(frozen=True, slots=True)
class SandboxApp:
    """One app the token endpoints know."""

    package: str
    client_id: str
    secret: str
    auth: Literal["live", "entra"] = "live"
    tenant_id: str | None = None


@dataclass(slots=True)
class _AccessToken:
    package: str
    expires_at: float


class WnsError(Exception):
    """A channel request refused with ``status`` and a description."""

    def __init__(self, status: int, description: str, **headers: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description
        self.headers = headers


class WnsSandbox:
    """The WNS stand-in: ``await handle(request)`` answers one request.

    ``base_url`` (``https://host:port``, set once the server listens) is what
    :meth:`channel_uri` and :meth:`make_credentials` put in URLs. ``clock``
    gives seconds for token lifetimes (monotonic by default).
    """

    def __init__(
        self,
        base_url: str = "",
        *,
        token_lifetime_s: int = DEFAULT_TOKEN_LIFETIME_S,
        entra_string_numbers: bool = False,
        retry_after_s: int = 30,
        slow_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = base_url
        self.token_lifetime_s = token_lifetime_s
        self.entra_string_numbers = entra_string_numbers
        self.retry_after_s = retry_after_s
        self.slow_s = slow_s
        self.outage = False
        self.outage_mode: Literal["503", "hang"] = "503"
        self.accepted: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self.token_requests: Counter[str] = Counter()
        self._clock = clock
        self._apps: dict[str, SandboxApp] = {}
        self._tokens: dict[str, _AccessToken] = {}
        self._scenarios: dict[str, str] = {}
        self._msg_ids = 0

    # --- set-up ------------------------------------------------------------------

    def add_app(self, app: SandboxApp) -> None:
        """Let the token endpoints issue tokens to ``app``."""
        self._apps[app.client_id] = app

    def make_credentials(self, folder: Path) -> dict[str, str]:
        """Create two throwaway apps (one ``live``, one ``entra``), write their
        secrets into ``folder`` and return the PUSHSTREAM_* settings that
        point a worker at them (and at this sandbox, once ``base_url`` is set).
        """
        folder.mkdir(parents=True, exist_ok=True)
        apps = [
            SandboxApp(
                package="Contoso.Sandbox",
                client_id=f"ms-app://S-1-15-2-{secrets.randbelow(10**10)}",
                secret=secrets.token_urlsafe(24),
            ),
            SandboxApp(
                package="Contoso.SandboxDesktop",
                client_id=str(uuid.uuid4()),
                secret=secrets.token_urlsafe(24),
                auth="entra",
                tenant_id=str(uuid.uuid4()),
            ),
        ]
        settings = []
        for app in apps:
            path = folder / f"wns-{app.package}.secret"
            path.touch(mode=0o600)
            path.write_text(app.secret + "\n", encoding="utf-8")
            self.add_app(app)
            entry = {
                "package": app.package,
                "auth": app.auth,
                "client_id": app.client_id,
                "client_secret_file": str(path),
            }
            if app.tenant_id:
                entry["tenant_id"] = app.tenant_id
            settings.append(entry)
        values = {"PUSHSTREAM_WNS": json.dumps(settings)}
        if self.base_url:
            host = urlsplit(self.base_url).netloc
            values |= {
                "PUSHSTREAM_ENDPOINTS__WNS_LIVE_TOKEN": self.base_url
                + "/accesstoken.srf",
                "PUSHSTREAM_ENDPOINTS__WNS_ENTRA_TOKEN": self.base_url
                + "/{tenant}/oauth2/v2.0/token",
                "PUSHSTREAM_WNS_ALLOWED_HOSTS": json.dumps([host]),
            }
        return values

    def channel_uri(self, package: str, scenario: str = "ok") -> str:
        """A new channel URI of ``package`` that answers as ``scenario`` does."""
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown WNS scenario {scenario!r}")
        app = base64.urlsafe_b64encode(package.encode()).decode().rstrip("=")
        token = f"{scenario}.{app}.{secrets.token_urlsafe(12)}"
        return f"{self.base_url}/?{urlencode({'token': token})}"

    def set_scenario(self, channel: str, scenario: str) -> None:
        """Make a channel (its URI or token) answer as ``scenario`` from now on."""
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown WNS scenario {scenario!r}")
        self._scenarios[_channel_token(channel)] = scenario

    def expire_tokens(self, package: str | None = None) -> int:
        """End the access tokens issued so far (of one app, or all); returns
        how many. The next use of one answers 401 "Token expired"."""
        now = self._clock()
        ended = 0
        for token in self._tokens.values():
            if package in (None, token.package) and token.expires_at > now:
                token.expires_at = now
                ended += 1
        return ended

    def server(
        self,
        certs: SandboxCerts,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        handler: Handler | None = None,
    ) -> SandboxServer:
        """A :class:`SandboxServer` for this stand-in over TLS and HTTP/1.1, as
        WNS speaks (not started yet); ``handler`` replaces :meth:`handle`."""
        return SandboxServer(
            host,
            port,
            certs.server_ssl_context(alpn=("http/1.1",)),
            handler or self.handle,
            protocols=("http/1.1",),
            name="wns",
        )

    # --- requests ----------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        """Answer one request (the :class:`SandboxServer` handler)."""
        path = req.path.partition("?")[0]
        if path == "/accesstoken.srf":
            return self._live_token(req)
        match = _ENTRA_PATH.match(path)
        if match:
            return self._entra_token(req, match.group(1))
        response = await self._channel(req)
        self.stats[str(response.status)] += 1
        return response

    def _live_token(self, req: Request) -> Response:
        self.token_requests["live"] += 1
        form, error = self._token_form(req, "live", LIVE_SCOPE)
        if error:
            return _oauth_error(error[0], error[1])
        body = {
            "token_type": "bearer",
            "access_token": self._issue(form),
            "expires_in": self.token_lifetime_s,
        }
        return _json(200, body)

    def _entra_token(self, req: Request, tenant: str) -> Response:
        self.token_requests["entra"] += 1
        form, error = self._token_form(req, "entra", ENTRA_SCOPE)
        app = self._apps.get(form.get("client_id", ""))
        if not error and app is not None and app.tenant_id != tenant:
            error = (
                "unauthorized_client",
                "AADSTS700016: Application was not found in the directory.",
            )
        if error and error[0] == "invalid_client":
            error = (error[0], "AADSTS7000215: " + error[1])
        if error:
            return _oauth_error(*error, entra=True)
        lifetime = self.token_lifetime_s
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "expires_in": lifetime,
            "ext_expires_in": lifetime,
            "access_token": self._issue(form),
        }
        if self.entra_string_numbers:
            now = int(time.time())
            body |= {
                "expires_in": str(lifetime),
                "ext_expires_in": str(lifetime),
                "expires_on": str(now + lifetime),
                "not_before": str(now),
            }
        return _json(200, body)

    def _token_form(
        self, req: Request, auth: str, scope: str
    ) -> tuple[dict[str, str], tuple[str, str] | None]:
        if req.method != "POST":
            return {}, ("invalid_request", "The token endpoint takes POST.")
        content_type = req.headers.get("content-type", "").split(";")[0].strip()
        if content_type.lower() != "application/x-www-form-urlencoded":
            return {}, ("invalid_request", "The body must be a URL-encoded form.")
        try:
            pairs = parse_qs(req.body.decode("ascii"), strict_parsing=True)
        except (UnicodeDecodeError, ValueError):
            return {}, ("invalid_request", "The form is malformed.")
        form = {name: values[-1] for name, values in pairs.items()}
        if form.get("grant_type") != "client_credentials":
            return form, ("unsupported_grant_type", "Use client_credentials.")
        app = self._apps.get(form.get("client_id", ""))
        secret = form.get("client_secret", "")
        if app is None or app.auth != auth:
            return form, ("invalid_client", "The client id is not known here.")
        if not secrets.compare_digest(secret.encode(), app.secret.encode()):
            return form, ("invalid_client", "Invalid client secret provided.")
        if form.get("scope") != scope:
            return form, ("invalid_scope", f"The scope must be {scope}.")
        return form, None

    def _issue(self, form: dict[str, str]) -> str:
        now = self._clock()
        self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > now}
        token = secrets.token_urlsafe(32)
        package = self._apps[form["client_id"]].package
        self._tokens[token] = _AccessToken(package, now + self.token_lifetime_s)
        return token

    async def _channel(self, req: Request) -> Response:
        cv = req.headers.get("ms-cv") or _new_cv()
        msg_id = self._next_msg_id()
        base = {"X-WNS-Msg-ID": msg_id, "X-WNS-Debug-Trace": "SBXWNS" + msg_id[-6:]}
        base["MS-CV"] = cv
        if self.outage:
            if self.outage_mode == "hang":
                await asyncio.Event().wait()  # ends when the client goes away
            return _answer(503, base, "dropped", "Service unavailable (outage).")
        try:
            token, package, scenario = self._check(req)
        except WnsError as exc:
            headers = base | exc.headers
            return _answer(exc.status, headers, "dropped", exc.description)

        if scenario == "throttled":
            headers = base | {"Retry-After": str(self.retry_after_s)}
            return _answer(406, headers, "dropped", "The sender is throttled.")
        if scenario == "unavailable":
            headers = base | {"Retry-After": str(self.retry_after_s)}
            return _answer(503, headers, "dropped", "Service unavailable.")
        if scenario == "failing":
            return _answer(500, base, "dropped", "Internal server error.")
        if scenario == "slow":
            await asyncio.sleep(self.slow_s)
        status = {"dropped": "dropped", "channelthrottled": "channelthrottled"}.get(
            scenario, "received"
        )
        if req.headers.get("x-wns-requestforstatus", "").lower() == "true":
            connected = "disconnected" if status == "dropped" else "connected"
            base["X-WNS-DeviceConnectionStatus"] = connected
        if status == "received":
            self._record(req, token, package, msg_id)
        return _answer(200, base, status)

    def _check(self, req: Request) -> tuple[str, str, str]:
        """The channel token, app and scenario of a request WNS would take."""
        if req.method != "POST":
            raise WnsError(405, "Only POST is allowed.", Allow="POST")
        package = self._authorized(req)
        token = _channel_token(req.path)
        channel_app, scenario = _decode_channel(token)
        scenario = self._scenarios.get(token, scenario)
        if scenario == "unknown":
            raise WnsError(404, "The channel URI is not valid.")
        if scenario == "expired":
            raise WnsError(410, "The channel has expired.")
        if channel_app != package:
            raise WnsError(403, "The token is not valid for this channel's app.")
        _check_headers(req)
        if len(req.body) > MAX_BODY_BYTES:
            raise WnsError(413, f"The payload exceeds {MAX_BODY_BYTES} bytes.")
        return token, package, scenario

    def _authorized(self, req: Request) -> str:
        scheme, _, value = req.headers.get("authorization", "").partition(" ")
        issued = self._tokens.get(value.strip()) if scheme.lower() == "bearer" else None
        if issued is None:
            raise WnsError(
                401,
                "The access token is not valid.",
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        if issued.expires_at <= self._clock():
            raise WnsError(
                401,
                "Token expired.",
                **{
                    "WWW-Authenticate": 'Bearer error="invalid_request",'
                    'error_description="Token expired"'
                },
            )
        return issued.package

    def _record(self, req: Request, token: str, package: str, msg_id: str) -> None:
        headers = {k: v for k, v in req.headers.items() if k != "authorization"}
        kind = req.headers.get("x-wns-type", "")
        self.accepted.append(
            {
                "platform": "wns",
                "token": f"https://{req.authority}{req.path}",
                "channel": token,
                "app": package,
                "provider_id": msg_id,
                "type": kind,
                "headers": headers,
                "body": req.body.decode("utf-8", "replace"),
                "body_size": len(req.body),
                "xml_ok": kind == "wns/raw" or _well_formed(req.body),
                "time": time.time(),
            }
        )
        if len(self.accepted) > MAX_ACCEPTED:
            del self.accepted[: len(self.accepted) - MAX_ACCEPTED]

    def _next_msg_id(self) -> str:
        self._msg_ids += 1
        return f"{self._msg_ids:016X}"


def _check_headers(req: Request) -> None:
    """400 for what WNS refuses in a channel request's headers (PROTOCOLS.md 3.3)."""
    h = req.headers
    if "content-length" not in h:
        raise WnsError(400, "The Content-Length header is required.")
    kind = h.get("x-wns-type", "").lower()
    if kind not in _TYPES:
        raise WnsError(400, "The X-WNS-Type header is missing or not valid.")
    content_type = h.get("content-type", "").split(";")[0].strip().lower()
    if content_type != _TYPES[kind]:
        raise WnsError(400, f"The Content-Type does not match {kind}.")
    for name, pattern in _HEADER_CHECKS:
        if name in h and not pattern.match(h[name]):
            raise WnsError(400, f"The {name} header is not valid.")


def _channel_token(channel: str) -> str:
    values = parse_qs(urlsplit(channel).query).get("token")
    return values[-1] if values else channel


def _decode_channel(token: str) -> tuple[str, str]:
    """(app package, scenario) of a channel token; 404 when it won't decode."""
    scenario, _, rest = token.partition(".")
    encoded, _, nonce = rest.partition(".")
    try:
        package = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        app = package.decode()
    except (binascii.Error, ValueError):
        raise WnsError(404, "The channel URI is not valid.") from None
    if scenario not in SCENARIOS or not app or not nonce:
        raise WnsError(404, "The channel URI is not valid.")
    return app, scenario


@functools.lru_cache(maxsize=1024)
def _well_formed(body: bytes) -> bool:
    """Whether ``body`` parses as XML; remembered, as one notification goes
    to many channels (bodies are at most MAX_BODY_BYTES: under 5 MB)."""
    if b"<!DOCTYPE" in body.upper():
        return False  # no DTDs: entity expansion is not for a sandbox
    try:
        ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return False
    return True


def _answer(
    status: int, headers: dict[str, str], wns_status: str, description: str = ""
) -> Response:
    headers = headers | {"X-WNS-Status": wns_status}
    if description:
        headers["X-WNS-Error-Description"] = description
    return Response(status, headers)


def _oauth_error(error: str, description: str, *, entra: bool = False) -> Response:
    body: dict[str, Any] = {"error": error, "error_description": description}
    if entra:
        code = re.match(r"AADSTS(\d+)", description)
        body |= {
            "error_codes": [int(code.group(1))] if code else [],
            "trace_id": str(uuid.uuid4()),
            "correlation_id": str(uuid.uuid4()),
        }
    return _json(400, body)


def _json(status: int, body: dict[str, Any]) -> Response:
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Cache-Control": "no-store",
    }
    return Response(status, headers, json.dumps(body).encode())


def _new_cv() -> str:
    return base64.b64encode(secrets.token_bytes(12)).decode() + ".0"
