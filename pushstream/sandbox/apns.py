"""A stand-in for APNs' provider API: ``POST /3/device/<token>`` over HTTP/2.

Serve it with :meth:`ApnsSandbox.server`: TLS with ALPN ``h2`` only (a
client that offers only HTTP/1.1 is dropped at connect, as APNs does), a
client certificate verified when one is presented (certificate auth) and a
provider token required otherwise (token auth), both on the same port.

A request is checked in this order, each failure answering APNs' own status
and ``{"reason": ...}`` (PROTOCOLS.md 1.2-1.8):

- ``outage``: 503 ServiceUnavailable (``outage_mode="503"``) or no answer at
  all (``"hang"``);
- 405 MethodNotAllowed; 404 BadPath; 400 MissingDeviceToken; 400
  DuplicateHeaders;
- authentication. With a client certificate: its subject UID is its bundle
  id. Otherwise the ``authorization: bearer <JWT>``: 403
  MissingProviderToken without it; 403 InvalidProviderToken for a bad
  signature, an unknown ``kid``, an ``iss`` that is not the key's team, an
  ``iat`` in the future, or a second team on one connection; 403
  UnrelatedKeyIdInToken for a second key on one connection; 403
  ExpiredProviderToken when ``iat`` is over an hour old; 403
  BadEnvironmentKeyInToken for a key restricted to the other environment;
  429 TooManyProviderTokenUpdates when a team's token changes less than
  ``token_update_window_s`` (20 minutes) after its previous change. A token
  is its ``(kid, iat)``: re-signing the same claims is not an update;
- the topic: 400 MissingTopic (token auth), 400 BadTopic (malformed, or not
  the certificate's), 400 TopicDisallowed (not a bundle id of the key's team);
- headers: 400 BadMessageId (apns-id not a UUID), BadExpirationDate,
  BadPriority (not 1, 5 or 10; 10 on a background push), BadCollapseId (over
  64 bytes), InvalidPushType (unknown, or not matching the topic's suffix);
- the body: 400 PayloadEmpty; 413 PayloadTooLarge over 4096 bytes (5120 for
  voip); 400 BadPayload when it is not a JSON object with an ``aps``
  dictionary (a sandbox-only reason: Apple documents none for this);
- the device token: 400 BadDeviceToken unless it is 16 to 200 hex digits;
- the token's scenario, else 200 with ``apns-id`` (the request's, or a new
  one) and, in the development environment, ``apns-unique-id``.

Scenario tokens: a token whose first 8 hex digits are one of these words,
padded with zeros (e.g. ``dead0000`` followed by 56 more hex digits):

============ ==========================================================
``dead``     410 Unregistered, ``timestamp`` = now in milliseconds
``faded``    410 ExpiredToken
``bad``      400 BadDeviceToken
``0dd``      400 DeviceTokenNotForTopic
``f100d``    429 TooManyRequests ("flood")
``fa11``     500 InternalServerError ("fail")
``0ff11e``   503 ServiceUnavailable ("offline")
``c105e``    GOAWAY ``{"reason": "Shutdown"}`` before answering ("close")
``1a7e``     200 after ``slow_s`` seconds ("late")
============ ==========================================================

:meth:`ApnsSandbox.set_scenario` gives any token one of the scenario names
(:data:`SCENARIOS`) at run time; ``goaway_next`` sends a GOAWAY instead of
answering the next N requests (they must be sent again on a new connection).

Streams, like APNs (PROTOCOLS.md 1.9): a connection starts with
MAX_CONCURRENT_STREAMS 1; the first authenticated request raises it to
``max_streams`` (1000); any rejected request lowers it to 1 and the next
accepted one raises it again.

Accepted notifications are appended to ``accepted`` (the newest
``MAX_ACCEPTED``; ``record=False`` keeps none, for load tests); ``stats``
counts answers by reason (``Success`` for 200), GOAWAYs (``GOAWAY``) and
connections that authenticated (``authenticated_connections``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import secrets
import string
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pushstream.sandbox.certs import SandboxCerts
from pushstream.sandbox.server import Handler, Request, Response, SandboxServer

Environment = Literal["production", "development"]

MAX_ACCEPTED = 100_000  # records kept; older ones are dropped first
MAX_STREAMS = 1000
TOKEN_MAX_AGE_S = 3600
# Verified provider tokens remembered, bounded in bytes: a token of Apple's
# form is about 200 characters; a longer one is verified on each request.
MAX_REMEMBERED_TOKENS = 4096
MAX_REMEMBERED_TOKEN_CHARS = 1024
TOKEN_UPDATE_WINDOW_S = 20 * 60
PAYLOAD_LIMIT = 4096
VOIP_PAYLOAD_LIMIT = 5120
FUTURE_IAT_LEEWAY_S = 60  # an iat this far ahead of our clock is still fine

SCENARIOS = {
    "ok": None,
    "unregistered": (410, "Unregistered"),
    "expired": (410, "ExpiredToken"),
    "bad": (400, "BadDeviceToken"),
    "wrong_topic": (400, "DeviceTokenNotForTopic"),
    "throttled": (429, "TooManyRequests"),
    "failing": (500, "InternalServerError"),
    "unavailable": (503, "ServiceUnavailable"),
    "shutdown": None,
    "slow": None,
}
_PREFIXES = {
    "dead": "unregistered",
    "faded": "expired",
    "bad": "bad",
    "0dd": "wrong_topic",
    "f100d": "throttled",
    "fa11": "failing",
    "0ff11e": "unavailable",
    "c105e": "shutdown",
    "1a7e": "slow",
}
SCENARIO_PREFIXES = {word.ljust(8, "0"): name for word, name in _PREFIXES.items()}

PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "location",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
        "pushtotalk",
        "widgets",
        "controls",
    }
)
# The topic suffix a push type requires (PROTOCOLS.md 1.2).
TOPIC_SUFFIXES = {
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "location": ".location-query",
    "liveactivity": ".push-type.liveactivity",
    "pushtotalk": ".voip-ptt",
}

_ANY_TOPIC_SUFFIX = tuple(TOPIC_SUFFIXES.values())
_PATH = re.compile(r"^/3/device/([^/?]*)$")
_HEX_TOKEN = re.compile(r"^(?:[0-9a-fA-F]{2}){8,100}$")
_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_TOPIC = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]*$")
_DIGITS = re.compile(r"^[0-9]{1,12}$")


@dataclass(frozen=True, slots=True)
class SandboxKey:
    """A signing key APNs knows: its id, team, public half and scope."""

    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey
    environments: frozenset[str] = frozenset({"production", "development"})


@dataclass(slots=True)
class _TeamTokens:
    seen: set[tuple[str, int]] = field(default_factory=set)
    changed_at: float | None = None


class Refused(Exception):
    """A request APNs would refuse with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.extra = extra


@dataclass(slots=True)
class _Auth:
    kind: Literal["token", "certificate"]
    team_id: str | None
    topics: frozenset[str]


class ApnsSandbox:
    """The APNs stand-in: ``await handle(request)`` answers one request.

    ``environment`` is what :meth:`handle` serves; :meth:`handler` answers as
    the other one with the same keys and records. ``clock`` gives epoch
    seconds for provider-token ages (injectable for tests).
    """

    def __init__(
        self,
        *,
        environment: Environment = "development",
        certs: SandboxCerts | None = None,
        base_url: str = "",
        max_streams: int = MAX_STREAMS,
        token_update_window_s: float = TOKEN_UPDATE_WINDOW_S,
        token_max_age_s: float = TOKEN_MAX_AGE_S,
        slow_s: float = 30.0,
        record: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.environment = environment
        self.certs = certs
        self.base_url = base_url
        self.max_streams = max_streams
        self.token_update_window_s = token_update_window_s
        self.token_max_age_s = token_max_age_s
        self.slow_s = slow_s
        self.record = record
        self.outage = False
        self.outage_mode: Literal["503", "hang"] = "503"
        self.goaway_next = 0
        self.accepted: list[dict[str, Any]] = []
        self.stats: Counter[str] = Counter()
        self._clock = clock
        self._keys: dict[str, SandboxKey] = {}
        self._bundles: dict[str, set[str]] = {}  # team id -> bundle ids
        self._teams: dict[str, _TeamTokens] = {}
        self._verified: dict[str, tuple[SandboxKey, int]] = {}
        self._scenarios: dict[str, str] = {}

    # --- set-up ------------------------------------------------------------------

    def add_key(self, key: SandboxKey, bundle_ids: Iterable[str]) -> None:
        """Trust ``key`` for the team's ``bundle_ids`` (a team-scoped key)."""
        self._keys[key.key_id] = key
        self._bundles.setdefault(key.team_id, set()).update(bundle_ids)

    def token_changes(self, team_id: str) -> int:
        """How many distinct provider tokens of a team were accepted so far."""
        team = self._teams.get(team_id)
        return len(team.seen) if team else 0

    def make_credentials(
        self,
        folder: Path,
        *,
        bundle_ids: Iterable[str] = ("com.example.sandbox",),
        team_id: str | None = None,
        cert_bundle_ids: Iterable[str] = (),
        environments: Iterable[str] = ("production", "development"),
    ) -> dict[str, str]:
        """Make a throwaway signing key (and client certificates) for apps.

        Writes ``AuthKey_<key id>.p8`` (EC P-256, mode 0600) into ``folder``,
        trusts its public half for ``bundle_ids`` under ``team_id`` (a new
        one by default), and, with ``certs`` set, issues one client
        certificate per ``cert_bundle_ids`` (PEM, certificate and key in one
        0600 file). Returns the PUSHSTREAM_* settings: ``PUSHSTREAM_APNS``
        (JSON list of apps) and, once ``base_url`` is set, the endpoints.
        """
        folder.mkdir(parents=True, exist_ok=True)
        bundles = list(bundle_ids)
        key = ec.generate_private_key(ec.SECP256R1())
        key_id, team = apple_id(), team_id or apple_id()
        path = folder / f"AuthKey_{key_id}.p8"
        _write_private(path, _pem(key))
        scope = frozenset(environments)
        self.add_key(SandboxKey(key_id, team, key.public_key(), scope), bundles)
        apps: list[dict[str, str]] = [
            {"bundle_id": b, "key_id": key_id, "team_id": team, "key_file": str(path)}
            for b in bundles
        ]
        for bundle in cert_bundle_ids:
            cert_path = self.issue_certificate(folder, bundle)
            apps.append(
                {
                    "bundle_id": bundle,
                    "auth": "certificate",
                    "cert_file": str(cert_path),
                }
            )
        values = {"PUSHSTREAM_APNS": json.dumps(apps)}
        if self.base_url:
            values["PUSHSTREAM_ENDPOINTS__APNS_PRODUCTION"] = self.base_url
            values["PUSHSTREAM_ENDPOINTS__APNS_DEVELOPMENT"] = self.base_url
        return values

    def issue_certificate(self, folder: Path, bundle_id: str) -> Path:
        """A push certificate for ``bundle_id`` signed by the sandbox CA: one
        PEM file with the certificate and its key (mode 0600)."""
        if self.certs is None:
            raise ValueError("certificate auth needs the sandbox's certs")
        issued = self.certs.issue_client_certificate(
            f"apns-{bundle_id}",
            common_name=f"Apple Push Services: {bundle_id}",
            user_id=bundle_id,
        )
        path = folder / f"apns-{bundle_id}-cert.pem"
        _write_private(path, issued.cert.read_bytes() + issued.key.read_bytes())
        return path

    def set_scenario(self, token: str, scenario: str) -> None:
        """Make one device token answer as ``scenario`` from now on."""
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown APNs scenario {scenario!r}")
        self._scenarios[token.lower()] = scenario

    def server(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        environment: Environment | None = None,
    ) -> SandboxServer:
        """A :class:`SandboxServer` for this stand-in (not started yet)."""
        if self.certs is None:
            raise ValueError("serving APNs needs the sandbox's certs")
        context = self.certs.server_ssl_context(alpn=("h2",), client_auth="optional")
        return SandboxServer(
            host,
            port,
            context,
            self.handler(environment or self.environment),
            initial_max_streams=1,
            protocols=("h2",),
            name=f"apns-{environment or self.environment}",
        )

    def handler(self, environment: Environment) -> Handler:
        """A request handler answering as APNs' ``environment`` host."""

        async def handle(req: Request) -> Response:
            return await self._handle(req, environment)

        return handle

    # --- requests ----------------------------------------------------------------

    async def handle(self, req: Request) -> Response:
        """Answer one request (the :class:`SandboxServer` handler)."""
        return await self._handle(req, self.environment)

    async def _handle(self, req: Request, environment: Environment) -> Response:
        apns_id = req.headers.get("apns-id") or str(uuid.uuid4())
        if self.outage:
            if self.outage_mode == "hang":
                await asyncio.Event().wait()  # ends when the client goes away
            return self._refuse(req, apns_id, Refused(503, "ServiceUnavailable"))
        if self.goaway_next > 0:
            self.goaway_next -= 1
            return self._goaway(req, "Shutdown")
        try:
            token, auth, topic = self._check(req, environment)
            scenario = self._scenario(token)
            if scenario == "shutdown":
                return self._goaway(req, "Shutdown")
            outcome = SCENARIOS[scenario]
            if outcome is not None:
                status, reason = outcome
                extra = (
                    {"timestamp": int(self._clock() * 1000)} if status == 410 else {}
                )
                raise Refused(status, reason, **extra)
        except Refused as refusal:
            return self._refuse(req, apns_id, refusal)

        if scenario == "slow":
            await asyncio.sleep(self.slow_s)
        self._accept_stream(req)
        self.stats["Success"] += 1
        headers = {"apns-id": apns_id}
        if environment == "development":
            headers["apns-unique-id"] = str(uuid.uuid4())
        if self.record:
            self._record(req, token, auth, topic, environment, headers)
        return Response(200, headers)

    def _check(self, req: Request, environment: str) -> tuple[str, _Auth, str]:
        """Token, auth and topic of a request APNs would take, or Refused."""
        if req.method != "POST":
            raise Refused(405, "MethodNotAllowed")
        match = _PATH.match(req.path)
        if match is None:
            raise Refused(404, "BadPath")
        token = match.group(1)
        if not token:
            raise Refused(400, "MissingDeviceToken")
        if len(req.headers) != len(req.raw_headers):  # a name given twice
            raise Refused(400, "DuplicateHeaders")

        auth = self._authenticate(req, environment)
        topic = self._topic(req, auth)
        self._check_headers(req, topic)
        self._check_body(req)
        if not _HEX_TOKEN.match(token):
            raise Refused(400, "BadDeviceToken")
        return token.lower(), auth, topic

    def _authenticate(self, req: Request, environment: str) -> _Auth:
        der = req.conn.peer_certificate
        if der is not None:
            cert = x509.load_der_x509_certificate(der)
            uids = cert.subject.get_attributes_for_oid(NameOID.USER_ID)
            self._authenticated(req)
            return _Auth("certificate", None, frozenset(str(u.value) for u in uids))

        header = req.headers.get("authorization")
        if not header:
            raise Refused(403, "MissingProviderToken")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise Refused(403, "InvalidProviderToken")
        key, iat = self._verify(value.strip())

        state = req.conn.state
        if state.setdefault("team_id", key.team_id) != key.team_id:
            raise Refused(403, "InvalidProviderToken")  # two teams, one connection
        if state.setdefault("key_id", key.key_id) != key.key_id:
            raise Refused(403, "UnrelatedKeyIdInToken")
        now = self._clock()
        if iat > now + FUTURE_IAT_LEEWAY_S:
            raise Refused(403, "InvalidProviderToken")
        if now - iat > self.token_max_age_s:
            raise Refused(403, "ExpiredProviderToken")
        if environment not in key.environments:
            raise Refused(403, "BadEnvironmentKeyInToken")
        self._count_update(key, iat, now)
        self._authenticated(req)
        bundles = frozenset(self._bundles.get(key.team_id, ()))
        return _Auth("token", key.team_id, bundles)

    def _verify(self, token: str) -> tuple[SandboxKey, int]:
        """The key and iat of a correctly signed provider token."""
        known = self._verified.get(token)
        if known is not None:
            return known
        try:
            header = jwt.get_unverified_header(token)
            key = self._keys.get(str(header.get("kid")))
            if key is None or header.get("alg") != "ES256":
                raise Refused(403, "InvalidProviderToken")
            claims = json.loads(
                jwt.PyJWS().decode(token, key.public_key, algorithms=["ES256"])
            )
        except (jwt.PyJWTError, ValueError):
            raise Refused(403, "InvalidProviderToken") from None
        iat = claims.get("iat") if isinstance(claims, dict) else None
        if not isinstance(iat, int) or isinstance(iat, bool):
            raise Refused(403, "InvalidProviderToken")
        if claims.get("iss") != key.team_id:
            raise Refused(403, "InvalidProviderToken")
        if len(token) <= MAX_REMEMBERED_TOKEN_CHARS:
            if len(self._verified) >= MAX_REMEMBERED_TOKENS:
                self._verified.clear()
            self._verified[token] = (key, iat)
        return key, iat

    def _count_update(self, key: SandboxKey, iat: int, now: float) -> None:
        """TooManyProviderTokenUpdates when a team's token changes too soon."""
        team = self._teams.setdefault(key.team_id, _TeamTokens())
        identity = (key.key_id, iat)
        if identity in team.seen:
            return
        if team.changed_at is not None and now - team.changed_at < (
            self.token_update_window_s
        ):
            raise Refused(429, "TooManyProviderTokenUpdates")
        team.seen.add(identity)
        team.changed_at = now

    def _authenticated(self, req: Request) -> None:
        """APNs allows one stream until a connection's first valid credential."""
        if not req.conn.state.get("authenticated"):
            req.conn.state["authenticated"] = True
            self.stats["authenticated_connections"] += 1
            req.conn.set_max_concurrent_streams(self.max_streams)

    @staticmethod
    def _topic(req: Request, auth: _Auth) -> str:
        topic = req.headers.get("apns-topic")
        if topic is None:
            if auth.kind == "certificate" and len(auth.topics) == 1:
                return next(iter(auth.topics))
            raise Refused(400, "MissingTopic")
        if not _TOPIC.match(topic):
            raise Refused(400, "BadTopic")
        base = _base_topic(topic)
        if base not in auth.topics:
            reason = "BadTopic" if auth.kind == "certificate" else "TopicDisallowed"
            raise Refused(400, reason)
        return topic

    @staticmethod
    def _check_headers(req: Request, topic: str) -> None:
        h = req.headers
        if "apns-id" in h and not _UUID.match(h["apns-id"]):
            raise Refused(400, "BadMessageId")
        if "apns-expiration" in h and not _DIGITS.match(h["apns-expiration"]):
            raise Refused(400, "BadExpirationDate")
        push_type = h.get("apns-push-type", "alert")
        if push_type not in PUSH_TYPES:
            raise Refused(400, "InvalidPushType")
        priority = h.get("apns-priority", "10")
        if priority not in ("1", "5", "10"):
            raise Refused(400, "BadPriority")
        if push_type == "background" and priority == "10":
            raise Refused(400, "BadPriority")
        suffix = TOPIC_SUFFIXES.get(push_type, "")
        has_suffix = topic.endswith(_ANY_TOPIC_SUFFIX)
        if (suffix and not topic.endswith(suffix)) or (not suffix and has_suffix):
            raise Refused(400, "InvalidPushType")
        if len(h.get("apns-collapse-id", "").encode("latin-1")) > 64:
            raise Refused(400, "BadCollapseId")

    @staticmethod
    def _check_body(req: Request) -> None:
        body = req.body
        if not body:
            raise Refused(400, "PayloadEmpty")
        voip = req.headers.get("apns-push-type") == "voip"
        if len(body) > (VOIP_PAYLOAD_LIMIT if voip else PAYLOAD_LIMIT):
            raise Refused(413, "PayloadTooLarge")
        if not _is_payload(body):
            raise Refused(400, "BadPayload")

    def _scenario(self, token: str) -> str:
        chosen = self._scenarios.get(token)
        if chosen is not None:
            return chosen
        return SCENARIO_PREFIXES.get(token[:8], "ok")

    # --- answers -----------------------------------------------------------------

    def _refuse(self, req: Request, apns_id: str, refusal: Refused) -> Response:
        """An error answer; APNs then lowers the connection's stream limit to 1."""
        self.stats[refusal.reason] += 1
        if req.conn.max_concurrent_streams != 1:
            req.conn.set_max_concurrent_streams(1)
        body = json.dumps({"reason": refusal.reason, **refusal.extra}).encode()
        headers = {"apns-id": apns_id, "content-type": "application/json"}
        return Response(refusal.status, headers, body)

    def _accept_stream(self, req: Request) -> None:
        if req.conn.max_concurrent_streams != self.max_streams:
            req.conn.set_max_concurrent_streams(self.max_streams)

    def _goaway(self, req: Request, reason: str) -> Response:
        """End the connection before this request: it must be sent again."""
        self.stats["GOAWAY"] += 1
        last = max((req.stream_id or 1) - 2, 0)
        req.conn.send_goaway(0, json.dumps({"reason": reason}), last_stream_id=last)
        return Response(503, {}, json.dumps({"reason": reason}).encode())

    def _record(
        self,
        req: Request,
        token: str,
        auth: _Auth,
        topic: str,
        environment: str,
        headers: dict[str, str],
    ) -> None:
        sent = {k: v for k, v in req.headers.items() if k != "authorization"}
        self.accepted.append(
            {
                "platform": "apns",
                "token": token,
                "app": _base_topic(topic),
                "topic": topic,
                "provider_id": headers["apns-id"],
                "unique_id": headers.get("apns-unique-id"),
                "environment": environment,
                "auth": auth.kind,
                "team_id": auth.team_id,
                "push_type": req.headers.get("apns-push-type", "alert"),
                "headers": sent,
                "body": req.body.decode("utf-8", "replace"),
                "body_size": len(req.body),
                "time": time.time(),
            }
        )
        if len(self.accepted) > MAX_ACCEPTED:
            del self.accepted[: len(self.accepted) - MAX_ACCEPTED]


@functools.lru_cache(maxsize=1024)
def _is_payload(body: bytes) -> bool:
    """Whether ``body`` is a JSON object with an ``aps`` dictionary.

    Remembered: a notification sent to many devices repeats its body. Only
    bodies within the payload limits get here, so the cache stays under
    about 5 MB.
    """
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(payload, dict) and isinstance(payload.get("aps"), dict)


def _base_topic(topic: str) -> str:
    if not topic.endswith(_ANY_TOPIC_SUFFIX):
        return topic
    for suffix in TOPIC_SUFFIXES.values():
        if topic.endswith(suffix):
            return topic[: -len(suffix)]
    return topic


def apple_id() -> str:
    """A random 10-character id like Apple's key and team ids."""
    alphabet = string.ascii_uppercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(10))


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(data)
