"""The HTTP/2 transport's exceptions: what "no answer" can mean.

A response, whatever its status, is an
:class:`~pushstream.senders.h2message.H2Response`. Only "no answer" raises,
always a subclass of :class:`TransportError`; the transport translates the
``ssl``, ``OSError`` and ``h2`` exceptions underneath into these and keeps
them as ``__cause__``.

- :class:`ConnectError`: no connection could be opened (DNS, TCP, TLS, ALPN,
  or the pool is backing off after failed attempts). Nothing was sent.
- :class:`ConnectionLost`: the connection died, or a GOAWAY excluded this
  request's stream, before the answer arrived. ``goaway`` holds the server's
  GOAWAY if there was one (APNs puts ``{"reason": ...}`` in its debug data).
  A stream above the GOAWAY's last_stream_id was never processed; any other
  lost request may have been, so retrying it can deliver twice.
- :class:`RequestTimeout`: no complete answer in time; the stream was reset.
  The server may still have acted on the request.
- :class:`ProtocolError`: the server broke HTTP/2 or reset the stream;
  ``error_code`` is the HTTP/2 error code.
- :class:`InvalidRequest` (a :class:`ProtocolError`): a request header
  breaks HTTP/2's field rules. Nothing was sent and the connection is
  untouched: sent, the server would close it with every request on it.

``retryable`` says whether sending the same request again is sensible. It is
true for everything but protocol errors, and for REFUSED_STREAM resets, which
guarantee that the server did not process the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import h2.errors

_PROTOCOL_ERROR = h2.errors.ErrorCodes.PROTOCOL_ERROR


class TransportError(Exception):
    """No answer from the server; see the module docstring for the subclasses."""

    retryable: bool = True


class ConnectError(TransportError):
    """No connection could be opened; the request was not sent."""


@dataclass(frozen=True, slots=True)
class GoAway:
    """A GOAWAY frame from the server: streams above ``last_stream_id`` were
    never processed. ``debug_data`` is its opaque data decoded as UTF-8."""

    error_code: int
    last_stream_id: int
    debug_data: str


class ConnectionLost(TransportError):
    """The connection ended before the answer; ``goaway`` if the server sent one."""

    def __init__(self, message: str, goaway: GoAway | None = None) -> None:
        super().__init__(message)
        self.goaway = goaway

    @property
    def protocol_error(self) -> bool:
        """The server's GOAWAY says some request on the connection broke HTTP/2
        (PROTOCOL_ERROR): maybe this one, maybe another in flight beside it."""
        goaway = self.goaway
        return goaway is not None and goaway.error_code == _PROTOCOL_ERROR


class RequestTimeout(TransportError):
    """No complete answer within the request's timeout; the stream was reset."""


class ProtocolError(TransportError):
    """The server violated HTTP/2 or reset the stream with ``error_code``."""

    def __init__(self, message: str, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code
        self.retryable = error_code == h2.errors.ErrorCodes.REFUSED_STREAM

    @property
    def malformed(self) -> bool:
        """The server reset this stream with PROTOCOL_ERROR, its answer to a
        malformed request (RFC 9113 8.1.1): sending it again fails again."""
        return self.error_code == _PROTOCOL_ERROR


class InvalidRequest(ProtocolError):
    """A request header breaks HTTP/2's field rules; nothing was sent."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
