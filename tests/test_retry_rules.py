"""Retry timing and the outcome of each provider answer (pure rules, no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushstream import retry
from pushstream.config import Settings
from pushstream.events import Send
from pushstream.senders import runner
from pushstream.senders.result import SendResult

NOW = 1_700_000_000_000
SETTINGS = Settings(retry_max_attempts=4, retry_base_s=1.0, retry_max_s=60.0)

attempts = st.integers(min_value=1, max_value=10_000)
jitters = st.floats(min_value=0.0, max_value=1.0)
bases = st.floats(min_value=0.001, max_value=100.0)
caps = st.floats(min_value=0.001, max_value=86_400.0)


def make_send(**fields: object) -> Send:
    values: dict[str, object] = {
        "send_id": "n-1:d-1",
        "notification_id": "n-1",
        "user_id": "u-1",
        "device_id": "d-1",
        "platform": "fcm",
        "app": "demo-project",
        "token": "fcm-token-0123456789abcdef",
        "attempt": 1,
        "accepted_at_ms": NOW - 250,
        "body": "{}",
    }
    values.update(fields)
    return Send.model_validate(values)


def settle(send: Send, result: SendResult, jitter: float = 0.5) -> runner.Settled:
    return runner.settle(
        send, result, settings=SETTINGS, sent_at_ms=NOW - 40, now_ms=NOW, jitter=jitter
    )


# --- backoff ------------------------------------------------------------------------


@given(attempt=attempts, base=bases, cap=caps, jitter=jitters)
def test_backoff_stays_within_the_jittered_ceiling(
    attempt: int, base: float, cap: float, jitter: float
) -> None:
    """A retry could wait longer than retry_max_s, or a negative time."""
    delay = retry.backoff_s(attempt, base_s=base, max_s=cap, jitter=jitter)

    assert 0.0 <= delay <= cap
    assert delay <= base * 2.0 ** min(attempt - 1, 64) + 1e-9


@given(attempt=st.integers(1, 200), base=bases, cap=caps)
def test_backoff_ceiling_grows_until_the_cap(
    attempt: int, base: float, cap: float
) -> None:
    """Later attempts would come back sooner than earlier ones."""
    this = retry.backoff_s(attempt, base_s=base, max_s=cap, jitter=1.0)
    following = retry.backoff_s(attempt + 1, base_s=base, max_s=cap, jitter=1.0)

    assert this <= following <= cap


def test_backoff_doubles_from_the_base() -> None:
    """The schedule would not match the documented 1 s, 2 s, 4 s, ... up to the cap."""
    ceilings = [
        retry.backoff_s(n, base_s=1.0, max_s=10.0, jitter=1.0) for n in range(1, 7)
    ]

    assert ceilings == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@given(jitter=st.floats(allow_nan=False, allow_infinity=False))
def test_out_of_range_jitter_is_clamped(jitter: float) -> None:
    """A bad random source could schedule retries in the past or after the cap."""
    delay = retry.backoff_s(3, base_s=1.0, max_s=10.0, jitter=jitter)

    assert 0.0 <= delay <= 4.0


@given(retry_after=st.floats(0.0, retry.MAX_RETRY_AFTER_S), attempt=attempts)
def test_retry_after_is_honoured_over_backoff(retry_after: float, attempt: int) -> None:
    """A provider's Retry-After would be ignored and the sender throttled harder."""
    delay = retry.retry_delay_s(retry_after, attempt, base_s=1.0, max_s=5.0, jitter=0.0)

    assert delay == retry_after


@pytest.mark.parametrize(
    ("given_s", "expected_s"),
    [(-3.0, 0.0), (1e12, retry.MAX_RETRY_AFTER_S)],
)
def test_retry_after_is_bounded(given_s: float, expected_s: float) -> None:
    """A garbled Retry-After would schedule a retry in the past or years ahead."""
    delay = retry.retry_delay_s(given_s, 1, base_s=1.0, max_s=5.0, jitter=0.0)

    assert delay == expected_s


def test_due_time_in_milliseconds() -> None:
    """Retries would fall due at the wrong time."""
    assert retry.due_at_ms(NOW, 1.5) == NOW + 1500


# --- what each answer publishes ------------------------------------------------------


def test_delivered() -> None:
    """Analytics would miss a delivery, its provider id, or its latency."""
    send = make_send(attempt=2)

    settled = settle(send, SendResult("delivered", "ok", status=200, provider_id="p-9"))

    assert settled.retry is None
    assert settled.token_event is None
    assert settled.dead_letter is None
    delivery = settled.delivery
    assert delivery is not None
    assert (delivery.outcome, delivery.status, delivery.provider_message_id) == (
        "delivered",
        200,
        "p-9",
    )
    assert (delivery.attempts, delivery.sent_at_ms, delivery.completed_at_ms) == (
        2,
        NOW - 40,
        NOW,
    )
    assert delivery.latency_ms == 250
    assert (delivery.send_id, delivery.user_id, delivery.device_id) == (
        "n-1:d-1",
        "u-1",
        "d-1",
    )


def test_invalid_token_emits_a_token_event() -> None:
    """A dead token would stay active in the registry and keep being sent to."""
    send = make_send()
    answer = SendResult(
        "invalid_token", "UNREGISTERED", status=404, invalidated_at_ms=NOW - 5000
    )

    settled = settle(send, answer)

    assert settled.delivery is not None
    assert settled.delivery.outcome == "invalid_token"
    event = settled.token_event
    assert event is not None
    assert (event.type, event.user_id, event.token, event.platform, event.app) == (
        "invalidated",
        "u-1",
        send.token,
        "fcm",
        "demo-project",
    )
    assert (event.reason, event.provider_time_ms) == ("UNREGISTERED", NOW - 5000)
    assert runner.token_event_key(event) == "u-1"


def test_token_event_of_a_raw_token_send_is_keyed_by_its_hash() -> None:
    """A raw-token send's dead token would be published without a key."""
    send = make_send(user_id=None)

    settled = settle(send, SendResult("invalid_token", "Unregistered", status=410))

    assert settled.token_event is not None
    key = runner.token_event_key(settled.token_event)
    assert len(key) == 32
    assert send.token not in key


@pytest.mark.parametrize("outcome", ["failed", "dropped"])
def test_final_answers_are_deliveries(outcome: str) -> None:
    """A permanent failure would be retried, or would vanish without an outcome."""
    answer = SendResult(outcome, "BadTopic", status=400)  # type: ignore[arg-type]

    settled = settle(make_send(), answer)

    assert settled.delivery is not None
    assert settled.retry is None
    assert (settled.delivery.outcome, settled.delivery.reason) == (outcome, "BadTopic")


def test_retry_uses_backoff() -> None:
    """A 'try later' answer would be retried at once or never."""
    send = make_send(attempt=3)

    settled = settle(send, SendResult("retry", "UNAVAILABLE", status=503), jitter=1.0)

    assert settled.delivery is None
    request = settled.retry
    assert request is not None
    assert request.send == send
    assert request.due_at_ms == NOW + 4000
    assert (request.reason, request.status) == ("UNAVAILABLE", 503)


def test_retry_honours_retry_after() -> None:
    """A throttled sender would come back before the provider allows it."""
    answer = SendResult("retry", "QUOTA_EXCEEDED", status=429, retry_after=90.0)

    settled = settle(make_send(), answer, jitter=0.0)

    assert settled.retry is not None
    assert settled.retry.due_at_ms == NOW + 90_000


def test_retries_exhausted_fail_and_dead_letter() -> None:
    """A send that never gets through would be retried forever or lost silently."""
    send = make_send(attempt=SETTINGS.retry_max_attempts)

    settled = settle(send, SendResult("retry", "timeout"))

    assert settled.retry is None
    assert settled.delivery is not None
    assert (settled.delivery.outcome, settled.delivery.reason) == (
        "failed",
        "retries_exhausted",
    )
    assert settled.delivery.attempts == SETTINGS.retry_max_attempts
    assert settled.dead_letter is not None
    assert "timeout" in settled.dead_letter
    assert send.token not in settled.dead_letter


def test_expired_send_makes_no_request() -> None:
    """A notification past its time to live would still reach the device."""
    send = make_send(attempt=2, expires_at_ms=NOW - 1)

    assert runner.is_expired(send, NOW)
    settled = runner.expired(send, NOW)

    assert settled.delivery is not None
    assert (settled.delivery.outcome, settled.delivery.attempts) == ("expired", 1)
    assert settled.delivery.sent_at_ms is None


@pytest.mark.parametrize("expires_at_ms", [None, NOW, NOW + 1])
def test_live_sends_are_not_expired(expires_at_ms: int | None) -> None:
    """Sends with time left would be dropped as expired."""
    assert not runner.is_expired(make_send(expires_at_ms=expires_at_ms), NOW)


def test_decode_send_checks_the_platform() -> None:
    """An APNs send on the FCM topic would be sent with the wrong credentials."""
    value = make_send(platform="apns").model_dump_json().encode()

    with pytest.raises(ValueError, match="apns send on the fcm send topic"):
        runner.decode_send(value, "fcm")


async def test_not_configured_platform_fails_without_request() -> None:
    """Sends to an unconfigured platform would crash the worker instead of failing."""
    client = runner.make_client(Settings(wns=()), "wns")

    result = await client.send(make_send(platform="wns"))

    assert (result.outcome, result.reason) == ("failed", "not_configured")
