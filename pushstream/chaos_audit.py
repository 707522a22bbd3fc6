"""The workload of a chaos run and the audit of what came out of it.

``bench/chaos.py`` (the measurement) and ``tests/test_chaos.py`` (its short
version) both register users' devices whose tokens are on sandbox scenarios,
publish notifications while a worker is killed, stopped or cut off from
Kafka, and then check the delivery guarantees from the deliveries topic and
the sandbox's record of accepted pushes:

- every expected (notification, device) has a final outcome;
- no send has two different outcomes, and each has the one its token's
  scenario calls for;
- the sandbox accepted every push reported ``delivered``;
- duplicates are counted, not refused: the contract is at least once.

Everything here is pure; the callers do the I/O.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pushstream import topics
from pushstream.events import Outcome, Platform

AUDIENCE = 10  # users of an audience notification
# The notification ids :func:`plan` makes, as found in an accepted push.
NOTIFICATION_ID = re.compile(r"chaos-[0-9a-f]+-\d+")
# A worker has handled everything once its group has consumed these.
WORKER_INPUTS = (
    topics.REGISTRATIONS,
    topics.TOKEN_EVENTS,
    topics.TOKEN_OWNERS,
    topics.NOTIFICATIONS,
    topics.RETRIES,
    "sends.apns",
    "sends.fcm",
    "sends.wns",
)


# --- the workload ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """A device to register, and the outcome its token's scenario ends in."""

    user_id: str
    device_id: str
    platform: Platform
    app: str
    token: str
    outcome: Outcome

    @property
    def dead(self) -> bool:
        return self.outcome == "invalid_token"

    @property
    def push_key(self) -> str:
        """What the sandbox's accepted record names the device by."""
        if self.platform == "wns":
            return parse_qs(urlsplit(self.token).query)["token"][0]
        return self.token


@dataclass(frozen=True, slots=True)
class Population:
    devices: dict[str, tuple[Device, ...]]  # user id -> devices

    @property
    def once(self) -> list[str]:
        """Users with a dead token: they get exactly one notification."""
        return [u for u, ds in self.devices.items() if any(d.dead for d in ds)]

    @property
    def many(self) -> list[str]:
        return [u for u, ds in self.devices.items() if not any(d.dead for d in ds)]


def registrations(population: Population) -> list[tuple[bytes, bytes]]:
    """(key, value) of a registration of every device, made five minutes ago."""
    at = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    records = []
    for user, devices in population.devices.items():
        for d in devices:
            event = {
                "type": "register",
                "user_id": user,
                "device_id": d.device_id,
                "platform": d.platform,
                "token": d.token,
                "app": d.app,
                "event_time": at,
            }
            records.append((user.encode(), json.dumps(event).encode()))
    return records


@dataclass(frozen=True, slots=True)
class Planned:
    """One notification: for one user (keyed by it), or for an audience."""

    nid: str
    users: tuple[str, ...]
    audience: bool = False

    @property
    def key(self) -> bytes:
        return (self.nid if self.audience else self.users[0]).encode()

    @property
    def value(self) -> bytes:
        body: dict[str, Any] = {"id": self.nid, "title": "Chaos", "body": self.nid}
        if self.audience:
            body["audience"] = list(self.users)
        return json.dumps(body | {"data": {"n": self.nid}}).encode()


def plan(
    population: Population, count: int, tag: str, audience_share: float = 0.0
) -> list[Planned]:
    """The notifications in publishing order.

    Each user with a dead token gets one, so which sends exist never depends
    on when the registry applies an invalidation; the rest go round the
    other users. A share of those are for an audience of :data:`AUDIENCE`
    users (the router splits them into one copy per user, so a crash there
    repeats the copies). ``tag`` (hex digits) makes the ids unique and seeds
    the order.
    """
    rng = random.Random(tag)
    once, many = population.once, population.many
    planned = [Planned(f"chaos-{tag}-{i:06d}", (u,)) for i, u in enumerate(once)]
    for i in range(len(planned), count):
        nid = f"chaos-{tag}-{i:06d}"
        if rng.random() < audience_share:
            planned.append(Planned(nid, tuple(rng.sample(many, AUDIENCE)), True))
        else:
            planned.append(Planned(nid, (many[i % len(many)],)))
    rng.shuffle(planned)
    return planned


def expected_sends(
    population: Population, notifications: Iterable[Planned]
) -> dict[str, Device]:
    """send id -> its device, for every (notification, device) to reach."""
    return {
        f"{n.nid}:{d.device_id}": d
        for n in notifications
        for user in n.users
        for d in population.devices[user]
    }


# --- the audit ------------------------------------------------------------------------


@dataclass
class Audit:
    """What the deliveries topic and the sandbox say about the expected sends."""

    expected: int
    outcomes: Counter[str] = field(default_factory=Counter)
    missing: list[str] = field(default_factory=list)
    conflicting: dict[str, list[str]] = field(default_factory=dict)
    wrong: dict[str, tuple[str, str]] = field(default_factory=dict)
    unexpected: int = 0
    duplicate_records: int = 0
    sends_with_duplicates: int = 0
    rerouted: int = 0  # duplicates from a notification routed again
    duplicate_reports: int = 0  # "duplicate": the router saw an id again
    pushes_missing: list[str] = field(default_factory=list)
    duplicate_pushes: int = 0

    @property
    def ok(self) -> bool:
        return not (
            self.missing
            or self.conflicting
            or self.wrong
            or self.unexpected
            or self.pushes_missing
        )


def push_id(record: dict[str, Any]) -> tuple[str, str] | None:
    """(device key, notification id) of a push the sandbox accepted."""
    text = record.get("body") or json.dumps(record.get("message", {}))
    found = NOTIFICATION_ID.search(text)
    if found is None:
        return None
    key = record.get("channel") if record["platform"] == "wns" else record["token"]
    return str(key), found.group(0)


def audit(
    expected: dict[str, Device],
    deliveries: Iterable[dict[str, Any]],
    accepted: Iterable[dict[str, Any]],
) -> Audit:
    """Check the delivery records and the sandbox's accepted pushes against
    the expected sends (see the module's docstring)."""
    result = Audit(len(expected))
    by_send: dict[str, list[str]] = defaultdict(list)
    routed: dict[str, set[int]] = defaultdict(set)
    for delivery in deliveries:
        send_id = delivery.get("send_id")
        if delivery["outcome"] == "duplicate" and send_id in expected:
            # Not an outcome of the send: the notification id came again (an
            # audience split repeated after a crash) and was not sent again.
            result.duplicate_reports += 1
        elif send_id in expected:
            by_send[send_id].append(delivery["outcome"])
            routed[send_id].add(delivery["accepted_at_ms"])
        else:
            result.unexpected += 1
    for send_id, device in expected.items():
        seen = by_send.get(send_id)
        if not seen:
            result.missing.append(send_id)
            continue
        result.outcomes[seen[0]] += 1
        if len(seen) > 1:
            result.sends_with_duplicates += 1
            result.duplicate_records += len(seen) - 1
            result.rerouted += len(routed[send_id]) - 1
        if len(set(seen)) > 1:
            result.conflicting[send_id] = seen
        elif seen[0] != device.outcome:
            result.wrong[send_id] = (device.outcome, seen[0])

    pushes = Counter(p for p in map(push_id, accepted) if p is not None)
    result.duplicate_pushes = sum(n - 1 for n in pushes.values())
    for send_id, device in expected.items():
        nid = send_id.rpartition(":")[0]
        if device.outcome == "delivered" and not pushes[device.push_key, nid]:
            result.pushes_missing.append(send_id)
    return result
