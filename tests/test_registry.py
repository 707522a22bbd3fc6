"""The device registry end to end: a real worker, a real broker, RocksDB tables.

Each test starts its own ``pushstream worker`` (4 partitions, RocksDB store),
publishes registrations and token events, waits until the worker's group has
consumed them (so every effect is in Kafka), and reads the devices table from
its changelog and the output topics back.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from workerproc import Message, WorkerProcess, read_all, read_table, wait_consumed

from pushstream.config import Settings
from pushstream.events import UserDevices, token_fingerprint
from pushstream.worker import read_devices, read_table_value

pytestmark = pytest.mark.kafka

Env = Callable[..., dict[str, str]]
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)


def at(seconds: float) -> str:
    """An event time ``seconds`` after the test's reference time."""
    return (T0 + timedelta(seconds=seconds)).isoformat()


def ms(seconds: float) -> int:
    return int((T0 + timedelta(seconds=seconds)).timestamp() * 1000)


def apns(n: int) -> str:
    return f"{n:064x}"


def fcm(n: int) -> str:
    return f"fcm-token-{n:08d}:APA91b" + "x" * 40


def register(
    user: str, token: str, when: float, *, device: str | None = None, **extra: Any
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "type": "register",
        "user_id": user,
        "platform": "apns" if len(token) == 64 else "fcm",
        "token": token,
        "app": "com.example.app",
        "event_time": at(when),
    }
    if device is not None:
        value["device_id"] = device
    value.update(extra)
    return value


def unregister(user: str, when: float, **names: str) -> dict[str, Any]:
    return {"type": "unregister", "user_id": user, "event_time": at(when), **names}


def invalidated(
    user: str, token: str, when: float, provider: float | None = None
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "type": "invalidated",
        "user_id": user,
        "platform": "apns" if len(token) == 64 else "fcm",
        "app": "com.example.app",
        "token": token,
        "reason": "Unregistered",
        "event_time_ms": ms(when),
    }
    if provider is not None:
        value["provider_time_ms"] = ms(provider)
    return value


class Harness:
    """Publishes to the worker's inputs and reads its table and outputs."""

    def __init__(self, kafka: Any, settings: Settings) -> None:
        self.kafka = kafka
        self.settings = settings

    async def registrations(self, *values: dict[str, Any]) -> None:
        records = [(v["user_id"], v) for v in values]
        await self.kafka.produce(self.settings.topic("registrations"), records)

    async def apply(self, *values: dict[str, Any]) -> None:
        """Publish registrations and wait until the worker has consumed them."""
        await self.registrations(*values)
        await self.settled()

    async def token_events(self, *values: dict[str, Any]) -> None:
        records = [(v["user_id"], v) for v in values]
        await self.kafka.produce(self.settings.topic("token-events"), records)

    async def settled(self) -> None:
        await wait_consumed(self.settings)

    async def devices(self, user: str) -> UserDevices:
        return await read_devices(self.settings, user)

    async def tokens(self, user: str) -> dict[str, str]:
        """device id -> token of the user's devices."""
        state = await self.devices(user)
        return {d.device_id: d.token for d in state.devices}

    async def published(self, *types: str) -> list[Message]:
        """Token events the registry published (not the test's own input)."""
        got = await read_all(self.settings, self.settings.topic("token-events"))
        return [m for m in got if m.value["type"] in types]

    async def dead_letters(self) -> list[Message]:
        return await read_all(self.settings, self.settings.topic("dead-letters"))


@pytest.fixture
async def harness(kafka: Any, settings: Settings) -> Harness:
    await kafka.create_topics(settings)
    return Harness(kafka, settings)


async def test_registered_device_is_in_the_table_and_shown_by_devices(
    harness: Harness, worker_env: Env
) -> None:
    """A registered device would get no pushes: the router finds no token."""
    with WorkerProcess(worker_env()) as worker:
        await harness.apply(
            register("alice", apns(1), 0, device="phone", locale="fr_FR"),
            register("bob", fcm(2), 1),
        )
        alice = await harness.devices("alice")
        bob = await harness.devices("bob")
        shown = await run_cli(worker_env(), "devices", "alice")
        assert worker.stop() == 0

    assert [(d.device_id, d.token, d.locale) for d in alice.devices] == [
        ("phone", apns(1), "fr_FR")
    ]
    assert alice.devices[0].last_seen_ms == ms(0)
    assert [d.token for d in bob.devices] == [fcm(2)]
    assert "user alice: 1 device" in shown
    assert apns(1)[:8] + "…" in shown
    assert apns(1) not in shown


async def test_refresh_keeps_the_token_and_a_new_token_replaces_it(
    harness: Harness, worker_env: Env
) -> None:
    """Upstream would not learn of rotated tokens, or see false rotations."""
    with WorkerProcess(worker_env()):
        await harness.apply(
            register("alice", apns(1), 0, device="phone"),
            register("alice", apns(1), 10, device="phone"),
            register("alice", apns(2), 20, device="phone"),
            register("alice", apns(2), 30, device="phone"),
        )
        [device] = (await harness.devices("alice")).devices
        replaced = await harness.published("replaced")

    assert (device.token, device.registered_at_ms, device.last_seen_ms) == (
        apns(2),
        ms(20),
        ms(30),
    )
    assert [(m.key, m.value["token"], m.value["device_id"]) for m in replaced] == [
        ("alice", apns(1), "phone")
    ]


async def test_unregister_removes_and_a_late_register_does_not_resurrect(
    harness: Harness, worker_env: Env
) -> None:
    """A logged-out device would keep receiving the user's pushes."""
    with WorkerProcess(worker_env()):
        await harness.apply(
            register("alice", apns(1), 0, device="phone"),
            register("alice", fcm(2), 0),
            register("alice", fcm(3), 0, device="tablet"),
            unregister("alice", 10, device_id="phone"),
            unregister("alice", 10, token=fcm(2)),
            register("alice", apns(1), 5, device="phone"),  # delayed, older
        )
        assert await harness.tokens("alice") == {"tablet": fcm(3)}

        await harness.apply(register("alice", apns(1), 20, device="phone"))
        assert await harness.tokens("alice") == {"tablet": fcm(3), "phone": apns(1)}


async def test_older_event_does_not_overwrite_newer_state(
    harness: Harness, worker_env: Env
) -> None:
    """A delayed registration would bring back a token the device replaced."""
    with WorkerProcess(worker_env()):
        await harness.apply(
            register("alice", apns(2), 20, device="phone"),
            register("alice", apns(1), 10, device="phone"),
        )
        assert await harness.tokens("alice") == {"phone": apns(2)}
        assert await harness.published("replaced") == []


async def test_device_limit_retires_the_least_recently_seen(
    harness: Harness, worker_env: Env
) -> None:
    """A user's device list would grow without bound, and every push with it."""
    with WorkerProcess(worker_env(PUSHSTREAM_MAX_DEVICES_PER_USER="2")):
        await harness.apply(
            register("alice", apns(1), 0, device="old"),
            register("alice", apns(2), 10, device="mid"),
            register("alice", apns(3), 20, device="new"),
        )
        assert await harness.tokens("alice") == {"mid": apns(2), "new": apns(3)}
        retired = await harness.published("retired")
    assert [(m.key, m.value["device_id"], m.value["token"]) for m in retired] == [
        ("alice", "old", apns(1))
    ]


async def test_token_registered_by_another_user_leaves_the_first(
    harness: Harness, worker_env: Env
) -> None:
    """The previous user would get the new user's pushes on a shared device."""
    settings = harness.settings
    with WorkerProcess(worker_env()):
        await harness.apply(register("alice", apns(1), 0, device="ipad"))
        await harness.apply(register("bob", apns(1), 10, device="ipad"))
        alice = await harness.tokens("alice")
        bob = await harness.tokens("bob")
        released = await harness.published("released")
        owner = await read_table_value(
            settings, "owners", token_fingerprint(apns(1)).encode()
        )
        # Alice registering it again, after Bob, takes it back.
        await harness.apply(register("alice", apns(1), 20, device="ipad"))
        assert await harness.tokens("alice") == {"ipad": apns(1)}
        assert await harness.tokens("bob") == {}

    assert alice == {}
    assert bob == {"ipad": apns(1)}
    assert [(m.key, m.value["token"], m.value["event_time_ms"]) for m in released][
        :1
    ] == [("alice", apns(1), ms(10))]
    assert owner is not None
    assert b'"user_id":"bob"' in owner


def fp(token: str) -> str:
    return token_fingerprint(token)


def release_record(
    user: str, device: str, token: str, when: float, **extra: Any
) -> tuple[str, dict[str, Any]]:
    """A token-owners release as the registry publishes it (key, value)."""
    value: dict[str, Any] = {
        "type": "release",
        "token_fp": fp(token),
        "token": token,
        "user_id": user,
        "device_id": device,
        "reason": "unregistered",
        "released_at_ms": ms(when),
    }
    value.update(extra)
    return fp(token), value


async def owners_changelog(settings: Settings) -> list[Message]:
    return await read_all(settings, f"{settings.app_id}-owners-changelog")


async def test_unregister_removes_the_tokens_owners_entry(
    harness: Harness, worker_env: Env
) -> None:
    """The owners table would keep every token ever registered, for ever."""
    settings = harness.settings
    with WorkerProcess(worker_env()):
        await harness.apply(
            register("alice", apns(1), 0, device="phone"),
            register("alice", apns(2), 0, device="tablet"),
        )
        before = await read_table(settings, "owners")
        await harness.apply(unregister("alice", 10, device_id="phone"))
        after = await read_table(settings, "owners")
        changelog = await owners_changelog(settings)
        releases = await read_all(settings, settings.topic("token-owners"))

    assert set(before) == {fp(apns(1)), fp(apns(2))}
    assert set(after) == {fp(apns(2))}
    # A tombstone: compaction drops the key's older records, then the key.
    assert [m.value for m in changelog if m.key == fp(apns(1))][-1] is None
    [let_go] = [m for m in releases if m.value.get("type") == "release"]
    assert let_go.key == fp(apns(1))
    assert let_go.value["user_id"] == "alice"
    assert let_go.value["device_id"] == "phone"
    assert let_go.value["reason"] == "unregistered"


async def test_rotated_token_leaves_the_owners_table(
    harness: Harness, worker_env: Env
) -> None:
    """Every token rotation would leave one more owners entry behind."""
    settings = harness.settings
    with WorkerProcess(worker_env()):
        await harness.apply(
            register("alice", apns(1), 0, device="phone"),
            register("alice", apns(2), 10, device="phone"),
            register("alice", apns(3), 20, device="phone"),
        )
        owners = await read_table(settings, "owners")
    assert set(owners) == {fp(apns(3))}
    assert owners[fp(apns(3))]["device_id"] == "phone"


async def test_late_release_keeps_the_new_owners_entry(
    harness: Harness, worker_env: Env
) -> None:
    """Alice's release reaching the owner agent after Bob's claim would make
    Bob's token ownerless: the next user to register it would not take it
    from Bob, and both would get each other's pushes."""
    settings = harness.settings
    with WorkerProcess(worker_env()):
        await harness.apply(register("alice", apns(1), 0, device="ipad"))
        await harness.apply(register("bob", apns(1), 10, device="ipad"))
        # Alice's registry let go after it was released, behind Bob's claim.
        published = await read_all(settings, settings.topic("token-owners"))
        owner = (await read_table(settings, "owners")).get(fp(apns(1)))
        # A release of Alice's that is later still (her unregister, say).
        await harness.kafka.produce(
            settings.topic("token-owners"),
            [release_record("alice", "ipad", apns(1), 30)],
        )
        await harness.settled()
        owner_after = (await read_table(settings, "owners")).get(fp(apns(1)))
        # Carol takes it from Bob: Bob is told, so he still had an owner entry.
        await harness.apply(register("carol", apns(1), 40, device="ipad"))
        assert await harness.tokens("bob") == {}
        assert await harness.tokens("carol") == {"ipad": apns(1)}
        final = (await read_table(settings, "owners")).get(fp(apns(1)))
        assert await harness.dead_letters() == []

    kinds = [(m.value.get("type", "claim"), m.value["user_id"]) for m in published]
    assert kinds == [("claim", "alice"), ("claim", "bob"), ("release", "alice")]
    assert owner == {"user_id": "bob", "device_id": "ipad", "event_time_ms": ms(10)}
    assert owner_after == owner
    assert final == {"user_id": "carol", "device_id": "ipad", "event_time_ms": ms(40)}


# A worker retiring devices not seen for a day, and sweeping every second.
SWEEP_AFTER_A_DAY = {
    "PUSHSTREAM_TOKEN_MAX_AGE_DAYS": "1",
    "PUSHSTREAM_SWEEP_INTERVAL_S": "1",
}


def old_and_new() -> list[dict[str, Any]]:
    """Alice's devices: "old", last seen two days ago, and "new", seen now."""
    two_days = 2 * 24 * 3600
    return [
        register("alice", apns(1), -two_days, device="old"),
        register("alice", apns(2), 0, device="new"),
    ]


async def test_sweep_retirement_removes_the_owners_entry(
    harness: Harness, worker_env: Env
) -> None:
    """Tokens of devices retired for age would keep owners entries for ever."""
    settings = harness.settings

    async def owned() -> set[str]:
        await harness.settled()
        return set(await read_table(settings, "owners"))

    with WorkerProcess(worker_env(**SWEEP_AFTER_A_DAY)):
        await harness.registrations(*old_and_new())
        owners = await poll(owned, {fp(apns(2))})
        tokens = await harness.tokens("alice")
    assert tokens == {"new": apns(2)}
    assert owners == {fp(apns(2))}


async def test_invalidated_token_is_marked_and_reregistration_requested(
    harness: Harness, worker_env: Env
) -> None:
    """Pushes would keep going to a dead token and the app never re-registers."""
    with WorkerProcess(worker_env()):
        await harness.apply(
            register("alice", apns(1), 0, device="phone"),
            register("bob", apns(2), 0, device="phone"),
            register("bob", apns(3), 20, device="phone"),
            register("carol", apns(4), 30, device="phone"),
        )
        await harness.token_events(
            invalidated("alice", apns(1), 40, provider=35),
            invalidated("alice", apns(1), 41, provider=35),  # the same, again
            invalidated("bob", apns(2), 40, provider=10),  # an older token
            invalidated("carol", apns(4), 40, provider=25),  # before re-register
        )
        await harness.settled()
        alice = (await harness.devices("alice")).devices
        bob = (await harness.devices("bob")).devices
        carol = (await harness.devices("carol")).devices
        requested = await harness.published("reregister_requested")
        owners = await read_table(harness.settings, "owners")

    assert [(d.token, d.state, d.invalidated_at_ms) for d in alice] == [
        (apns(1), "invalid", ms(35))
    ]
    assert [(d.token, d.state) for d in bob] == [(apns(3), "active")]
    assert [(d.token, d.state) for d in carol] == [(apns(4), "active")]
    assert [(m.key, m.value["token"], m.value["reason"]) for m in requested] == [
        ("alice", apns(1), "Unregistered")
    ]
    # Alice's dead token and Bob's replaced one are nobody's any more.
    assert set(owners) == {fp(apns(3)), fp(apns(4))}


async def test_registry_ignores_its_own_token_events(
    harness: Harness, worker_env: Env
) -> None:
    """Upstream-facing events would be applied as commands, or dead-lettered."""
    with WorkerProcess(worker_env()):
        await harness.apply(register("alice", apns(1), 0, device="phone"))
        before = await harness.devices("alice")
        own = [
            {**invalidated("alice", apns(1), 10), "type": kind}
            for kind in ("replaced", "reregister_requested", "retired")
        ]
        await harness.token_events(*own)
        await harness.settled()
        assert await harness.devices("alice") == before
        assert await harness.dead_letters() == []


async def test_sweep_retires_devices_not_seen_for_the_max_age(
    harness: Harness, worker_env: Env
) -> None:
    """Tokens of long-gone devices would be kept and pushed to forever."""
    with WorkerProcess(worker_env(**SWEEP_AFTER_A_DAY)):
        await harness.registrations(*old_and_new())
        tokens = await poll(lambda: harness.tokens("alice"), {"new": apns(2)})
        await harness.settled()
        events = await harness.published("retired", "reregister_requested")

    assert tokens == {"new": apns(2)}
    assert sorted((m.key, m.value["type"], m.value["device_id"]) for m in events) == [
        ("alice", "reregister_requested", "old"),
        ("alice", "retired", "old"),
    ]


async def test_wns_channel_off_the_allow_list_is_dead_lettered(
    harness: Harness, worker_env: Env
) -> None:
    """The WNS sender would post the app's credential to a stranger's host."""
    good = "https://db3.notify.windows.com/?token=AwYAAAB"
    evil = "https://evil.example/?token=AwYAAAB"
    with WorkerProcess(worker_env()):
        await harness.apply(
            register("alice", evil, 0, device="pc", platform="wns"),
            register("alice", good, 1, device="laptop", platform="wns"),
        )
        assert await harness.tokens("alice") == {"laptop": good}
        [letter] = await harness.dead_letters()
    assert "WNS channel refused" in letter.value["error"]
    assert "evil.example is not a WNS host" in letter.value["error"]
    assert letter.value["source_topic"] == harness.settings.topic("registrations")


BAD_REGISTRATIONS: list[tuple[str, str | bytes | None, Any, str]] = [
    # (what, key, value, a part of the reason)
    ("not JSON", "alice", b"{not json", "Invalid JSON"),
    ("not UTF-8", "alice", b"\xff\xfe\x00", "Invalid JSON"),
    ("no token", "alice", {**register("alice", fcm(1), 0), "token": None}, "token"),
    ("missing field", "alice", {"type": "register", "user_id": "alice"}, "required"),
    (
        "unknown platform",
        "alice",
        register("alice", fcm(1), 0, platform="bb10"),
        "platform",
    ),
    (
        "malformed token",
        "alice",
        register("alice", "zz" * 3, 0, platform="apns"),
        "malformed token",
    ),
    ("unknown field", "alice", register("alice", fcm(1), 0, colour="red"), "colour"),
    ("unknown type", "alice", {"type": "hello", "user_id": "alice"}, "tag"),
    ("key is not user", "mallory", register("alice", fcm(1), 0), "record key"),
    ("no key", None, register("alice", fcm(1), 0), "record key is missing"),
    (
        "no zone",
        "alice",
        {**register("alice", fcm(1), 0), "event_time": "2026-01-01T00:00:00"},
        "timezone",
    ),
]


# Releases an owner agent must refuse: (key, value), and a part of the reason.
_FORGED = release_record("alice", "phone", apns(1), 0)
BAD_RELEASES: list[tuple[str, Any]] = [
    ("mallory", _FORGED[1]),
    ("0" * 32, {**_FORGED[1], "token_fp": "0" * 32}),
    (_FORGED[0], {**_FORGED[1], "reason": "bored"}),
    (_FORGED[0], {**_FORGED[1], "type": "steal"}),
    (_FORGED[0], {**_FORGED[1], "user_id": None}),
]
BAD_RELEASE_REASONS = [
    "a token release is keyed by its token fingerprint",
    "token_fp is not the fingerprint of the token",
    "release.reason",
    "does not match any of the expected tags",
    "release.user_id",
]


async def test_bad_input_goes_to_dead_letters_and_the_agent_goes_on(
    harness: Harness, worker_env: Env
) -> None:
    """One bad event would stop the registry, or vanish without a trace."""
    settings = harness.settings
    kafka = harness.kafka
    with WorkerProcess(worker_env()) as worker:
        positions = await kafka.produce(
            settings.topic("registrations"),
            [(key, value) for _, key, value, _ in BAD_REGISTRATIONS],
        )
        bad_events = await kafka.produce(
            settings.topic("token-events"),
            [
                ("alice", b"[1, 2"),
                ("mallory", invalidated("alice", apns(1), 0)),
            ],
        )
        bad_owners = await kafka.produce(
            settings.topic("token-owners"),
            [
                (
                    "0" * 32,
                    {
                        "token_fp": "0" * 32,
                        "token": apns(1),
                        "platform": "apns",
                        "app": "a",
                        "user_id": "u",
                        "device_id": "d",
                        "event_time_ms": 1,
                    },
                ),
                *BAD_RELEASES,
            ],
        )
        await harness.apply(register("alice", fcm(7), 50, device="phone"))
        letters = await harness.dead_letters()
        tokens = await harness.tokens("alice")
        assert worker.ready()[0] == 200
        assert worker.stop() == 0

    assert tokens == {"phone": fcm(7)}
    found = {
        (m.value["source_topic"], m.value["partition"], m.value["offset"]): m.value
        for m in letters
    }
    expected = [
        (settings.topic("registrations"), position, why)
        for position, (_, _, _, why) in zip(positions, BAD_REGISTRATIONS, strict=True)
    ]
    expected += [
        (settings.topic("token-events"), bad_events[0], "Invalid JSON"),
        (settings.topic("token-events"), bad_events[1], "record key"),
        (settings.topic("token-owners"), bad_owners[0], "fingerprint"),
    ]
    expected += [
        (settings.topic("token-owners"), position, why)
        for position, why in zip(bad_owners[1:], BAD_RELEASE_REASONS, strict=True)
    ]
    assert len(letters) == len(expected)
    for topic, (partition, offset), why in expected:
        letter = found[(topic, partition, offset)]
        assert why in letter["error"], (why, letter["error"])
        assert letter["stage"] == "registry"
        assert fcm(1) not in letter["error"]
    assert found[(expected[0][0], *expected[0][1])]["value"] == "{not json"
    assert found[(expected[1][0], *expected[1][1])]["value_encoding"] == "base64"


async def test_thousand_events_a_third_malformed(
    harness: Harness, worker_env: Env
) -> None:
    """Bad events among good ones would lose good registrations or crash the worker."""
    settings = harness.settings
    good: dict[str, str] = {}
    records: list[tuple[str | bytes | None, Any]] = []
    bad_positions: list[int] = []
    kinds = [(key, value) for _, key, value, _ in BAD_REGISTRATIONS]
    for i in range(1000):
        user = f"user-{i:04d}"
        if i % 3 == 2:
            bad_key, bad_value = kinds[i % len(kinds)]
            bad_positions.append(i)
            records.append((bad_key if bad_key != "alice" else user, bad_value))
            continue
        token = apns(i) if i % 2 else fcm(i)
        good[user] = token
        records.append((user, register(user, token, i, device="d")))

    with WorkerProcess(worker_env()) as worker:
        positions = await harness.kafka.produce(
            settings.topic("registrations"), records
        )
        await harness.settled()
        table = await read_table(settings, "devices")
        letters = await harness.dead_letters()
        assert worker.ready()[0] == 200
        assert worker.stop() == 0

    held = {
        user: [d["token"] for d in value["devices"]] for user, value in table.items()
    }
    assert held == {user: [token] for user, token in good.items()}
    assert len(good) == 667
    lettered = {(m.value["partition"], m.value["offset"]) for m in letters}
    assert lettered == {positions[i] for i in bad_positions}
    assert all(m.value["error"] for m in letters)


def one_device_each(users: list[str], first: int, when: float) -> list[dict[str, Any]]:
    """A registration of device "d" for each user, the i-th with ``apns(first + i)``."""
    return [register(u, apns(first + i), when, device="d") for i, u in enumerate(users)]


def numbered(users: list[str], first: int) -> dict[str, str]:
    """The token :func:`one_device_each` gives each user."""
    return {u: apns(first + i) for i, u in enumerate(users)}


def one_token_each(table: dict[str, Any]) -> dict[str, str]:
    """user -> token of the user's one device, from the devices table."""
    return {u: v["devices"][0]["token"] for u, v in table.items()}


async def test_killed_worker_restarts_with_the_same_table(
    harness: Harness, worker_env: Env
) -> None:
    """A crash would lose registrations, or forget tokens (no `replaced` later)."""
    settings = harness.settings
    users = [f"user-{i:03d}" for i in range(200)]
    with WorkerProcess(worker_env()) as worker:
        await harness.apply(*one_device_each(users, 0, 0))
        before = await read_table(settings, "devices")
        # New tokens, and a SIGKILL while the worker handles them.
        await harness.registrations(*one_device_each(users, 1000, 10))
        worker.kill()
        worker.start()
        await harness.settled()
        after = await read_table(settings, "devices")
        replaced = await harness.published("replaced")
        assert worker.stop() == 0

    assert one_token_each(before) == numbered(users, 0)
    assert one_token_each(after) == numbered(users, 1000)
    # Every user's old token was reported replaced: the table held it.
    assert {(m.key, m.value["token"]) for m in replaced} == set(
        numbered(users, 0).items()
    )


async def test_lost_data_dir_is_rebuilt_from_the_changelog(
    harness: Harness, worker_env: Env
) -> None:
    """A rescheduled worker (empty disk) would forget every device."""
    settings = harness.settings
    users = [f"user-{i:03d}" for i in range(100)]
    with WorkerProcess(worker_env()) as worker:
        await harness.apply(*one_device_each(users, 0, 0))
        assert worker.stop() == 0

        shutil.rmtree(settings.data_dir)
        worker.start()
        await harness.apply(*one_device_each(users, 1000, 10))
        replaced = await harness.published("replaced")
        after = await read_table(settings, "devices")
        assert worker.stop() == 0

    assert settings.data_dir.is_dir()
    assert {(m.key, m.value["token"]) for m in replaced} == set(
        numbered(users, 0).items()
    )
    assert one_token_each(after) == numbered(users, 1000)


async def poll(read: Callable[[], Any], wanted: Any, within: float = 60.0) -> Any:
    """Call ``read`` until it returns ``wanted``; the last value after ``within``."""
    deadline = time.monotonic() + within
    got = await read()
    while got != wanted and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        got = await read()
    return got


async def run_cli(env: dict[str, str], *args: str) -> str:
    """Run ``pushstream ARGS``; its standard output (the test fails if it fails)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pushstream",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


async def test_a_forged_sweep_retires_no_live_device(
    harness: Harness, worker_env: Env
) -> None:
    """Anyone who can write to registrations could retire a user's live devices."""
    far = ms(10 * 365 * 24 * 3600)
    forged = {"type": "sweep", "user_id": "alice", "cutoff_ms": far, "at_ms": far}
    with WorkerProcess(worker_env()):
        await harness.apply(register("alice", apns(1), 0, device="phone"))
        await harness.apply(forged)
        tokens = await harness.tokens("alice")
        retired = await harness.published("retired", "reregister_requested")
    assert tokens == {"phone": apns(1)}
    assert retired == []
