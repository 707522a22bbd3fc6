"""Values shared by the three senders: what to render for, what was rendered,
and what a provider answered.

A provider's answer is a :class:`SendResult`, never an exception: exceptions
are kept for "no answer" inside the transport, and the client turns those into
a ``retry`` result before they reach the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pushstream.events import Environment, Platform

ResultOutcome = Literal["delivered", "invalid_token", "retry", "failed", "dropped"]


@dataclass(frozen=True, slots=True)
class Target:
    """The device one send goes to."""

    platform: Platform
    token: str
    app: str
    device_id: str
    environment: Environment = "production"


@dataclass(frozen=True, slots=True)
class Rendered:
    """A provider request body and headers, built without I/O.

    ``too_large`` names the limit when the body exceeds the provider's payload
    limit, ``invalid_header`` the rule a header from the notification breaks:
    the router then rejects the send instead of making it.
    """

    headers: dict[str, str]
    body: str
    too_large: str | None = None
    invalid_header: str | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    """What a provider answered to one send.

    ``retry_after`` is in seconds (the provider's Retry-After, when it gave
    one); ``invalidated_at_ms`` is the provider's own time of a token's
    invalidation (APNs' 410 timestamp), in milliseconds since the epoch.
    """

    outcome: ResultOutcome
    reason: str
    status: int | None = None
    provider_id: str | None = None
    retry_after: float | None = None
    invalidated_at_ms: int | None = None
