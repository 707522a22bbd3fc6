"""The circuit breaker's rules: when it opens, how long, and what it lets through."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushstream.senders.breaker import CircuitBreaker, is_outage
from pushstream.senders.result import SendResult

TIMEOUT = SendResult("retry", "timeout")
UNAVAILABLE = SendResult("retry", "ServiceUnavailable", status=503)
DELIVERED = SendResult("delivered", "ok", status=200)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: Clock, failures: int = 3) -> CircuitBreaker:
    return CircuitBreaker(
        "apns", failures=failures, open_s=5.0, max_open_s=20.0, clock=clock
    )


def trip(breaker: CircuitBreaker, failures: int = 3) -> None:
    for _ in range(failures):
        assert breaker.allow()
        breaker.record(UNAVAILABLE)


@pytest.mark.parametrize(
    ("result", "outage"),
    [
        (SendResult("retry", "timeout"), True),
        (SendResult("retry", "connection_lost"), True),
        (SendResult("retry", "InternalServerError", status=500), True),
        (SendResult("retry", "ServiceUnavailable", status=503), True),
        (SendResult("failed", "unknown", status=502), True),
        (SendResult("retry", "TooManyRequests", status=429, retry_after=30), False),
        (SendResult("delivered", "ok", status=200), False),
        (SendResult("invalid_token", "Unregistered", status=410), False),
        (SendResult("failed", "BadTopic", status=400), False),
        (SendResult("failed", "not_configured"), False),
        (SendResult("retry", "protocol_error"), False),
        (SendResult("failed", "protocol_error"), False),
        (SendResult("failed", "invalid_header"), False),
    ],
)
def test_outage_results(result: SendResult, outage: bool) -> None:
    """A throttled or rejected send would open the breaker and pause a live provider."""
    assert is_outage(result) is outage


def test_opens_after_consecutive_outages() -> None:
    """A dead provider would keep receiving the whole backlog of requests."""
    clock = Clock()
    breaker = make(clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(TIMEOUT)
    assert breaker.snapshot().state == "closed"

    breaker.record(UNAVAILABLE)

    assert breaker.state == "open"
    assert not breaker.allow()
    assert breaker.seconds_until_probe() == pytest.approx(5.0)


def test_an_answer_resets_the_count() -> None:
    """Occasional 503s among successes would pause a healthy provider."""
    clock = Clock()
    breaker = make(clock)
    for _ in range(5):
        breaker.record(UNAVAILABLE)
        breaker.record(UNAVAILABLE)
        breaker.record(DELIVERED)
    assert breaker.state == "closed"
    assert breaker.snapshot().consecutive_failures == 0


def test_half_open_lets_one_probe_through() -> None:
    """After the pause, the backlog would hit the provider before it is known alive."""
    clock = Clock()
    breaker = make(clock)
    trip(breaker)
    clock.now += 5.0

    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow()
    assert not breaker.allow()


def test_successful_probe_closes() -> None:
    """Sends would stay paused after the provider came back."""
    clock = Clock()
    breaker = make(clock)
    trip(breaker)
    clock.now += 5.0
    assert breaker.allow()

    breaker.record(SendResult("invalid_token", "BadDeviceToken", status=400))

    assert breaker.state == "closed"
    assert breaker.allow()
    assert breaker.allow()


def test_failed_probe_reopens_for_longer_up_to_the_cap() -> None:
    """A long outage would be probed every few seconds forever, or paused too long."""
    clock = Clock()
    breaker = make(clock)
    trip(breaker)
    intervals = []
    for _ in range(5):
        clock.now += breaker.seconds_until_probe()
        assert breaker.allow()
        breaker.record(TIMEOUT)
        intervals.append(breaker.seconds_until_probe())

    assert intervals == [10.0, 20.0, 20.0, 20.0, 20.0]
    assert breaker.snapshot().trips == 6


def test_cancelled_probe_allows_another() -> None:
    """A probe abandoned at shutdown would leave the breaker stuck half-open."""
    clock = Clock()
    breaker = make(clock)
    trip(breaker)
    clock.now += 5.0
    assert breaker.allow()

    breaker.cancel_probe()

    assert breaker.allow()


def test_snapshot_for_metrics() -> None:
    """Dashboards would not show which provider is cut off."""
    clock = Clock()
    breaker = make(clock)
    assert breaker.snapshot().state == "closed"
    trip(breaker)

    snapshot = breaker.snapshot()

    assert (snapshot.state, snapshot.open_for_s, snapshot.trips) == ("open", 5.0, 1)


def test_rejects_nonsense_settings() -> None:
    """A zero threshold would open the breaker before any request."""
    with pytest.raises(ValueError, match="failures"):
        CircuitBreaker("fcm", failures=0, open_s=1.0, max_open_s=2.0)


@given(
    failures=st.integers(1, 10),
    steps=st.lists(
        st.tuples(st.floats(0.0, 30.0), st.integers(1, 50)), min_size=1, max_size=60
    ),
)
def test_dead_provider_gets_one_request_per_open_interval(
    failures: int, steps: list[tuple[float, int]]
) -> None:
    """During an outage the request rate to the provider would grow with the backlog."""
    clock = Clock()
    breaker = CircuitBreaker(
        "wns", failures=failures, open_s=5.0, max_open_s=40.0, clock=clock
    )
    start = clock.now
    allowed_after_trip = []
    for advance, wanted in steps:
        clock.now += advance
        granted = 0
        for _ in range(wanted):
            tripped = breaker.snapshot().trips > 0
            if breaker.allow():
                granted += 1
                if tripped:
                    allowed_after_trip.append(clock.now)
        for _ in range(granted):
            breaker.record(TIMEOUT)

    gaps = [b - a for a, b in itertools.pairwise(allowed_after_trip)]
    assert all(gap >= 5.0 for gap in gaps)
    assert len(allowed_after_trip) <= (clock.now - start) / 5.0 + 1
