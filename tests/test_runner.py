"""The sender agents end to end: a real worker, the real broker, the sandbox.

Sends are published straight to the send topics, rendered by the providers'
own render functions as the router would; outcomes are read back from the
deliveries, retries, token-events and dead-letters topics, and compared with
what the sandbox saw.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Kafka, module_topics
from sandboxproc import SandboxProcess
from workerproc import Message, WorkerProcess, read_all, wait_for

from pushstream import localstack
from pushstream.config import Settings
from pushstream.events import Notification, Platform, Send
from pushstream.senders import apns, fcm, wns
from pushstream.senders.result import Target

pytestmark = pytest.mark.kafka

RENDER = {"apns": apns.render, "fcm": fcm.render, "wns": wns.render}
APPS: dict[Platform, str] = {
    "apns": "com.example.sandbox",
    "fcm": "sandbox-project",
    "wns": "Contoso.Sandbox",
}
WAIT_S = 90.0

# Small numbers, so that retries, breakers and shutdowns happen quickly.
WORKER_SETTINGS = {
    "PUSHSTREAM_SEND_BATCH_SIZE": "10",
    "PUSHSTREAM_MAX_IN_FLIGHT": "5",
    "PUSHSTREAM_RETRY_BASE_S": "0.05",
    "PUSHSTREAM_RETRY_MAX_S": "0.2",
    "PUSHSTREAM_RETRY_MAX_ATTEMPTS": "3",
    "PUSHSTREAM_BREAKER_FAILURES": "3",
    "PUSHSTREAM_BREAKER_OPEN_S": "0.5",
    "PUSHSTREAM_BREAKER_MAX_OPEN_S": "1",
    "PUSHSTREAM_REQUEST_TIMEOUT_S": "3",
    "PUSHSTREAM_SHUTDOWN_TIMEOUT_S": "10",
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def apns_token(scenario: str = "") -> str:
    """A fresh 64-hex-digit token, starting with a sandbox scenario word."""
    return (scenario.ljust(8, "0") if scenario else "") + uuid.uuid4().hex * 2


def fcm_token(scenario: str = "ok") -> str:
    return f"{scenario}-{uuid.uuid4().hex}"


def make_send(
    platform: Platform, token: str, *, user_id: str | None = "u-1", **fields: Any
) -> Send:
    """A send as the router would publish it, for a new notification."""
    notification_id = f"n-{uuid.uuid4().hex[:12]}"
    device_id = f"d-{uuid.uuid4().hex[:8]}"
    app = APPS[platform]
    n = Notification(id=notification_id, title="Hello", body="from the tests")
    target = Target(platform=platform, token=token, app=app, device_id=device_id)
    rendered = RENDER[platform](n, target, now_ms(), fields.get("expires_at_ms"))
    return Send(
        send_id=f"{notification_id}:{device_id}",
        notification_id=notification_id,
        user_id=user_id,
        device_id=device_id,
        platform=platform,
        app=app,
        token=token,
        accepted_at_ms=now_ms(),
        headers=rendered.headers,
        body=rendered.body,
        **fields,
    )


async def publish(kafka: Kafka, settings: Settings, *sends: Send) -> None:
    for send in sends:
        topic = settings.topic(f"sends.{send.platform}")
        await kafka.produce(topic, [(send.send_id, send)])


def outcomes(records: list[Message], sends: list[Send]) -> dict[str, list[Any]]:
    """Each send's deliveries, by send id."""
    wanted: dict[str, list[Any]] = {send.send_id: [] for send in sends}
    for record in records:
        if record.value.get("send_id") in wanted:
            wanted[record.value["send_id"]].append(record.value)
    return wanted


async def deliveries_of(
    settings: Settings, *sends: Send, exactly_once: bool = True
) -> dict[str, Any]:
    """Wait for a delivery of every send; return them by send id.

    ``exactly_once`` also checks that no send has two.
    """
    wanted = list(sends)

    def done(records: list[Message]) -> bool:
        return all(outcomes(records, wanted).values())

    records = await wait_for(settings, "deliveries", done)
    found = outcomes(records, wanted)
    if exactly_once:
        assert all(len(d) == 1 for d in found.values()), found
    return {send_id: d[0] for send_id, d in found.items()}


# --- one sandbox and one worker for the module ---------------------------------------


@pytest.fixture(scope="module")
def shared(
    kafka: Kafka, sandbox: SandboxProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Settings, WorkerProcess]]:
    """A worker on its own topics, pointed at the sandbox."""
    folder = tmp_path_factory.mktemp("worker")
    with module_topics(kafka, folder, "runner", partitions=2, send_partitions=2) as s:
        env = worker_environment(s, sandbox)
        with WorkerProcess(env, log_path=folder / "worker.log") as worker:
            yield s, worker


def worker_environment(
    settings: Settings, sandbox: SandboxProcess, **extra: str
) -> dict[str, str]:
    """A worker's environment: these settings, the sandbox, small limits."""
    return localstack.worker_env(settings, sandbox.env, **(WORKER_SETTINGS | extra))


@pytest.fixture
def pipeline(
    shared: tuple[Settings, WorkerProcess], sandbox: SandboxProcess
) -> Settings:
    """The shared worker's settings, with the sandbox reset for this test."""
    sandbox.reset()
    settings, worker = shared
    assert worker.running, worker.log_tail()
    return settings


# --- outcomes -------------------------------------------------------------------------


async def test_delivered_on_every_platform(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A push would not reach a device, or analytics would not hear of it."""
    sends = [
        make_send("apns", apns_token()),
        make_send("fcm", fcm_token()),
        make_send("wns", sandbox.wns_channel("Contoso.Sandbox")),
    ]
    await publish(kafka, pipeline, *sends)

    found = await deliveries_of(pipeline, *sends)

    for send in sends:
        delivery = found[send.send_id]
        assert (delivery["outcome"], delivery["status"], delivery["attempts"]) == (
            "delivered",
            200,
            1,
        )
        assert delivery["provider_message_id"]
        assert delivery["latency_ms"] >= 0
        accepted = sandbox.accepted(send.platform)
        assert [a["token"] for a in accepted] == [send.token]
        assert accepted[0]["provider_id"] == delivery["provider_message_id"]


async def test_retry_then_delivered(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A throttled push would be lost instead of sent again later."""
    sandbox.scenario(platform="fcm", settings={"quota_failures": 2})
    send = make_send("fcm", fcm_token("quota"))
    await publish(kafka, pipeline, send)

    found = await deliveries_of(pipeline, send)

    delivery = found[send.send_id]
    assert (delivery["outcome"], delivery["attempts"]) == ("delivered", 3)
    retries = [
        r.value
        for r in await read_all(pipeline, pipeline.topic("retries"))
        if r.key == send.send_id
    ]
    assert [(r["send"]["attempt"], r["status"]) for r in retries] == [
        (1, 429),
        (2, 429),
    ]
    assert sandbox.stats()["fcm"]["statuses"] == {"429": 2, "200": 1}


async def test_retries_exhausted_fail_and_dead_letter(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A push that never gets through would be retried forever or vanish."""
    send = make_send("apns", apns_token("f100d"))
    await publish(kafka, pipeline, send)

    found = await deliveries_of(pipeline, send)

    delivery = found[send.send_id]
    assert (delivery["outcome"], delivery["reason"], delivery["attempts"]) == (
        "failed",
        "retries_exhausted",
        3,
    )
    assert sandbox.stats()["apns"]["statuses"] == {"429": 3}
    letters = await wait_for(
        pipeline, "dead-letters", lambda rs: any(r.key == send.send_id for r in rs)
    )
    letter = next(r.value for r in letters if r.key == send.send_id)
    assert letter["source_topic"] == pipeline.topic("sends.apns")
    assert "retries_exhausted" in letter["error"]
    assert Send.model_validate_json(letter["value"]).send_id == send.send_id


async def test_invalid_token_publishes_a_token_event(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A dead token would stay in the registry and be pushed to forever."""
    send = make_send("apns", apns_token("dead"), user_id="u-dead")
    await publish(kafka, pipeline, send)

    found = await deliveries_of(pipeline, send)

    delivery = found[send.send_id]
    assert (delivery["outcome"], delivery["reason"], delivery["status"]) == (
        "invalid_token",
        "Unregistered",
        410,
    )
    events = await wait_for(
        pipeline,
        "token-events",
        lambda rs: any(r.value.get("token") == send.token for r in rs),
    )
    event = next(r for r in events if r.value.get("token") == send.token)
    assert event.key == "u-dead"
    assert (event.value["type"], event.value["device_id"]) == (
        "invalidated",
        send.device_id,
    )
    assert event.value["provider_time_ms"] > 0


async def test_expired_send_makes_no_request(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A notification past its time to live would still buzz the phone."""
    send = make_send("fcm", fcm_token(), expires_at_ms=now_ms() - 1000)
    await publish(kafka, pipeline, send)

    found = await deliveries_of(pipeline, send)

    assert (found[send.send_id]["outcome"], found[send.send_id]["attempts"]) == (
        "expired",
        0,
    )
    assert sandbox.stats()["fcm"]["requests"] == 0


async def test_bad_send_goes_to_dead_letters_and_the_stream_goes_on(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """One malformed message would stop every push of its platform."""
    key = f"bad-{uuid.uuid4().hex[:8]}"
    await kafka.produce(pipeline.topic("sends.wns"), [(key, b"{not json")])
    send = make_send("wns", sandbox.wns_channel("Contoso.Sandbox"))
    await publish(kafka, pipeline, send)

    found = await deliveries_of(pipeline, send)

    assert found[send.send_id]["outcome"] == "delivered"
    letters = await wait_for(
        pipeline, "dead-letters", lambda rs: any(r.key == key for r in rs)
    )
    letter = next(r.value for r in letters if r.key == key)
    assert letter["stage"] == "sender.wns"
    assert letter["error"].startswith("invalid send:")


async def test_outage_pauses_one_platform_only_and_recovers(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A dead provider would be flooded, stall the others, or lose the backlog."""
    sandbox.outage("apns", on=True, mode="503")
    started = time.monotonic()
    backlog = [make_send("apns", apns_token()) for _ in range(40)]
    await publish(kafka, pipeline, *backlog)
    await wait_for_requests(sandbox, "apns", 3)
    others = [make_send("fcm", fcm_token()) for _ in range(5)]
    await publish(kafka, pipeline, *others)

    flowing = await deliveries_of(pipeline, *others)
    during = sandbox.stats()["apns"]["requests"]
    elapsed = time.monotonic() - started
    sandbox.outage("apns", on=False)

    assert all(d["outcome"] == "delivered" for d in flowing.values())
    # The burst in flight when the breaker opened, plus one probe per interval.
    limit = 5 + 3 + elapsed / 0.5 + 2
    assert during <= limit < len(backlog) * 3
    found = await deliveries_of(pipeline, *backlog)
    assert {d["outcome"] for d in found.values()} == {"delivered"}
    assert len(sandbox.accepted("apns")) == len(backlog)


async def test_send_with_an_illegal_header_fails_alone(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """One injected header would close APNs' connection and stall every push."""
    poison = make_send("apns", apns_token())
    poison = poison.model_copy(
        update={"headers": {**poison.headers, "x\r\ninjected": "1"}}
    )
    others = [make_send("apns", apns_token()) for _ in range(8)]
    await publish(kafka, pipeline, poison, *others)

    found = await deliveries_of(pipeline, poison, *others)

    failed = found[poison.send_id]
    assert (failed["outcome"], failed["reason"], failed.get("status")) == (
        "failed",
        "invalid_header",
        None,
    )
    assert {found[s.send_id]["outcome"] for s in others} == {"delivered"}
    assert {a["token"] for a in sandbox.accepted("apns")} == {s.token for s in others}


async def test_sends_that_always_meet_an_outage_cannot_block_their_platform(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """A send that fails every time would hold the breaker's probe and APNs forever."""
    failing = [make_send("apns", apns_token("0ff11e")) for _ in range(3)]
    await publish(kafka, pipeline, *failing)
    await wait_for_requests(sandbox, "apns", 3)
    later = [make_send("apns", apns_token()) for _ in range(5)]
    await publish(kafka, pipeline, *later)

    found = await deliveries_of(pipeline, *failing, *later)

    assert {found[s.send_id]["outcome"] for s in later} == {"delivered"}
    for send in failing:
        delivery = found[send.send_id]
        assert (delivery["outcome"], delivery["reason"], delivery["attempts"]) == (
            "failed",
            "retries_exhausted",
            3,
        )
    letters = await wait_for(
        pipeline,
        "dead-letters",
        lambda rs: {s.send_id for s in failing} <= {r.key for r in rs},
    )
    assert all(
        "ServiceUnavailable" in r.value["error"]
        for r in letters
        if r.key in {s.send_id for s in failing}
    )


async def test_a_slow_request_delays_only_its_own_outcome_and_bounds_reading(
    kafka: Kafka, pipeline: Settings, sandbox: SandboxProcess
) -> None:
    """One slow answer would hold back every push taken with it, or memory grow."""
    sandbox.scenario(platform="fcm", settings={"slow_s": 2.5})
    slow = make_send("fcm", fcm_token("slow"))
    others = [make_send("fcm", fcm_token()) for _ in range(30)]
    # One partition: the sends behind the slow one cannot be acknowledged
    # before it, so they count against the bound until it is answered.
    for send in (slow, *others):
        topic = pipeline.topic("sends.fcm")
        await kafka.produce(topic, [(send.send_id, send)], partition=0)

    early = await wait_for(
        pipeline, "deliveries", lambda rs: len(outcomes_found(rs, others)) >= 5
    )
    assert not outcomes_found(early, [slow])

    found = await deliveries_of(pipeline, slow, *others)
    assert {d["outcome"] for d in found.values()} == {"delivered"}
    answered = found[slow.send_id]["completed_at_ms"]
    before = [s for s in others if found[s.send_id]["completed_at_ms"] < answered]
    unacked_limit = 5 + 10  # PUSHSTREAM_MAX_IN_FLIGHT + PUSHSTREAM_SEND_BATCH_SIZE
    assert 5 <= len(before) <= unacked_limit - 1


def outcomes_found(records: list[Message], sends: list[Send]) -> list[str]:
    """The ids of the sends that have a delivery among ``records``."""
    return [send_id for send_id, found in outcomes(records, sends).items() if found]


async def wait_for_requests(sandbox: SandboxProcess, platform: str, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while sandbox.stats()[platform]["requests"] < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{platform}: fewer than {count} requests within {WAIT_S}s")
        await asyncio.sleep(0.2)


# --- shutdown ------------------------------------------------------------------------


def apns_hangs_and_fcm_throttles(
    sandbox: SandboxProcess, count: int
) -> tuple[list[Send], Send]:
    """Reset the sandbox, then APNs answers nothing and FCM throttles once, for 5 s.

    Returns ``count`` APNs sends and one FCM send to meet them.
    """
    sandbox.reset()
    sandbox.outage("apns", on=True, mode="no-answer")
    sandbox.scenario(platform="fcm", settings={"quota_failures": 1, "retry_after_s": 5})
    held = [make_send("apns", apns_token()) for _ in range(count)]
    return held, make_send("fcm", fcm_token("quota"))


async def publish_until_held(
    kafka: Kafka,
    settings: Settings,
    sandbox: SandboxProcess,
    held: list[Send],
    retried: Send,
) -> None:
    """Publish the sends; return once an APNs request hangs and the FCM send
    waits on the retries topic.

    A new APNs connection allows one stream until a push succeeds, and that
    one hangs: one request is in flight, the rest wait for it.
    """
    await publish(kafka, settings, *held, retried)
    await wait_for_requests(sandbox, "apns", 1)
    await wait_for(
        settings, "retries", lambda rs: any(r.key == retried.send_id for r in rs)
    )


async def test_sigterm_hands_back_held_work_and_loses_nothing(
    kafka: Kafka,
    settings: Settings,
    sandbox: SandboxProcess,
    tmp_path: Path,
) -> None:
    """Stopping a worker mid-outage would fail, hang, or drop queued pushes."""
    await kafka.create_topics(settings)
    env = worker_environment(
        settings,
        sandbox,
        PUSHSTREAM_REQUEST_TIMEOUT_S="60",
        PUSHSTREAM_SHUTDOWN_TIMEOUT_S="4",
    )
    held, retried = apns_hangs_and_fcm_throttles(sandbox, 12)

    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        await publish_until_held(kafka, settings, sandbox, held, retried)

        assert worker.stop() == 0
        sandbox.outage("apns", on=False)
        assert "put back" in worker.log()
        # The hanging request (and those queued behind it for the one stream)
        # outlived the grace, half the shutdown timeout, and were put back.
        abandoned = re.findall(
            r"\((\d+) abandoned in flight after 2\.0s\)", worker.log()
        )
        assert sum(map(int, abandoned)) >= 1

        worker.start()
        found = await deliveries_of(settings, *held, retried)

    assert {d["outcome"] for d in found.values()} == {"delivered"}
    assert {a["token"] for a in sandbox.accepted("apns")} == {s.token for s in held}


async def test_killed_worker_loses_nothing(
    kafka: Kafka,
    settings: Settings,
    sandbox: SandboxProcess,
    tmp_path: Path,
) -> None:
    """A worker killed mid-batch would lose the pushes and retries it held."""
    await kafka.create_topics(settings)
    env = worker_environment(settings, sandbox, PUSHSTREAM_REQUEST_TIMEOUT_S="60")
    held, retried = apns_hangs_and_fcm_throttles(sandbox, 6)

    with WorkerProcess(env, log_path=tmp_path / "worker.log") as worker:
        await publish_until_held(kafka, settings, sandbox, held, retried)

        worker.kill()
        sandbox.outage("apns", on=False)
        worker.start()
        found = await deliveries_of(settings, *held, retried, exactly_once=False)

    assert {d["outcome"] for d in found.values()} == {"delivered"}
    assert {a["token"] for a in sandbox.accepted("apns")} == {s.token for s in held}
