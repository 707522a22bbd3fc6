"""Access tokens for WNS: the two OAuth client-credentials grants.

UWP apps ask login.live.com with their package SID and secret, scope
``notify.windows.com`` (PROTOCOLS.md 3.1); Windows App SDK apps ask their
Microsoft Entra ID tenant, scope ``https://wns.windows.com/.default`` (3.2).
Both answer JSON with ``access_token`` and ``expires_in``; tokens are cached
by :class:`~pushstream.senders.oauth.TokenCache`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote

import httpx

from pushstream.config import ConfigError, Endpoints, WnsApp
from pushstream.senders.oauth import TokenError, parse_token_response

LIVE_SCOPE = "notify.windows.com"
ENTRA_SCOPE = "https://wns.windows.com/.default"
# Without expires_in, assume the shortest lifetime any OAuth server gives.
DEFAULT_TOKEN_LIFETIME_S = 3600.0

_DIGITS = re.compile("[0-9]+")


def token_request(
    app: WnsApp, secret: str, endpoints: Endpoints
) -> tuple[str, dict[str, str]]:
    """The token endpoint URL and form of an app's client-credentials grant.

    ``live``: login.live.com, client id = the package SID, scope
    ``notify.windows.com`` (PROTOCOLS.md 3.1). ``entra``: the tenant's
    Microsoft Entra ID v2 endpoint, scope ``https://wns.windows.com/.default``
    (3.2).
    """
    form = {
        "grant_type": "client_credentials",
        "client_id": app.client_id,
        "client_secret": secret,
    }
    if app.auth == "entra":
        url = endpoints.wns_entra_token.format(
            tenant=quote(app.tenant_id or "", safe="")
        )
        return url, form | {"scope": ENTRA_SCOPE}
    return endpoints.wns_live_token, form | {"scope": LIVE_SCOPE}


def parse_token(status: int, body: bytes) -> tuple[str, float]:
    """``(access_token, expires_in_s)`` from either token endpoint.

    login.live.com and Entra v2 give ``expires_in`` as a number; Microsoft's
    own Entra sample shows it as a string (``"86399"``): both are read.
    Errors raise :class:`~pushstream.senders.oauth.TokenError` (a refused
    credential is not retriable).
    """
    if status != 200:
        return parse_token_response(status, body)
    try:
        info = json.loads(body)
    except ValueError:
        info = None
    if not isinstance(info, dict):
        raise TokenError("token endpoint answered 200 without JSON", retriable=True)
    token = info.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenError("token endpoint gave no access_token", retriable=True)
    lifetime = info.get("expires_in", DEFAULT_TOKEN_LIFETIME_S)
    if isinstance(lifetime, str) and _DIGITS.fullmatch(lifetime):
        lifetime = int(lifetime)
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float):
        raise TokenError("token endpoint gave a bad expires_in", retriable=True)
    if lifetime <= 0:
        raise TokenError("token endpoint gave a bad expires_in", retriable=True)
    return token, float(lifetime)


class WnsTokenSource:
    """Fetches one app's access token; the shape :class:`TokenCache` calls."""

    def __init__(self, url: str, form: dict[str, str], http: httpx.AsyncClient) -> None:
        self._url = url
        self._form = form
        self._http = http

    def __repr__(self) -> str:
        return f"WnsTokenSource({self._url!r}, client_id={self._form['client_id']!r})"

    async def __call__(self) -> tuple[str, float]:
        try:
            response = await self._http.post(self._url, data=self._form)
        except httpx.HTTPError as exc:
            raise TokenError(
                f"token endpoint unreachable ({type(exc).__name__})", retriable=True
            ) from exc
        return parse_token(response.status_code, response.content)


def client_secret(app: WnsApp, setting: str) -> str:
    """The app's client secret, from ``client_secret`` or its file.

    ``setting`` is where the app is configured (``PUSHSTREAM_WNS__<i>``);
    a missing, unreadable or empty secret raises ConfigError naming it.
    Reads a file: call it off the event loop.
    """
    if app.client_secret is not None:
        secret = app.client_secret.get_secret_value().strip()
        name = f"{setting}__CLIENT_SECRET"
    else:
        path = app.client_secret_file or Path()
        name = f"{setting}__CLIENT_SECRET_FILE"
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or type(exc).__name__
            raise ConfigError(f"{name}: cannot read {path}: {why}") from None
    if not secret:
        raise ConfigError(f"{name}: the client secret of {app.package!r} is empty")
    return secret
