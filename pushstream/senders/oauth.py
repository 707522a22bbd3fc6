"""OAuth2 access tokens for the senders: a shared cache, and Google's grant.

:class:`TokenCache` holds one access token for one credential. However many
sends ask for it at once, at most one request goes to the token endpoint:
the others wait for that request's answer. A token is used until shortly
before it expires; a little earlier still, the next one is fetched in the
background while the current one goes on serving. A provider that answers
"your token is no longer valid" (FCM's 401 UNAUTHENTICATED, WNS's 401) makes
the sender call :meth:`TokenCache.invalidate` with the token it used, then
ask again: the first such call forces one refresh, the others find the new
token already there.

:class:`ServiceAccount` reads a Google service-account key and signs the
RS256 JWT assertion of the JWT-bearer grant (RFC 7523), and
:class:`GoogleTokenSource` exchanges it at the key's ``token_uri``.

Errors: a token that cannot be obtained raises :class:`TokenError`, whose
``retriable`` flag says whether waiting may help (endpoint down, 5xx, 429) or
not (the endpoint refused the credential: a configuration error). A
malformed credential is found at start-up and raises
:class:`~pushstream.config.ConfigError` naming the setting.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from pushstream import metrics
from pushstream.config import ConfigError

log = logging.getLogger(__name__)

Clock = Callable[[], float]
TokenFetch = Callable[[], Awaitable[tuple[str, float]]]

# Google's access tokens live an hour; fetch the next one five minutes early.
DEFAULT_REFRESH_MARGIN_S = 300.0
# Stop using a token this long before its stated expiry (clock drift, transit).
DEFAULT_EXPIRY_SKEW_S = 30.0
# After a failed fetch, callers get the same error for this long instead of
# each sending another request to an endpoint that just failed.
DEFAULT_FAILURE_HOLD_S = 1.0

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# Google refuses assertions valid for longer than an hour.
MAX_ASSERTION_LIFETIME_S = 3600


class TokenError(Exception):
    """No access token could be obtained.

    ``reason`` is short and safe to log (never a secret); ``retriable`` is
    False when the token endpoint refused the credential itself.
    """

    def __init__(self, reason: str, *, retriable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retriable = retriable


@dataclass(slots=True)
class _Token:
    value: str
    fresh_until: float
    usable_until: float


class TokenCache:
    """One access token, fetched once however many callers wait for it.

    ``fetch`` returns ``(access_token, lifetime_s)``; ``clock`` is monotonic
    seconds. The token is refreshed in the background once it is within
    ``refresh_margin_s`` of its expiry (at most half its lifetime), and no
    longer handed out within ``expiry_skew_s`` of it (at most a tenth).
    """

    def __init__(
        self,
        fetch: TokenFetch,
        clock: Clock = time.monotonic,
        *,
        name: str = "",
        refresh_margin_s: float = DEFAULT_REFRESH_MARGIN_S,
        expiry_skew_s: float = DEFAULT_EXPIRY_SKEW_S,
        failure_hold_s: float = DEFAULT_FAILURE_HOLD_S,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._name = name
        self._margin = refresh_margin_s
        self._skew = expiry_skew_s
        self._failure_hold = failure_hold_s
        self._token: _Token | None = None
        self._refresh: asyncio.Task[_Token] | None = None
        self._failure: tuple[TokenError, float] | None = None
        self.fetches = 0

    async def get(self) -> str:
        """A usable access token; raises TokenError when none can be had."""
        token = self._token
        now = self._clock()
        if token is not None and now < token.usable_until:
            if now >= token.fresh_until:
                self._start_refresh(background=True)
            return token.value

        failure = self._failure
        if failure is not None and now < failure[1]:
            raise failure[0]

        # shield: a caller that gives up must not cancel the others' refresh.
        task = self._start_refresh(background=False)
        return (await asyncio.shield(task)).value

    def invalidate(self, token: str) -> None:
        """Forget ``token`` (the provider refused it), unless already replaced."""
        if self._token is not None and self._token.value == token:
            self._token = None
            self._failure = None

    async def aclose(self) -> None:
        """Cancel a refresh in progress."""
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start_refresh(self, *, background: bool) -> asyncio.Task[_Token]:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._run_fetch(background))
            self._refresh.add_done_callback(_retrieve)
        return self._refresh

    async def _run_fetch(self, background: bool) -> _Token:
        started = self._clock()
        self.fetches += 1
        try:
            value, lifetime = await self._fetch()
        except TokenError as exc:
            self._failure = (exc, self._clock() + self._failure_hold)
            metrics.token_refreshed(self._name, ok=False)
            if background:
                log.warning("access token refresh failed (%s): %s", self._name, exc)
            raise
        except Exception as exc:
            error = TokenError(
                f"token fetch failed ({type(exc).__name__})", retriable=True
            )
            self._failure = (error, self._clock() + self._failure_hold)
            metrics.token_refreshed(self._name, ok=False)
            raise error from exc

        margin = min(self._margin, lifetime / 2)
        skew = min(self._skew, lifetime / 10)
        token = _Token(value, started + lifetime - margin, started + lifetime - skew)
        self._token = token
        self._failure = None
        metrics.token_refreshed(self._name)
        log.info("access token refreshed (%s, valid %.0f s)", self._name, lifetime)
        return token


def _retrieve(task: asyncio.Task[_Token]) -> None:
    # A background refresh may fail with nobody awaiting it; its error is kept
    # in the cache, so mark it retrieved rather than have asyncio report it.
    if not task.cancelled():
        task.exception()


# --- Google service accounts ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServiceAccount:
    """The parts of a Google service-account key that the JWT grant needs."""

    client_email: str
    private_key_id: str
    token_uri: str
    project_id: str | None
    private_key: RSAPrivateKey = field(repr=False)

    @classmethod
    def from_file(cls, path: Path, *, setting: str) -> ServiceAccount:
        """Read a key file; ConfigError naming ``setting`` when it won't do."""
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{setting}: cannot read {path}: {exc.strerror or exc}"
            ) from None
        return cls.from_json(text, setting=setting)

    @classmethod
    def from_json(cls, text: str, *, setting: str) -> ServiceAccount:
        """Parse key JSON text; ConfigError naming ``setting`` when it won't do."""
        try:
            info = json.loads(text)
        except ValueError:
            raise ConfigError(f"{setting}: not JSON (a service-account key)") from None
        if not isinstance(info, dict):
            raise ConfigError(f"{setting}: not a service-account key (a JSON object)")
        if info.get("type") != "service_account":
            raise ConfigError(f'{setting}: "type" is not "service_account"')

        def text_field(name: str) -> str:
            value = info.get(name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f'{setting}: the key has no "{name}"')
            return value

        token_uri = text_field("token_uri")
        if urlsplit(token_uri).scheme not in ("https", "http"):
            raise ConfigError(f'{setting}: "token_uri" is not an http(s) URL')
        key = _rsa_key(text_field("private_key"), setting)
        project = info.get("project_id")
        return cls(
            client_email=text_field("client_email"),
            private_key_id=text_field("private_key_id"),
            token_uri=token_uri,
            project_id=project if isinstance(project, str) else None,
            private_key=key,
        )

    def assertion(
        self, now_s: float, *, scope: str = FCM_SCOPE, lifetime_s: int = 3600
    ) -> str:
        """The signed JWT of the bearer grant, valid from ``now_s`` (epoch s)."""
        iat = int(now_s)
        claims = {
            "iss": self.client_email,
            "scope": scope,
            "aud": self.token_uri,
            "iat": iat,
            "exp": iat + min(lifetime_s, MAX_ASSERTION_LIFETIME_S),
        }
        headers = {"kid": self.private_key_id}
        return jwt.encode(claims, self.private_key, algorithm="RS256", headers=headers)


def _rsa_key(pem: str, setting: str) -> RSAPrivateKey:
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ConfigError(
            f'{setting}: "private_key" is not an unencrypted PEM private key'
        ) from None
    if not isinstance(key, RSAPrivateKey):
        raise ConfigError(f'{setting}: "private_key" is not an RSA key')
    return key


class GoogleTokenSource:
    """Exchanges a service account's signed assertion for an access token.

    Calling it returns ``(access_token, expires_in_s)``, the shape
    :class:`TokenCache` wants. ``http`` is owned by the caller; ``wall_clock``
    gives epoch seconds for the assertion's ``iat``.
    """

    def __init__(
        self,
        account: ServiceAccount,
        http: httpx.AsyncClient,
        *,
        scope: str = FCM_SCOPE,
        wall_clock: Clock = time.time,
    ) -> None:
        self.account = account
        self._http = http
        self._scope = scope
        self._wall_clock = wall_clock

    async def __call__(self) -> tuple[str, float]:
        form = {
            "grant_type": JWT_BEARER_GRANT,
            "assertion": self.account.assertion(self._wall_clock(), scope=self._scope),
        }
        try:
            response = await self._http.post(self.account.token_uri, data=form)
        except httpx.HTTPError as exc:
            raise TokenError(
                f"token endpoint unreachable ({type(exc).__name__})", retriable=True
            ) from exc
        return parse_token_response(response.status_code, response.content)


def parse_token_response(status: int, body: bytes) -> tuple[str, float]:
    """``(access_token, expires_in_s)`` from a token endpoint's answer.

    Raises TokenError: not retriable for a 4xx other than 408/429 (the
    endpoint refused the credential), retriable otherwise.
    """
    info = _json_object(body)
    if status == 200:
        token = info.get("access_token")
        expires_in = info.get("expires_in", 3600)
        if not isinstance(token, str) or not token:
            raise TokenError("token endpoint gave no access_token", retriable=True)
        if not isinstance(expires_in, int | float) or expires_in <= 0:
            raise TokenError("token endpoint gave a bad expires_in", retriable=True)
        return token, float(expires_in)

    error = info.get("error")
    described = info.get("error_description")
    detail = " ".join(str(part) for part in (error, described) if part)
    reason = f"token endpoint answered {status}" + (f": {detail}" if detail else "")
    retriable = status >= 500 or status in (408, 429)
    raise TokenError(reason[:300], retriable=retriable)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
