"""APNs credentials: provider tokens (ES256 JWTs) and client certificates.

Provider tokens
---------------
Apple rejects a token whose ``iat`` is more than an hour old
(ExpiredProviderToken) and one that changes more often than every 20 minutes
(TooManyProviderTokenUpdates, counted per team). :class:`ProviderToken` keeps
one token per (team, key) for every connection of the process and replaces
it when it is 50 minutes old, never sooner than 20 minutes after the last
one it made.

A token's ``iat`` is aligned to a 25-minute grid and signed with
deterministic ECDSA (RFC 6979), so every worker of a fleet that shares a key
presents the very same token instead of each adding its own "update". The
first token of a process may already be up to 25 minutes old; it is still
used for at least 25 more.

Certificates
------------
A PEM file with the certificate and its key, or a PKCS#12 bundle (``.p12``)
with its password. PKCS#12 is converted in memory; :mod:`ssl` reads keys only
from files, so the PEM form lives in a 0600 temporary file for the moment it
takes to load, then is deleted.

Every problem with a credential is a :class:`~pushstream.config.ConfigError`
naming the setting; no message repeats key material.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import pkcs12

from pushstream import metrics
from pushstream.config import ApnsApp, ConfigError

log = logging.getLogger(__name__)

TOKEN_GRID_S = 25 * 60
"""A token's ``iat`` is a multiple of this (seconds since the epoch)."""
TOKEN_MAX_AGE_S = 50 * 60
"""A token is replaced once its ``iat`` is this old (Apple's limit: 60 min)."""
TOKEN_MIN_INTERVAL_S = 20 * 60
"""Never make a new token sooner than this after the previous one (Apple's floor)."""
CERT_EXPIRY_WARNING = timedelta(days=30)

_APPLE_ID = re.compile(r"^[A-Z0-9]{10}$")

Clock = Callable[[], float]
"""Seconds since the epoch, like :func:`time.time` (injectable for tests)."""


def setting_name(index: int, field: str) -> str:
    """The environment name of one field of the ``index``-th APNs app."""
    return f"PUSHSTREAM_APNS__{index}__{field.upper()}"


# --- provider tokens --------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_token(
    key: ec.EllipticCurvePrivateKey, team_id: str, key_id: str, iat: int
) -> str:
    """An APNs provider token: ES256 JWT, header ``alg``/``kid``, claims
    ``iss``/``iat``. Deterministic: the same inputs give the same token."""
    header = json.dumps({"alg": "ES256", "kid": key_id}, separators=(",", ":"))
    claims = json.dumps({"iss": team_id, "iat": iat}, separators=(",", ":"))
    signing_input = f"{_b64(header.encode())}.{_b64(claims.encode())}"
    der = key.sign(
        signing_input.encode(), ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
    )
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return f"{signing_input}.{_b64(signature)}"


class ProviderToken:
    """The provider token of one (team, key), shared by all its connections.

    :meth:`current` is called for every request and is cheap; it makes a new
    token only when the cached one is due. ``minted`` counts tokens made.
    """

    def __init__(
        self,
        team_id: str,
        key_id: str,
        key: ec.EllipticCurvePrivateKey,
        clock: Clock = time.time,
    ) -> None:
        self.team_id = team_id
        self.key_id = key_id
        self._key = key
        self._clock = clock
        self._token: str | None = None
        self._iat = 0
        self._minted_at = 0.0
        self.minted = 0

    def __repr__(self) -> str:
        return f"ProviderToken(team_id={self.team_id!r}, key_id={self.key_id!r})"

    @property
    def iat(self) -> int:
        """The ``iat`` of the cached token (0 before the first)."""
        return self._iat

    def current(self) -> str:
        """The token to send now, made or replaced when due."""
        now = self._clock()
        if self._token is None:
            return self._mint(_grid(now), now)
        due = now - self._iat >= TOKEN_MAX_AGE_S
        if due and now - self._minted_at >= TOKEN_MIN_INTERVAL_S:
            return self._mint(_grid(now), now)
        return self._token

    def renew_after_expired(self, rejected: str) -> bool:
        """APNs answered ExpiredProviderToken to ``rejected``; may we try again?

        True when a different token is now current: another request renewed
        it already, or ``rejected`` was made at least 20 minutes ago and has
        just been replaced by one with ``iat`` = now. False when the rejected
        token is too young to replace (APNs' clock is far from ours); making
        another one would only earn TooManyProviderTokenUpdates.
        """
        if rejected != self._token:
            return self._token is not None
        now = self._clock()
        if now - self._minted_at < TOKEN_MIN_INTERVAL_S:
            log.warning(
                "APNs calls the provider token of team %s key %s expired although "
                "it is %ds old; is this host's clock right?",
                self.team_id,
                self.key_id,
                int(now - self._iat),
            )
            return False
        self._mint(int(now), now)
        return True

    def _mint(self, iat: int, now: float) -> str:
        self._token = sign_token(self._key, self.team_id, self.key_id, iat)
        self._iat = iat
        self._minted_at = now
        self.minted += 1
        metrics.token_refreshed("apns")
        log.info(
            "APNs provider token made for team %s key %s (iat %d, %ds old)",
            self.team_id,
            self.key_id,
            iat,
            int(now - iat),
        )
        return self._token


def _grid(now: float) -> int:
    return int(now // TOKEN_GRID_S) * TOKEN_GRID_S


def load_signing_key(app: ApnsApp, index: int) -> ec.EllipticCurvePrivateKey:
    """The .p8 key of a token-auth app, checked: EC P-256, key id, team id.

    Blocking (reads a file); raises ConfigError naming the setting.
    """
    for field, value in (("key_id", app.key_id), ("team_id", app.team_id)):
        if not value or not _APPLE_ID.match(value):
            raise ConfigError(
                f"{setting_name(index, field)}: token auth of {app.bundle_id} needs "
                "Apple's 10-character id (A-Z, 0-9) from the developer account"
            )
    if app.key is not None:
        setting, pem = setting_name(index, "key"), app.key.get_secret_value().encode()
    elif app.key_file is not None:
        setting = setting_name(index, "key_file")
        pem = _read(app.key_file, setting)
    else:
        raise ConfigError(
            f"{setting_name(index, 'key_file')}: token auth of {app.bundle_id} "
            "needs the .p8 key (key_file, or its text in key)"
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{setting}: not an unencrypted PEM private key (the .p8 file Apple issues)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise ConfigError(f"{setting}: APNs keys are EC P-256; this key is not")
    return key


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{setting}: cannot read {path}: {exc.strerror}") from None


# --- certificates -----------------------------------------------------------------


def load_client_certificate(
    context: ssl.SSLContext, app: ApnsApp, index: int, now: datetime | None = None
) -> x509.Certificate:
    """Load a certificate-auth app's certificate and key into ``context``.

    ``cert_file`` holds PEM (certificate and key, the key optionally
    encrypted with ``cert_password``) or PKCS#12. An expired certificate is
    refused; one expiring within 30 days is logged. Blocking; raises
    ConfigError naming the setting. Returns the leaf certificate.
    """
    setting = setting_name(index, "cert_file")
    if app.cert_file is None:
        raise ConfigError(
            f"{setting}: certificate auth of {app.bundle_id} needs the certificate "
            "(PEM with its key, or PKCS#12)"
        )
    data = _read(app.cert_file, setting)
    password = (
        app.cert_password.get_secret_value().encode() if app.cert_password else None
    )
    if b"-----BEGIN" in data:
        cert = _load_pem(context, app.cert_file, data, password, setting)
    else:
        cert = _load_pkcs12(context, data, password, setting)
    _check_validity(cert, setting, app.bundle_id, now or datetime.now(UTC))
    return cert


def _load_pem(
    context: ssl.SSLContext,
    path: Path,
    data: bytes,
    password: bytes | None,
    setting: str,
) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except ValueError:
        raise ConfigError(f"{setting}: no readable PEM certificate in it") from None
    # A callable, not None: OpenSSL would otherwise prompt on the terminal
    # for the password of an encrypted key.
    try:
        context.load_cert_chain(path, password=lambda: password or b"")
    except (ssl.SSLError, ValueError):
        raise ConfigError(
            f"{setting}: needs the certificate and its private key in one PEM "
            "file (the key encrypted only with PUSHSTREAM_APNS__<n>__CERT_PASSWORD)"
        ) from None
    return cert


def _load_pkcs12(
    context: ssl.SSLContext, data: bytes, password: bytes | None, setting: str
) -> x509.Certificate:
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(data, password)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(
            f"{setting}: neither PEM nor a PKCS#12 bundle this password opens"
        ) from None
    if key is None or cert is None:
        raise ConfigError(f"{setting}: the PKCS#12 bundle lacks its certificate or key")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    for item in (cert, *chain):
        pem += item.public_bytes(serialization.Encoding.PEM)
    fd, name = tempfile.mkstemp(prefix="apns-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        context.load_cert_chain(name)
    except ssl.SSLError:
        raise ConfigError(f"{setting}: the PKCS#12 key does not fit its cert") from None
    finally:
        os.unlink(name)
    return cert


def _check_validity(
    cert: x509.Certificate, setting: str, bundle_id: str, now: datetime
) -> None:
    ends = cert.not_valid_after_utc
    if ends <= now or cert.not_valid_before_utc > now:
        raise ConfigError(
            f"{setting}: the certificate of {bundle_id} is valid only from "
            f"{cert.not_valid_before_utc:%Y-%m-%d} to {ends:%Y-%m-%d}"
        )
    if ends - now < CERT_EXPIRY_WARNING:
        log.warning(
            "APNs certificate of %s expires on %s; renew it",
            bundle_id,
            ends.date().isoformat(),
        )


def certificate_topics(cert: x509.Certificate) -> list[str]:
    """The bundle id an APNs certificate is for: its subject's UID."""
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.USER_ID)
    return [str(attr.value) for attr in attrs]
