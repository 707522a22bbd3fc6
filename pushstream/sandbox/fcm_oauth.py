"""The stand-in for Google's OAuth2 token endpoint, and its service accounts.

:func:`grant_token` answers ``POST /token``: the JWT-bearer grant (RFC 7523)
with an assertion that a known :class:`Account` signed, checked as the
docstring of :mod:`pushstream.sandbox.fcm` lists; it records each
:class:`AccessToken` it issues. :func:`write_key_file` writes the key file
an account signs with.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from pushstream.sandbox.fcm_answers import json_answer
from pushstream.sandbox.server import Request, Response

DEFAULT_TOKEN_LIFETIME_S = 3599
MAX_ASSERTION_LIFETIME_S = 3600
MAX_CLOCK_SKEW_S = 300  # how far in the future an assertion's iat may be
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_BAD_TIMEFRAME = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
    "reasonable timeframe. Check your iat and exp values in the JWT claim."
)


@dataclass(slots=True)
class Account:
    """A service account that may get tokens and send for ``projects``."""

    client_email: str
    key_id: str
    public_key: rsa.RSAPublicKey
    token_uri: str
    projects: set[str] = field(default_factory=set)


@dataclass(slots=True)
class AccessToken:
    """An access token issued to ``client_email``, live until ``expires_at``
    (epoch seconds)."""

    client_email: str
    scopes: frozenset[str]
    expires_at: float


def grant_token(
    req: Request,
    accounts: Mapping[str, Account],
    tokens: dict[str, AccessToken],
    lifetime_s: int,
    clock: Callable[[], float],
) -> Response:
    """Answer a ``POST /token`` request; a token issued is added to ``tokens``.

    ``accounts`` are the service accounts by ``client_email``; ``lifetime_s``
    is how long an access token lives; ``clock`` gives epoch seconds.
    """
    if req.method != "POST":
        return _oauth_error(405, "invalid_request", "Method not allowed.")
    form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
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
    account = accounts.get(str(unverified.get("iss")))
    if account is None:
        return _oauth_error(400, "invalid_grant", "Invalid grant: account not found")
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
        return _oauth_error(400, "invalid_grant", "Invalid JWT: Failed audience check.")
    except jwt.PyJWTError:
        return _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")

    now = clock()
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
    tokens[access_token] = AccessToken(
        account.client_email,
        frozenset(scope.split()),
        now + lifetime_s,
    )
    return json_answer(
        200,
        {
            "access_token": access_token,
            "expires_in": lifetime_s,
            "token_type": "Bearer",
        },
    )


def write_key_file(
    path: Path, project_id: str, token_uri: str
) -> tuple[dict[str, Any], rsa.RSAPrivateKey]:
    """Write (or reuse) a service-account key file for ``project_id``; returns
    its fields and its private key.

    A key already at ``path`` is kept (its ``token_uri`` is updated). New keys
    are RSA 2048, made now; the file is readable by its owner only.
    """
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
    return info, key


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


def _oauth_error(code: int, error: str, description: str) -> Response:
    return json_answer(code, {"error": error, "error_description": description})
