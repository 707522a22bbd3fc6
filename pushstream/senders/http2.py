"""HTTP/2 client transport for the provider senders, on the sans-I/O ``h2`` library.

Why not httpx: httpcore deadlocks when a server lowers
SETTINGS_MAX_CONCURRENT_STREAMS below the number of streams in flight, and
APNs does exactly that after every rejected push. Here the stream limit is a
counter that the frame reader re-sizes without ever waiting: requests already
in flight finish, new ones wait for a slot.

This module is the transport's public face: callers import its names from
here. Each part lives in a module of its own:

- :mod:`~pushstream.senders.h2pool`: :class:`H2Pool` keeps up to
  ``max_connections`` connections to one origin and reopens lost ones;
- :mod:`~pushstream.senders.h2connection`: :class:`H2Connection` is one TLS
  connection (ALPN ``h2``), its stream slots, deadlines and keep-alive;
- :mod:`~pushstream.senders.h2state`: h2's connection state, with the
  request frames and HPACK encoding made cheaper per request;
- :mod:`~pushstream.senders.h2message`: request headers and the field rules
  they must pass (:func:`field_problem`), the :class:`H2Response`;
- :mod:`~pushstream.senders.h2options`: :class:`H2Options`, the defaults and
  :func:`client_ssl_context`;
- :mod:`~pushstream.senders.h2errors`: the exceptions.

A response, whatever its status, is an :class:`H2Response`. Only "no answer"
raises, always a subclass of :class:`TransportError` (:class:`ConnectError`,
:class:`ConnectionLost`, :class:`RequestTimeout`, :class:`ProtocolError`,
:class:`InvalidRequest`); their module's docstring says what each means and
when a retry is safe.
"""

from pushstream.senders.h2connection import H2Connection
from pushstream.senders.h2errors import (
    ConnectError,
    ConnectionLost,
    GoAway,
    InvalidRequest,
    ProtocolError,
    RequestTimeout,
    TransportError,
)
from pushstream.senders.h2message import H2Response, Headers, field_problem
from pushstream.senders.h2options import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_RECONNECT_BACKOFF,
    DEFAULT_RECONNECT_BACKOFF_MAX,
    DEFAULT_TIMEOUT,
    H2Options,
    client_ssl_context,
)
from pushstream.senders.h2pool import ConnectionFactory, H2Pool, PoolStats

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_PING_TIMEOUT",
    "DEFAULT_RECONNECT_BACKOFF",
    "DEFAULT_RECONNECT_BACKOFF_MAX",
    "DEFAULT_TIMEOUT",
    "ConnectError",
    "ConnectionFactory",
    "ConnectionLost",
    "GoAway",
    "H2Connection",
    "H2Options",
    "H2Pool",
    "H2Response",
    "Headers",
    "InvalidRequest",
    "PoolStats",
    "ProtocolError",
    "RequestTimeout",
    "TransportError",
    "client_ssl_context",
    "field_problem",
]
