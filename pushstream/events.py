"""The wire contracts: the value of every message on every pushstream topic.

Every value is one UTF-8 JSON object. The models below are the single source of
the JSON Schemas in ``topics/`` (``pushstream topics schemas --write``), so an
upstream team can validate what it publishes, and an analytics team what it
reads, against the same definitions the worker uses.

Inputs from upstream (registrations, notifications) are validated strictly:
unknown fields are refused, so a typo is reported on the dead-letters topic
instead of being silently ignored. Times that upstream writes are ISO 8601
with a zone; times that pushstream writes are integers, milliseconds since
the epoch, in fields whose names end in ``_ms``.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    field_validator,
    model_validator,
)

Platform = Literal["apns", "fcm", "wns"]
PLATFORMS: tuple[Platform, ...] = ("apns", "fcm", "wns")
Environment = Literal["production", "development"]

_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
UserId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=_PRINTABLE)
]
DeviceId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=_PRINTABLE)
]
AppId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=_PRINTABLE)
]
NotificationId = Annotated[
    str, StringConstraints(min_length=1, max_length=256, pattern=_PRINTABLE)
]
ShortText = Annotated[str, StringConstraints(max_length=256)]

# Limits on a token's shape. APNs tokens are hex of a length Apple may change
# (PROTOCOLS.md 1.6); FCM registration tokens are opaque URL-safe strings; a WNS
# token is the channel URI the client received from Windows (at most 2048 chars).
APNS_TOKEN_RE = re.compile(r"^(?:[0-9a-fA-F]{2}){8,100}$")
FCM_TOKEN_RE = re.compile(r"^[A-Za-z0-9_:\-.]{16,4096}$")
WNS_CHANNEL_MAX = 2048

# FCM keeps a message for at most 28 days; no provider keeps one longer.
MAX_TTL_S = 28 * 24 * 3600


def token_problem(platform: Platform, token: str) -> str | None:
    """Say what is wrong with a device token's shape, or None when it is fine."""
    if platform == "apns":
        if not APNS_TOKEN_RE.match(token):
            return "an APNs token is an even number (16 to 200) of hex digits"
        return None
    if platform == "fcm":
        if not FCM_TOKEN_RE.match(token):
            return "an FCM token is 16 to 4096 characters of A-Z a-z 0-9 _ : - ."
        return None
    if len(token) > WNS_CHANNEL_MAX:
        return "a WNS channel URI is at most 2048 characters"
    parts = urlsplit(token)
    if parts.scheme != "https" or not parts.hostname:
        return "a WNS channel URI is an https URL"
    return None


def check_token(platform: Platform, token: str) -> None:
    """Raise ValueError ("malformed token: ...") when :func:`token_problem`
    finds the token's shape wrong; for the models' validators."""
    problem = token_problem(platform, token)
    if problem:
        raise ValueError(f"malformed token: {problem}")


def normalize_token(platform: Platform, token: str) -> str:
    """Return the canonical form of a token (APNs hex is lower-cased)."""
    return token.lower() if platform == "apns" else token


def token_fingerprint(token: str) -> str:
    """A stable, non-reversible name for a token: 32 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def device_id_for_token(token: str) -> str:
    """The device id used when a registration names none: the token is the device."""
    return "tok-" + token_fingerprint(token)[:20]


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch of an aware datetime."""
    return int(moment.timestamp() * 1000)


# Request headers a notification may add (APNs headers, FCM's apns and
# webpush header blocks) go onto an HTTP/2 connection as written, and one
# that breaks HTTP/2's field rules makes the provider close the connection
# with every request on it. RFC 9113 8.2.1: a name is a token (RFC 9110
# 5.6.2), sent in lower case; a value holds no NUL, CR or LF and does not
# start or end with a space or tab. Values are kept to visible ASCII too:
# APNs defines none that needs more.
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_VALUE_RE = re.compile(r"^(?:[\x21-\x7e](?:[\t\x20-\x7e]*[\x21-\x7e])?)?$")
HEADER_NAME_MAX = 64
HEADER_VALUE_MAX = 4096

# RFC 9113 8.2.2: connection-specific fields are malformed in HTTP/2.
CONNECTION_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)
# Headers that only the sender sets: credentials and framing.
SENDER_HEADERS = frozenset({"authorization", "host", "content-length", "te"})
# apns-topic names the app the push is for; the device's own app sets it. A
# provider key is team-wide: an override could push to another of its apps.
APNS_SENDER_HEADERS = SENDER_HEADERS | {"apns-topic"}


def header_problem(name: str, value: str) -> str | None:
    """Say why a request header may not go on the wire, or None when it may.

    Names are compared in lower case, as HTTP/2 sends them.
    """
    if name.startswith(":"):
        return "a pseudo-header is set by the sender"
    if len(name) > HEADER_NAME_MAX or not _HEADER_NAME_RE.fullmatch(name):
        return (
            f"a header name is 1 to {HEADER_NAME_MAX} ASCII letters, digits "
            "or !#$%&'*+-.^_`|~"
        )
    if name.lower() in CONNECTION_HEADERS:
        return "a connection-specific header is not allowed in HTTP/2"
    if len(value) > HEADER_VALUE_MAX or not _HEADER_VALUE_RE.fullmatch(value):
        return (
            f"a header value is at most {HEADER_VALUE_MAX} visible ASCII "
            "characters (no control characters, no leading or trailing space)"
        )
    return None


def headers_problem(headers: dict[str, str], reserved: frozenset[str]) -> str | None:
    """The first reason ``headers`` may not be added to a request, or None.

    ``reserved`` names (lower case) the headers only the sender sets. A name
    given twice in different cases is refused too: the provider would see
    both.
    """
    seen: set[str] = set()
    for name, value in headers.items():
        problem = header_problem(name, value)
        lower = name.lower()
        if problem is None and lower in reserved:
            problem = "only pushstream sets this header"
        if problem is None and lower in seen:
            problem = "given twice (header names ignore case)"
        if problem is not None:
            return f"header {_shown(name)}: {problem}"
        seen.add(lower)
    return None


def fcm_headers_problem(headers: object) -> str | None:
    """Why the ``headers`` of an FCM ``apns`` or ``webpush`` block are refused.

    None when they are absent or fine; a null value (which removes a built
    header) is allowed.
    """
    if headers is None:
        return None
    if not isinstance(headers, dict) or not all(
        isinstance(v, str | None) for v in headers.values()
    ):
        return "headers is an object of strings"
    given = {k: v for k, v in headers.items() if v is not None}
    return headers_problem(given, SENDER_HEADERS)


def _shown(name: str) -> str:
    """A header name for an error message: escaped and cut short."""
    return repr(name[:HEADER_NAME_MAX])


class _Input(BaseModel):
    """An event published by an upstream service: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class _Output(BaseModel):
    """An event pushstream publishes: readers should ignore fields they don't know."""

    model_config = ConfigDict(extra="ignore", frozen=True)


# --- registrations (key: user id) ------------------------------------------------


class Register(_Input):
    """A device announces its current push token; apps send this on every start.

    An unchanged token only refreshes the device's last-seen time; a new token
    for a known device replaces the old one.
    """

    type: Literal["register"]
    user_id: UserId
    device_id: DeviceId | None = Field(
        default=None, description="Omitted: the token identifies the device."
    )
    platform: Platform
    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    app: AppId = Field(
        description="APNs bundle id, FCM project id, or WNS package (as configured)."
    )
    environment: Environment = Field(
        default="production", description="APNs environment of the token."
    )
    locale: ShortText | None = None
    timezone: ShortText | None = None
    app_version: ShortText | None = None
    event_time: AwareDatetime = Field(description="When the device registered.")

    @model_validator(mode="after")
    def _token_shape(self) -> Register:
        check_token(self.platform, self.token)
        return self


class Unregister(_Input):
    """A device is gone (logged out, uninstalled): remove it from the user."""

    type: Literal["unregister"]
    user_id: UserId
    device_id: DeviceId | None = None
    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = (
        None
    )
    event_time: AwareDatetime

    @model_validator(mode="after")
    def _names_a_device(self) -> Unregister:
        if self.device_id is None and self.token is None:
            raise ValueError("unregister names a device_id or a token")
        return self


class Sweep(_Input):
    """Retire this user's devices last seen before ``cutoff_ms``.

    The worker's periodic sweep publishes these for itself, so that the
    change is made on the user's own partition like any registration.
    """

    type: Literal["sweep"]
    user_id: UserId
    cutoff_ms: int = Field(
        description="Devices last seen before this are retired; never later "
        "than the worker's clock minus PUSHSTREAM_TOKEN_MAX_AGE_DAYS."
    )
    at_ms: int


Registration = Annotated[Register | Unregister, Field(discriminator="type")]
REGISTRATION: TypeAdapter[Register | Unregister] = TypeAdapter(Registration)
"""What upstream services publish on registrations."""

RegistrationsRecord = Annotated[
    Register | Unregister | Sweep, Field(discriminator="type")
]
REGISTRATIONS_RECORD: TypeAdapter[Register | Unregister | Sweep] = TypeAdapter(
    RegistrationsRecord
)
"""Everything the registrations topic carries: upstream's events and sweeps."""


# --- the devices table (key: user id) ---------------------------------------------


class Device(_Output):
    """One device of a user, as the devices table holds it."""

    device_id: str
    platform: Platform
    token: str
    app: str
    environment: Environment = "production"
    state: Literal["active", "invalid"] = "active"
    registered_at_ms: int = Field(description="When this token was first registered.")
    last_seen_ms: int = Field(description="Latest register event time for it.")
    updated_at_ms: int = Field(
        description="Event time of the last registration or removal applied "
        "(an invalidation does not move it)."
    )
    invalid_reason: str | None = None
    invalidated_at_ms: int | None = None
    locale: str | None = None
    timezone: str | None = None
    app_version: str | None = None


class UserDevices(_Output):
    """The value of the devices table for one user."""

    devices: list[Device] = Field(default_factory=list)
    removed: dict[str, int] = Field(
        default_factory=dict,
        description="device id -> event time (ms) of its removal, so that an older "
        "register arriving late does not bring the device back.",
    )


# --- notifications (key: user id) ---------------------------------------------------


class RawTarget(_Input):
    """A device addressed by its token, without a table lookup."""

    platform: Platform
    token: Annotated[str, StringConstraints(min_length=1, max_length=4096)]
    app: AppId
    environment: Environment = "production"

    @model_validator(mode="after")
    def _token_shape(self) -> RawTarget:
        check_token(self.platform, self.token)
        return self


class ApnsOverrides(_Input):
    """Passed to APNs as given: extra headers, and keys merged into the payload."""

    push_type: (
        Literal[
            "alert",
            "background",
            "location",
            "voip",
            "complication",
            "fileprovider",
            "mdm",
            "liveactivity",
            "pushtotalk",
        ]
        | None
    ) = None
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra APNs request headers (apns-collapse-id, apns-priority, "
        "...): valid HTTP/2 fields; authorization, apns-topic, host, "
        "content-length and pseudo-headers are refused.",
    )
    payload: dict[str, Any] = Field(
        default_factory=dict,
        description="Top-level keys; an 'aps' object is merged into the built one.",
    )

    @field_validator("headers")
    @classmethod
    def _legal_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        problem = headers_problem(headers, APNS_SENDER_HEADERS)
        if problem:
            raise ValueError(problem)
        return headers


class FcmOverrides(_Input):
    """FCM HTTP v1 message blocks, merged into the built message."""

    android: dict[str, Any] | None = None
    apns: dict[str, Any] | None = None
    webpush: dict[str, Any] | None = None
    fcm_options: dict[str, Any] | None = None

    @field_validator("apns", "webpush")
    @classmethod
    def _legal_headers(cls, block: dict[str, Any] | None) -> dict[str, Any] | None:
        # FCM hands these headers on to APNs and to web push services.
        problem = fcm_headers_problem((block or {}).get("headers"))
        if problem:
            raise ValueError(problem)
        return block


class WnsOverrides(_Input):
    """WNS notification type and body; toast XML is built unless xml is given."""

    type: Literal["toast", "tile", "badge", "raw"] = "toast"
    xml: str | None = Field(default=None, description="Body for toast/tile/badge.")
    raw: str | None = Field(default=None, description="Body for wns/raw.")
    tag: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,16}$")] | None = None
    group: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,16}$")] | None = (
        None
    )
    cache_policy: Literal["cache", "no-cache"] | None = None
    request_for_status: bool = False


class Notification(_Input):
    """One notification for one user's devices, for raw tokens, or for an audience.

    The target is, in order: ``tokens`` (no table lookup); ``audience`` (split
    into one notification per user id); else the record key, the user id.
    """

    id: NotificationId = Field(description="Idempotency key: one send per device.")
    user_id: UserId | None = Field(
        default=None, description="Defaults to the record key."
    )
    tokens: list[RawTarget] | None = Field(default=None, min_length=1, max_length=1000)
    audience: list[UserId] | None = Field(default=None, min_length=1, max_length=10000)

    title: str | None = None
    subtitle: str | None = None
    body: str | None = None
    title_loc_key: str | None = None
    title_loc_args: list[str] | None = None
    body_loc_key: str | None = None
    body_loc_args: list[str] | None = None
    image: Annotated[str, StringConstraints(pattern=r"^https://")] | None = None
    data: dict[str, str] = Field(default_factory=dict)
    badge: Annotated[int, Field(ge=0)] | None = None
    sound: str | None = None
    category: str | None = None
    thread_id: str | None = None
    content_available: bool = Field(default=False, description="Silent push.")
    mutable_content: bool = False
    priority: Literal["high", "normal"] = "high"
    ttl: Annotated[int, Field(ge=0, le=MAX_TTL_S)] | None = Field(
        default=None,
        description="Seconds from publication (the record's Kafka timestamp); "
        "0 means now or never: delivered if the device is reachable now, never "
        "stored by the provider (pushstream itself gives it 30 s to get through "
        "its pipeline, then reports it expired).",
    )
    expires_at: AwareDatetime | None = None
    collapse_key: Annotated[str, StringConstraints(max_length=64)] | None = None

    platforms: list[Platform] | None = Field(
        default=None, description="Send only to devices of these platforms."
    )
    apps: list[AppId] | None = Field(
        default=None, description="Send only to devices of these apps."
    )

    apns: ApnsOverrides | None = None
    fcm: FcmOverrides | None = None
    wns: WnsOverrides | None = None

    created_at: AwareDatetime | None = Field(
        default=None, description="When upstream created it (for latency)."
    )

    @model_validator(mode="after")
    def _coherent(self) -> Notification:
        if self.tokens is not None and self.audience is not None:
            raise ValueError("give tokens or audience, not both")
        if self.audience is not None and self.user_id is not None:
            raise ValueError("give audience or user_id, not both")
        if self.ttl is not None and self.expires_at is not None:
            raise ValueError("give ttl or expires_at, not both")
        has_content = any(
            (
                self.title,
                self.body,
                self.title_loc_key,
                self.body_loc_key,
                self.data,
                self.content_available,
                self.badge is not None,
                self.apns and self.apns.payload,
                self.wns and (self.wns.xml or self.wns.raw),
                self.fcm and (self.fcm.android or self.fcm.apns or self.fcm.webpush),
            )
        )
        if not has_content:
            raise ValueError(
                "a notification needs content: title, body, data, badge, "
                "content_available, or a platform override"
            )
        return self


# --- sends.{apns,fcm,wns} (key: send id) --------------------------------------------


class Send(_Output):
    """One rendered request to one device, ready for its platform's sender.

    The router renders the provider's body and headers; the sender adds only
    authentication and transport.
    """

    send_id: str = Field(description="'<notification id>:<device id>'.")
    notification_id: str
    user_id: str | None = None
    device_id: str
    platform: Platform
    app: str
    environment: Environment = "production"
    token: str
    attempt: int = Field(default=1, ge=1, description="The attempt about to be made.")
    accepted_at_ms: int = Field(
        description="When the router accepted the notification."
    )
    expires_at_ms: int | None = Field(
        default=None, description="Not sent after this; None: no expiry."
    )
    now_or_never: bool = Field(
        default=False,
        description="ttl 0: the provider is told not to store it; expires_at_ms "
        "is then only pushstream's own grace for its pipeline delay.",
    )
    priority: Literal["high", "normal"] = "high"
    replay: bool = Field(
        default=False,
        description="The router made this send again: it handled the same "
        "notification record a second time, after a worker died before "
        "committing it. The first send may have reached the device.",
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="Provider headers, without authorization."
    )
    body: str = Field(description="The provider request body, exactly as sent.")


# --- deliveries (key: notification id) ----------------------------------------------

Outcome = Literal[
    "delivered",
    "invalid_token",
    "failed",
    "expired",
    "dropped",
    "rejected",
    "duplicate",
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)


class Delivery(_Output):
    """The final outcome of one send, or of a notification that made no send.

    Analytics reads only this topic. At least once: every send ends in at
    least one Delivery, exactly one after a clean stop. A worker that dies
    without stopping (kill -9, OOM) leaves its uncommitted work to the next
    one, which makes those sends again and publishes their outcomes again:
    deduplicate by ``send_id`` (by ``notification_id`` and ``outcome`` for a
    record without one). A repeat carries the same outcome unless something
    changed in between (the expiry passed, the provider answered otherwise);
    ``duplicate`` reports a notification id seen again, never the outcome of
    a send. See docs/limitations.md.
    """

    notification_id: str
    send_id: str | None = Field(
        default=None,
        description="'<notification id>:<device id>'; absent when the outcome "
        "concerns the whole notification (expired, dropped).",
    )
    user_id: str | None = Field(
        default=None, description="The user; absent for raw-token notifications."
    )
    device_id: str | None = Field(
        default=None, description="A raw token's device id is 'tok-' + its hash."
    )
    platform: Platform | None = None
    app: str | None = None
    outcome: Outcome = Field(
        description="delivered: the provider accepted it. invalid_token: the "
        "provider says the token is dead. failed: the provider refused it, or "
        "retries ran out. expired: its expiry passed before it could be sent. "
        "dropped: nothing to send to (reason no_devices or filtered). rejected: "
        "pushstream would not send it (payload_too_large, invalid_header, "
        "render_failed). "
        "duplicate: this notification id was already sent to this device."
    )
    reason: str = Field(description="Why; a provider reason or pushstream's own.")
    status: int | None = Field(default=None, description="Provider HTTP status.")
    provider_message_id: str | None = Field(
        default=None, description="apns-id, FCM message name or X-WNS-Msg-ID."
    )
    attempts: int = Field(default=0, ge=0, description="Requests made to a provider.")
    accepted_at_ms: int = Field(
        description="When the router accepted the notification."
    )
    sent_at_ms: int | None = Field(
        default=None, description="When the last request to the provider was made."
    )
    completed_at_ms: int = Field(description="When this outcome was decided.")
    latency_ms: int = Field(description="completed_at_ms - accepted_at_ms.")
    replay: bool = Field(
        default=False,
        description="The outcome of a send made again after a crash (the "
        "send's replay): an earlier record with this send_id may exist.",
    )


# --- token-events (key: user id) ----------------------------------------------------

TokenEventType = Literal[
    "invalidated", "replaced", "released", "reregister_requested", "retired"
]


class TokenEvent(_Output):
    """Something happened to a device token.

    - ``invalidated``: a provider said the token is dead (from a sender).
    - ``replaced``: the device registered a new token (from the registry).
    - ``released``: another user registered the token; it leaves this user.
    - ``reregister_requested``: upstream should ask the app to register again.
    - ``retired``: the token was not seen for too long and was removed.
    """

    type: TokenEventType
    user_id: str | None = None
    device_id: str | None = None
    platform: Platform
    app: str
    token: str
    reason: str
    provider_time_ms: int | None = Field(
        default=None, description="When the provider says the token became invalid."
    )
    event_time_ms: int
    notification_id: str | None = None


# --- token-owners (key: token fingerprint; internal) ---------------------------------


class TokenClaim(_Output):
    """A user registered a token: the previous owner, if any, must let it go.

    A record without ``type``, as workers that know only claims write it, is
    a claim too.
    """

    type: Literal["claim"] = "claim"
    token_fp: str
    token: str
    platform: Platform
    app: str
    user_id: str
    device_id: str
    event_time_ms: int


ReleaseReason = Literal[
    "unregistered", "replaced", "retired", "invalidated", "released"
]


class TokenRelease(_Output):
    """A user's device stopped holding a token: its owners entry may go.

    The owner agent removes the entry only while it still names this user and
    device, so a release that arrives after another user's claim changes
    nothing. The time is ``released_at_ms``, not ``event_time_ms``: a worker
    that knows only claims refuses a release instead of taking it for a claim.
    """

    type: Literal["release"]
    token_fp: str
    token: str
    user_id: str
    device_id: str
    reason: ReleaseReason = Field(
        description="unregistered, replaced (a new token), retired (the sweep or "
        "the device limit), invalidated (a provider said it is dead), released "
        "(another user registered it)."
    )
    released_at_ms: int = Field(
        description="When the device let go; never before its last registration."
    )


def _owners_tag(value: Any) -> str | None:
    """The kind of a token-owners record; one without a type is a claim."""
    if isinstance(value, dict):
        kind = value.get("type", "claim")
        return kind if isinstance(kind, str) else None
    kind = getattr(value, "type", None)
    return kind if isinstance(kind, str) else None


TokenOwnersRecord = Annotated[
    Annotated[TokenClaim, Tag("claim")] | Annotated[TokenRelease, Tag("release")],
    Discriminator(_owners_tag),
]
TOKEN_OWNERS_RECORD: TypeAdapter[TokenClaim | TokenRelease] = TypeAdapter(
    TokenOwnersRecord
)
"""Everything the token-owners topic carries: claims and releases."""


# --- retries (key: send id) ---------------------------------------------------------


class RetryRequest(_Output):
    """A send to make again once ``due_at_ms`` has passed."""

    send: Send
    due_at_ms: int
    reason: str
    status: int | None = None


# --- dead-letters (key: the original key) ------------------------------------------


class DeadLetter(_Output):
    """Input that could not be decoded, validated or sent, kept for operators.

    The key and value are kept whole up to 16 KiB and 256 KiB of the original;
    a longer one is cut, with ``key_truncated`` / ``value_truncated`` set, so
    that the dead letter always fits in one Kafka record.
    """

    source_topic: str
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    key_encoding: Literal["utf-8", "base64"] = "utf-8"
    key_truncated: bool = Field(
        default=False, description="Only the start of the key is kept."
    )
    key_size: int | None = Field(
        default=None, description="The original key's size in bytes."
    )
    value: str | None = None
    value_encoding: Literal["utf-8", "base64"] = "utf-8"
    value_truncated: bool = Field(
        default=False, description="Only the start of the value is kept."
    )
    value_size: int | None = Field(
        default=None, description="The original value's size in bytes."
    )
    error: str = Field(description="A readable reason.")
    stage: str = Field(description="Which part of pushstream refused it.")
    at_ms: int


def describe_error(exc: Exception) -> str:
    """A readable reason for a refused event that never repeats its input.

    Pydantic's own message quotes the input, which may hold a device token;
    this keeps the field path and the rule only.
    """
    errors = getattr(exc, "errors", None)
    if errors is None:
        return f"{type(exc).__name__}: {exc}"[:500]
    parts = []
    for error in errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "value"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)[:1000]
