"""The demo's sample: what an upstream service would publish, and what must follow.

:func:`build_sample` makes, from a seed, the registrations and notifications
of a few hundred users with devices on all three platforms, together with
the outcome each notification must end in once the pipeline has handled it.
No I/O: WNS channel URIs come from a callable (the sandbox's admin API makes
them), so a test can build the same sample as the demo.

What the sample holds:

- every user has one to three devices: APNs tokens of both environments,
  FCM tokens of the sandbox's projects, WNS channels of its apps; some
  devices register again with an unchanged token (apps do on every start);
- dead tokens, as the sandbox's scenarios (:data:`DEAD`): an extra device
  of some users whose app was uninstalled (APNs Unregistered, ExpiredToken,
  BadDeviceToken; FCM UNREGISTERED; WNS 410 and 404);
- token rotations: a device registers a new token, and only the new one
  may receive pushes;
- a device changing hands: a user's only phone is registered by a second
  user, so the first has no device left;
- malformed events, which must end on dead-letters: bad JSON, an unknown
  platform, a malformed token, a WNS channel on an untrusted host;
- notifications: one per user, one for an audience, one for raw tokens,
  one whose ttl passed before it was published, and one published twice
  with the same id.

Expected outcomes follow the router's and the senders' rules: one outcome
per live device (delivered, or invalid_token for a dead token), ``dropped``
once for a user without devices, ``expired`` once for an expired
notification, ``duplicate`` per device for an id already sent. Every user
with a dead token gets exactly one notification, so no outcome depends on
when the registry applies an invalidation.
"""

from __future__ import annotations

import json
import random
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pushstream.events import Environment, Outcome, Platform
from pushstream.sandbox.apns import SCENARIO_PREFIXES

# A dead token of each kind the sandbox knows: (platform, scenario).
DEAD: tuple[tuple[Platform, str], ...] = (
    ("apns", "unregistered"),
    ("apns", "expired"),
    ("apns", "bad"),
    ("fcm", "unregistered"),
    ("wns", "expired"),
    ("wns", "unknown"),
)
MIN_USERS = 16

# The platform (and APNs environment) of successive devices: 40 % APNs
# (a fifth of them development builds), 40 % FCM, 20 % WNS.
_KINDS: tuple[tuple[Platform, Environment], ...] = (
    ("apns", "production"),
    ("fcm", "production"),
    ("wns", "production"),
    ("apns", "production"),
    ("fcm", "production"),
    ("apns", "development"),
    ("fcm", "production"),
    ("wns", "production"),
    ("apns", "production"),
    ("fcm", "production"),
)
_APNS_PREFIX = {name: prefix for prefix, name in SCENARIO_PREFIXES.items()}
_URLSAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_LOCALES: tuple[tuple[str, str], ...] = (
    ("en-US", "America/New_York"),
    ("de-DE", "Europe/Berlin"),
    ("fr-FR", "Europe/Paris"),
    ("ja-JP", "Asia/Tokyo"),
    ("pt-BR", "America/Sao_Paulo"),
)

# (package or app, scenario) -> a new channel URI of the sandbox.
ChannelMaker = Callable[[str, str], str]
Expected = tuple[Platform | None, Outcome]


@dataclass(frozen=True, slots=True)
class Apps:
    """The app names the sandbox has credentials for, per platform."""

    apns: tuple[str, ...]
    fcm: tuple[str, ...]
    wns: tuple[str, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Apps:
        """Read them from the sandbox's env file (``PUSHSTREAM_APNS`` ...)."""

        def names(variable: str, field_name: str) -> tuple[str, ...]:
            entries = json.loads(env.get(variable) or "[]")
            return tuple(str(entry[field_name]) for entry in entries)

        apps = cls(
            names("PUSHSTREAM_APNS", "bundle_id"),
            names("PUSHSTREAM_FCM", "project_id"),
            names("PUSHSTREAM_WNS", "package"),
        )
        if not (apps.apns and apps.fcm and apps.wns):
            raise ValueError("the sandbox env file names no app for some platform")
        return apps

    def for_platform(self, platform: Platform) -> tuple[str, ...]:
        names: tuple[str, ...] = getattr(self, platform)
        return names


@dataclass(frozen=True, slots=True)
class SampleDevice:
    """A device as the table should hold it once the registrations are applied."""

    user_id: str
    device_id: str
    platform: Platform
    app: str
    environment: Environment
    token: str
    scenario: str = "ok"

    @property
    def outcome(self) -> Outcome:
        """What its send ends in: delivered, or invalid_token for a dead token."""
        return "delivered" if self.scenario == "ok" else "invalid_token"


@dataclass(frozen=True, slots=True)
class Record:
    """One record to publish: key, value and, for notifications, what follows.

    ``timestamp_ms`` sets the record's Kafka timestamp (None: now).
    ``expected`` lists the final outcomes the record must produce on
    deliveries, as (platform, outcome); the platform is None for the outcomes
    of a whole notification (expired, dropped).
    """

    key: bytes | None
    value: bytes
    notification_id: str | None = None
    timestamp_ms: int | None = None
    expected: tuple[Expected, ...] = ()
    what: str = ""


@dataclass
class Sample:
    """Everything the demo publishes, and what must come of it."""

    tag: str
    users: list[str]
    registrations: list[Record] = field(default_factory=list)
    notifications: list[Record] = field(default_factory=list)
    devices: dict[str, list[SampleDevice]] = field(default_factory=dict)
    dead_letters: list[str] = field(default_factory=list)
    rotated: list[tuple[str, str]] = field(default_factory=list)
    handed_over: tuple[str, str, str] | None = None

    @property
    def notification_ids(self) -> set[str]:
        return {r.notification_id for r in self.notifications if r.notification_id}

    @property
    def device_count(self) -> int:
        return sum(len(devices) for devices in self.devices.values())

    def expected_outcomes(self) -> Counter[Expected]:
        """(platform, outcome) -> how many final outcomes must be on deliveries."""
        return Counter(e for record in self.notifications for e in record.expected)

    def expected_by_id(self) -> Counter[str]:
        """Notification id -> how many final outcomes it must have."""
        counts: Counter[str] = Counter()
        for record in self.notifications:
            if record.notification_id:
                counts[record.notification_id] += len(record.expected)
        return counts

    def expected_invalidations(self) -> int:
        """Dead tokens that are sent to, each reported once."""
        return sum(
            1
            for _, outcome in self.expected_outcomes().elements()
            if outcome == "invalid_token"
        )


class _Tokens:
    """Device tokens in each platform's real shape, from the sample's generator."""

    def __init__(self, rng: random.Random, channel: ChannelMaker) -> None:
        self._rng = rng
        self._channel = channel

    def make(self, platform: Platform, app: str, scenario: str = "ok") -> str:
        if platform == "apns":
            return self.apns(scenario)
        if platform == "fcm":
            return self.fcm(scenario)
        return self._channel(app, scenario)

    def apns(self, scenario: str = "ok") -> str:
        while True:
            token = f"{self._rng.getrandbits(256):064x}"
            if scenario != "ok":
                return _APNS_PREFIX[scenario] + token[8:]
            if token[:8] not in SCENARIO_PREFIXES:
                return token

    def fcm(self, scenario: str = "ok") -> str:
        text = "".join(self._rng.choices(_URLSAFE, k=140))
        if scenario != "ok":
            return f"{scenario}-{text[:60]}"
        return f"{text[:22]}:APA91b{text[22:]}"

    def device_id(self) -> str:
        return str(uuid.UUID(int=self._rng.getrandbits(128), version=4))


def build_sample(
    users: int,
    *,
    apps: Apps,
    channel: ChannelMaker,
    seed: int = 7,
    tag: str = "demo",
    now: datetime | None = None,
) -> Sample:
    """The sample for ``users`` users (at least :data:`MIN_USERS`)."""
    if users < MIN_USERS:
        raise ValueError(f"the sample needs at least {MIN_USERS} users")
    rng = random.Random(f"{seed}:{tag}")
    tokens = _Tokens(rng, channel)
    now = now or datetime.now(UTC)
    base = now.replace(microsecond=0) - timedelta(hours=1)
    user_ids = [f"user-{tag}-{i:04d}" for i in range(users)]
    sample = Sample(tag=tag, users=user_ids)
    builder = _Builder(sample, rng, tokens, apps, base)

    # Roles: the last two users hand a phone over; the others are shuffled
    # into dead-token users, rotating users and plain ones.
    order = list(range(users - 2))
    rng.shuffle(order)
    dead_count = max(len(DEAD), users // 25)
    rotating_count = max(2, users // 50)
    dead = {user_ids[i] for i in order[:dead_count]}
    rotating = {user_ids[i] for i in order[dead_count : dead_count + rotating_count]}
    settled = [user_ids[i] for i in order[dead_count:]]

    for user in user_ids[:-2]:
        builder.devices_of(user, rotate=user in rotating)
        if user in dead:
            builder.dead_device(user, DEAD[len(builder.dead_done) % len(DEAD)])
    builder.hand_over(user_ids[-2], user_ids[-1])
    builder.malformed(user_ids[0])

    for user in user_ids:
        builder.notify(user)
    builder.audience(settled[2 : 2 + max(3, users // 10)])
    builder.raw_tokens()
    builder.expired(settled[0])
    builder.duplicate(settled[1])
    return sample


class _Builder:
    """Adds events to a sample, keeping the table state they lead to."""

    def __init__(
        self,
        sample: Sample,
        rng: random.Random,
        tokens: _Tokens,
        apps: Apps,
        base: datetime,
    ) -> None:
        self.sample = sample
        self.rng = rng
        self.tokens = tokens
        self.apps = apps
        self.base = base
        self.dead_done: list[str] = []
        self._kind = 0
        self._app: Counter[Platform] = Counter()
        self._first: dict[str, Record] = {}

    # --- registrations --------------------------------------------------------

    def devices_of(self, user: str, *, rotate: bool = False) -> None:
        count = self.rng.choice((1, 1, 2, 2, 2, 3))
        for number in range(count):
            platform, environment = self._next_kind()
            if rotate and number == 0:
                platform, environment = ("apns", "production")
            device = self._device(user, platform, environment)
            seen = self.rng.uniform(0, 1800)
            self._register(device, seen)
            if rotate and number == 0:
                new = _replace_token(device, self.tokens.apns())
                self._register(new, 2400)
                self.sample.rotated.append((device.token, new.token))
                device = new
            elif self.rng.random() < 0.15:
                self._register(device, seen + 600)  # the app started again
            self.sample.devices.setdefault(user, []).append(device)

    def dead_device(self, user: str, dead: tuple[Platform, str]) -> None:
        platform, scenario = dead
        device = self._device(user, platform, "production", scenario)
        self._register(device, self.rng.uniform(0, 1200))
        self.sample.devices.setdefault(user, []).append(device)
        self.dead_done.append(scenario)

    def hand_over(self, seller: str, buyer: str) -> None:
        """The seller's only phone is registered by the buyer half an hour later."""
        phone = self._device(seller, "apns", "production")
        self._register(phone, 600)
        self.sample.devices[seller] = []
        self.devices_of(buyer)
        bought = SampleDevice(
            buyer,
            self.tokens.device_id(),
            phone.platform,
            phone.app,
            phone.environment,
            phone.token,
        )
        self._register(bought, 3000)
        self.sample.devices[buyer].append(bought)
        self.sample.handed_over = (phone.token, seller, buyer)

    def malformed(self, user: str) -> None:
        """Four registrations the registry must refuse to dead-letters."""
        at = self._at(100)
        app = self.apps.apns[0]
        wrong: list[tuple[str, Any]] = [
            ("malformed JSON", f'{{"type": "register", "user_id": "{user}", "pla'),
            ("unknown platform", {"platform": "blackberry", "token": "12345678"}),
            ("malformed APNs token", {"platform": "apns", "token": "not-hex-1234"}),
            (
                "WNS channel on an untrusted host",
                {
                    "platform": "wns",
                    "token": "https://wns.example.net/?token=stolen",
                    "app": self.apps.wns[0],
                },
            ),
        ]
        for what, fields in wrong:
            if isinstance(fields, str):
                value = fields.encode()
            else:
                event = {"type": "register", "user_id": user, "app": app}
                event |= fields | {"event_time": at}
                value = json.dumps(event).encode()
            self.sample.registrations.append(Record(user.encode(), value, what=what))
            self.sample.dead_letters.append(what)

    def _device(
        self,
        user: str,
        platform: Platform,
        environment: Environment,
        scenario: str = "ok",
    ) -> SampleDevice:
        names = self.apps.for_platform(platform)
        app = names[self._app[platform] % len(names)]
        self._app[platform] += 1
        token = self.tokens.make(platform, app, scenario)
        return SampleDevice(
            user, self.tokens.device_id(), platform, app, environment, token, scenario
        )

    def _register(self, device: SampleDevice, seconds: float) -> None:
        locale, zone = self.rng.choice(_LOCALES)
        event: dict[str, Any] = {
            "type": "register",
            "user_id": device.user_id,
            "device_id": device.device_id,
            "platform": device.platform,
            "token": device.token,
            "app": device.app,
            "locale": locale,
            "timezone": zone,
            "app_version": f"4.{self.rng.randint(0, 12)}.{self.rng.randint(0, 9)}",
            "event_time": self._at(seconds),
        }
        if device.platform == "apns":
            event["environment"] = device.environment
        value = json.dumps(event).encode()
        self.sample.registrations.append(Record(device.user_id.encode(), value))

    def _next_kind(self) -> tuple[Platform, Environment]:
        kind = _KINDS[self._kind % len(_KINDS)]
        self._kind += 1
        return kind

    def _at(self, seconds: float) -> str:
        return (self.base + timedelta(seconds=seconds)).isoformat()

    # --- notifications --------------------------------------------------------

    def notify(self, user: str) -> None:
        number = len(self.sample.notifications) + 1
        nid = f"n-{self.sample.tag}-{number:05d}"
        content = _content(self.rng, number)
        value = json.dumps({"id": nid, **content}).encode()
        record = Record(
            user.encode(), value, nid, expected=self._outcomes(user), what="user"
        )
        self.sample.notifications.append(record)
        self._first[user] = record

    def audience(self, users: Sequence[str]) -> None:
        nid = f"n-{self.sample.tag}-audience"
        value = {
            "id": nid,
            "audience": list(users),
            "title": "Spring sale",
            "body": "Everything 20 % off until Sunday.",
            "data": {"campaign": "spring"},
            "priority": "normal",
            "collapse_key": "campaign",
        }
        expected = tuple(e for user in users for e in self._outcomes(user))
        key = f"campaign-{self.sample.tag}".encode()
        self.sample.notifications.append(
            Record(key, json.dumps(value).encode(), nid, None, expected, "audience")
        )

    def raw_tokens(self) -> None:
        """A notification to three devices known only by their tokens."""
        nid = f"n-{self.sample.tag}-raw"
        targets = []
        for platform in ("apns", "fcm", "wns"):
            app = self.apps.for_platform(platform)[0]
            target = {"platform": platform, "token": self.tokens.make(platform, app)}
            targets.append(target | {"app": app})
        value = {"id": nid, "tokens": targets, "title": "Welcome", "body": "Hello!"}
        expected: tuple[Expected, ...] = (
            ("apns", "delivered"),
            ("fcm", "delivered"),
            ("wns", "delivered"),
        )
        self.sample.notifications.append(
            Record(None, json.dumps(value).encode(), nid, None, expected, "raw tokens")
        )

    def expired(self, user: str) -> None:
        """A five-minute ttl, published (by its timestamp) ten minutes ago."""
        nid = f"n-{self.sample.tag}-expired"
        value = {
            "id": nid,
            "title": "Flash sale",
            "body": "Ends in 5 minutes",
            "ttl": 300,
        }
        stamp = int((datetime.now(UTC) - timedelta(minutes=10)).timestamp() * 1000)
        expected: tuple[Expected, ...] = ((None, "expired"),)
        self.sample.notifications.append(
            Record(
                user.encode(),
                json.dumps(value).encode(),
                nid,
                stamp,
                expected,
                "ttl passed",
            )
        )

    def duplicate(self, user: str) -> None:
        """The user's notification again, as an upstream retry would publish it."""
        first = self._first[user]
        expected: tuple[Expected, ...] = tuple(
            (platform, "duplicate") for platform, _ in first.expected if platform
        )
        if not expected:  # no device: dropped again, as the first time
            expected = first.expected
        self.sample.notifications.append(
            Record(
                first.key,
                first.value,
                first.notification_id,
                None,
                expected,
                "duplicate id",
            )
        )

    def _outcomes(self, user: str) -> tuple[Expected, ...]:
        devices = self.sample.devices.get(user, [])
        if not devices:
            return ((None, "dropped"),)
        return tuple((d.platform, d.outcome) for d in devices)


def _replace_token(device: SampleDevice, token: str) -> SampleDevice:
    return SampleDevice(
        device.user_id,
        device.device_id,
        device.platform,
        device.app,
        device.environment,
        token,
        device.scenario,
    )


def _content(rng: random.Random, number: int) -> dict[str, Any]:
    """A notification's content, from a few realistic kinds."""
    kind = number % 4
    if kind == 0:
        order = rng.randint(10_000, 99_999)
        return {
            "title": "Your order has shipped",
            "body": f"Order #{order} is on its way.",
            "data": {"order_id": str(order), "screen": "orders"},
            "thread_id": "orders",
        }
    if kind == 1:
        return {
            "title": "New message",
            "body": "Sam: are we still on for tomorrow?",
            "badge": rng.randint(1, 9),
            "sound": "default",
            "category": "MESSAGE",
            "data": {"conversation": f"c{rng.randint(1, 999)}"},
        }
    if kind == 2:
        return {
            "title_loc_key": "REMINDER_TITLE",
            "body_loc_key": "REMINDER_BODY",
            "body_loc_args": ["18:30"],
            "ttl": 3600,
            "priority": "normal",
        }
    return {"content_available": True, "data": {"sync": "inbox"}, "priority": "normal"}
