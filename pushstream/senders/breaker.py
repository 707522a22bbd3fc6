"""A circuit breaker per platform: stop calling a provider that does not answer.

The breaker counts consecutive outage results: no answer at all (timeout,
lost connection) or a 5xx status. After ``failures`` of them in a row it
opens: the runner makes no request to that provider for ``open_s`` seconds.
Then it is half-open: one request, the probe, may go. An answer closes the
breaker; another outage result opens it again for twice as long, up to
``max_open_s``. Any answer that is not an outage (delivered, a rejected
token, even 429) proves the provider is alive and closes it.

While the breaker is open, the runner holds the batch it is working on
instead of moving the sends to the retries topic. Holding is what keeps both
promises at once:

- The request rate to a dead provider stays bounded: one probe per open
  interval, whatever the backlog. The held batch also stops the agent from
  taking more sends of that platform, so Faust pauses only that platform's
  partitions; the other platforms' agents keep flowing.
- Nothing is lost: the held sends are not acknowledged, so their offsets are
  not committed, and a worker that dies while holding them hands them to the
  next one. Moving them to retries instead would copy the whole backlog
  through Kafka twice per open interval and spend one of each send's
  attempts on every copy, turning a long outage into ``retries_exhausted``
  failures for sends that were never tried.

The sends held while it is open are not charged an attempt: the provider
is failing, not the send. The probe is, because it may be the send that is
failing (a request that makes the provider close the connection looks
like an outage): a failed probe is settled like any answer, so it moves to
the retries topic (or fails with ``retries_exhausted``) and the next probe
is another send. See :mod:`pushstream.senders.runner`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pushstream import metrics
from pushstream.senders.result import SendResult

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]

# Statuses that mean the provider, not the request, is failing.
OUTAGE_STATUS_MIN = 500
# Reasons without an answer that are no outage: the provider closed the
# connection because a request on it broke HTTP/2 (a GOAWAY with
# PROTOCOL_ERROR), which says it is alive and that a request is at fault.
NOT_OUTAGE_REASONS = frozenset({"protocol_error"})


def is_outage(result: SendResult) -> bool:
    """True when a result says the provider is down rather than answering.

    No answer (a ``retry`` without a status: timeout, lost connection) and any
    5xx status count; every other answer, 429 included, shows it is alive,
    and so does a connection closed for a protocol error (``protocol_error``).
    """
    if result.status is None:
        return result.outcome == "retry" and result.reason not in NOT_OUTAGE_REASONS
    return result.status >= OUTAGE_STATUS_MIN


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """The breaker's state for metrics and health checks."""

    state: BreakerState
    consecutive_failures: int
    open_for_s: float
    trips: int


class CircuitBreaker:
    """Counts outage results of one provider and says when a request may go.

    ``allow()`` is asked before every request and ``record()`` told every
    result; both are plain calls on the event loop, without locks.
    ``clock`` is a monotonic clock in seconds (tests pass their own).
    """

    def __init__(
        self,
        name: str,
        *,
        failures: int,
        open_s: float,
        max_open_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failures < 1 or open_s <= 0 or max_open_s < open_s:
            raise ValueError("need failures >= 1 and 0 < open_s <= max_open_s")
        self.name = name
        self._failures = failures
        self._open_s = open_s
        self._max_open_s = max_open_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._open_for = 0.0
        self._probe_out = False
        self._trips = 0
        metrics.breaker_state(name, "closed")

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` (no request may go), or ``half_open``."""
        if self._opened_at is None:
            return "closed"
        if self._probe_out or self._clock() >= self._opened_at + self._open_for:
            return "half_open"
        return "open"

    def snapshot(self) -> BreakerSnapshot:
        """The current state, failure count, open interval and number of trips."""
        return BreakerSnapshot(
            state=self.state,
            consecutive_failures=self._consecutive,
            open_for_s=self._open_for if self._opened_at is not None else 0.0,
            trips=self._trips,
        )

    def seconds_until_probe(self) -> float:
        """How long until a request may go again: 0 when one may go now.

        While a probe is out there is no fixed time: the answer decides, and
        this returns the whole current open interval as an upper bound.
        """
        if self._opened_at is None:
            return 0.0
        if self._probe_out:
            return self._open_for
        return max(0.0, self._opened_at + self._open_for - self._clock())

    def allow(self) -> bool:
        """May a request go now? In half-open state only one (the probe) may."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probe_out:
            return False

        self._probe_out = True
        metrics.breaker_state(self.name, "half_open")
        log.info("%s breaker half-open: sending one probe request", self.name)
        return True

    def record(self, result: SendResult) -> None:
        """Count one result of a request that ``allow()`` let go."""
        if not is_outage(result):
            self._close()
            return

        self._consecutive += 1
        if self._probe_out:
            self._open(min(self._open_for * 2, self._max_open_s), result)
        elif self._opened_at is None and self._consecutive >= self._failures:
            self._open(self._open_s, result)

    def cancel_probe(self) -> None:
        """The probe was let go but never made (shutdown): allow another one."""
        self._probe_out = False
        metrics.breaker_state(self.name, self.state)

    def _open(self, seconds: float, result: SendResult) -> None:
        reopening = self._opened_at is not None
        self._opened_at = self._clock()
        self._open_for = seconds
        self._probe_out = False
        self._trips += 1
        metrics.breaker_state(self.name, "open", opened=not reopening)
        # WARNING once per outage; each failed probe after that is INFO.
        log.log(
            logging.INFO if reopening else logging.WARNING,
            "%s breaker open for %.1fs after %d outage results in a row "
            "(last: %s, status %s)",
            self.name,
            seconds,
            self._consecutive,
            result.reason,
            result.status,
        )

    def _close(self) -> None:
        self._consecutive = 0
        if self._opened_at is None:
            return
        self._opened_at = None
        self._open_for = 0.0
        self._probe_out = False
        metrics.breaker_state(self.name, "closed")
        log.info("%s breaker closed: the provider answers again", self.name)
