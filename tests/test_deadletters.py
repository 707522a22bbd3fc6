"""Dead letters: always small enough to keep, and never lost when Kafka refuses one.

The pure part (:mod:`pushstream.deadletter`) is checked on its own; the rest
runs a real worker against the real broker: oversized input of every kind
becomes a dead letter while the stream goes on, and a dead letter the broker
refuses stops the worker without committing past the refused record, which
a restarted worker then reads again.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from workerproc import WorkerProcess, read_all, read_table, wait_consumed

from pushstream import deadletter
from pushstream.config import Settings

Env = Callable[..., dict[str, str]]
KAFKA_RECORD_MAX = 1_000_000  # Faust's producer_max_request_size


def registration(user: str, n: int, **extra: Any) -> dict[str, Any]:
    value = {
        "type": "register",
        "user_id": user,
        "platform": "apns",
        "token": f"{n:064x}",
        "app": "com.example.app",
        "event_time": datetime.now(UTC).isoformat(),
    }
    value.update(extra)
    return value


def letter_size(key: bytes | None, value: bytes | None) -> int:
    record_key, letter = deadletter.build(
        stage="registry",
        error="x" * 1000,
        source_topic="t" * 249,
        key=key,
        value=value,
        partition=0,
        offset=2**62,
        at_ms=2**41,
    )
    body = letter.model_dump_json(exclude_none=True).encode()
    return len(body) + len(record_key or b"")


# --- the pure part ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"a" * 1_048_576,
        b'"' * 1_048_576,
        b"\x00" * 1_048_576,
        b"\xff" * 1_048_576,
        "é".encode() * 524_288,
        b"\\" * 1_048_576,
    ],
    ids=["letters", "quotes", "control", "binary", "two-byte", "backslashes"],
)
def test_any_input_up_to_the_broker_limit_fits_in_a_dead_letter(value: bytes) -> None:
    """Oversized input would make its dead letter too large to write: it is lost."""
    assert letter_size(value, value) < KAFKA_RECORD_MAX * 0.7


def test_a_long_value_is_cut_and_says_so() -> None:
    """An operator could not tell a cut value from the whole one, or its size."""
    value = json.dumps({"locale": "x" * 1_000_000}).encode()
    kept = deadletter.keep(value, deadletter.VALUE_KEPT, deadletter.VALUE_JSON_MAX)
    assert kept.truncated
    assert kept.size == len(value)
    assert kept.encoding == "utf-8"
    assert kept.text is not None
    assert len(kept.text.encode()) == deadletter.VALUE_KEPT
    assert value.startswith(kept.text.encode())


def test_a_short_value_is_kept_whole() -> None:
    """Small refused input would be cut, and the operator could not replay it."""
    value = b'{"type": "register", "oops"}'
    kept = deadletter.keep(value, deadletter.VALUE_KEPT, deadletter.VALUE_JSON_MAX)
    assert (kept.text, kept.truncated, kept.size) == (value.decode(), False, len(value))


def test_binary_is_cut_before_base64() -> None:
    """A cut binary value would not decode back to the start of the original."""
    value = bytes(range(256)) * 4096
    kept = deadletter.keep(value, deadletter.VALUE_KEPT, deadletter.VALUE_JSON_MAX)
    assert kept.encoding == "base64"
    assert kept.truncated
    assert kept.text is not None
    assert base64.b64decode(kept.text) == value[: deadletter.VALUE_KEPT]


@given(st.text(), st.integers(min_value=1, max_value=64))
def test_a_cut_never_splits_a_character(text: str, kept_bytes: int) -> None:
    """A cut inside a UTF-8 character would turn text into unreadable base64."""
    data = text.encode("utf-8")
    kept = deadletter.keep(data, kept_bytes, 6 * kept_bytes + 2)
    assert kept.text is not None
    assert kept.encoding == "utf-8"
    assert data.startswith(kept.text.encode())
    assert kept.truncated == (len(kept.text.encode()) < len(data))
    assert len(json.dumps(kept.text, ensure_ascii=False).encode()) <= 6 * kept_bytes + 2


# --- a real worker -----------------------------------------------------------------


async def test_oversized_input_is_dead_lettered_and_the_stream_goes_on(
    kafka: Any, settings: Settings, worker_env: Env
) -> None:
    """Huge bad input would crash an agent and be skipped: no dead letter, no trace."""
    await kafka.create_topics(settings)
    huge_locale = registration("alice", 1, locale="x" * 1_000_000)
    quotes = b'"' * 600_000
    binary = b"\xff\xfe" * 450_000
    registrations = settings.topic("registrations")
    with WorkerProcess(worker_env()) as worker:
        (where_locale,) = await kafka.produce(registrations, [("alice", huge_locale)])
        (where_binary,) = await kafka.produce(registrations, [("bob", binary)])
        await kafka.produce(settings.topic("notifications"), [("carol", quotes)])
        await kafka.produce(registrations, [("alice", registration("alice", 2))])
        await wait_consumed(
            settings, ("registrations", "token-owners", "notifications")
        )
        letters = await read_all(settings, settings.topic("dead-letters"))
        devices = await read_table(settings, "devices")
        assert worker.ready()[0] == 200
        log = worker.log()
        assert worker.stop() == 0

    by_place = {
        (m.value["source_topic"], m.value["partition"], m.value["offset"]): m.value
        for m in letters
    }
    assert len(letters) == 3, [m.value["error"] for m in letters]
    locale = by_place[(registrations, *where_locale)]
    assert locale["value_truncated"] is True
    assert locale["value_size"] == len(json.dumps(huge_locale))
    assert "locale" in locale["error"]
    assert json.dumps(huge_locale).startswith(locale["value"])
    binary_letter = by_place[(registrations, *where_binary)]
    assert binary_letter["value_encoding"] == "base64"
    assert binary_letter["value_truncated"] is True
    assert binary_letter["value_size"] == len(binary)
    (quoted,) = [m.value for m in letters if m.value["stage"] == "router"]
    assert quoted["value_size"] == len(quotes)
    assert quoted["value_truncated"]
    assert [d["token"] for d in devices["alice"]["devices"]] == [f"{2:064x}"]
    assert "Restarting dead" not in log
    assert "input_value" not in log


async def test_a_refused_dead_letter_stops_the_worker_and_is_not_lost(
    kafka: Any, settings: Settings, worker_env: Env
) -> None:
    """A dead letter Kafka refuses would be dropped and its input skipped for good."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    await kafka.create_topics(settings)
    dead_letters = settings.topic("dead-letters")

    async def set_max_message_bytes(limit: int) -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        await admin.start()
        try:
            resource = ConfigResource(
                ConfigResourceType.TOPIC,
                dead_letters,
                configs={"max.message.bytes": str(limit)},
            )
            await admin.alter_configs([resource])
        finally:
            await admin.close()

    token = f"{7:064x}"
    bad = registration("alice", 7, locale="l" * 300)  # over 256 characters
    await set_max_message_bytes(200)
    worker = WorkerProcess(worker_env())
    try:
        (where,) = await kafka.produce(
            settings.topic("registrations"), [("alice", bad)]
        )
        assert worker.process is not None
        status = worker.process.wait(timeout=60)
        log = worker.log()
    finally:
        worker.kill()

    assert status != 0
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert any(f"@{where[1]} was not written" in line for line in errors), errors
    assert token not in log
    assert token[:20] not in log
    assert "input_value" not in log
    assert await read_all(settings, dead_letters) == []

    await set_max_message_bytes(1_048_588)
    with WorkerProcess(worker_env()) as worker:
        await wait_consumed(settings)
        letters = await read_all(settings, dead_letters)
        assert worker.stop() == 0
    assert [(m.value["partition"], m.value["offset"]) for m in letters] == [where]
    assert "locale" in letters[0].value["error"]
