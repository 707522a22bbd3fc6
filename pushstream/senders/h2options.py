"""How the HTTP/2 transport is set up: timeouts, keep-alive, pool size, TLS.

:class:`H2Options` holds the settings a connection and its pool share,
checked once when made; the defaults are this module's constants.
:func:`client_ssl_context` makes the TLS context a connection needs.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

DEFAULT_TIMEOUT = 10.0
"""Seconds from sending a request until its complete response."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds for TCP, TLS and the server's first SETTINGS frame together."""
DEFAULT_PING_INTERVAL = 60.0
"""Seconds without any received frame before a keep-alive PING is sent."""
DEFAULT_PING_TIMEOUT = 10.0
"""Seconds a PING may stay unanswered before the connection is declared dead."""
DEFAULT_MAX_CONNECTIONS = 1
DEFAULT_RECONNECT_BACKOFF = 0.5
"""Seconds to wait after the first failed connect; doubles per failure."""
DEFAULT_RECONNECT_BACKOFF_MAX = 30.0


@dataclass(frozen=True, slots=True)
class H2Options:
    """Connection and pool settings; the defaults are the module's constants.

    ``ping_interval=None`` turns keep-alive PINGs off. ``never_indexed``
    names request headers whose values differ on every request (APNs'
    apns-id): they are sent as never-indexed literals, like ``:path``, so
    that they do not push the reusable fields out of the HPACK table.
    """

    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    ping_interval: float | None = DEFAULT_PING_INTERVAL
    ping_timeout: float = DEFAULT_PING_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    reconnect_backoff: float = DEFAULT_RECONNECT_BACKOFF
    reconnect_backoff_max: float = DEFAULT_RECONNECT_BACKOFF_MAX
    never_indexed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "ping_timeout", "reconnect_backoff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"H2Options.{name} must be positive")
        if self.ping_interval is not None and self.ping_interval <= 0:
            raise ValueError("H2Options.ping_interval must be positive or None")
        if self.max_connections < 1:
            raise ValueError("H2Options.max_connections must be at least 1")
        if self.reconnect_backoff_max < self.reconnect_backoff:
            raise ValueError(
                "H2Options.reconnect_backoff_max is below reconnect_backoff"
            )


def client_ssl_context(
    cafile: str | None = None,
    certfile: str | None = None,
    keyfile: str | None = None,
) -> ssl.SSLContext:
    """A verifying TLS 1.2+ client context offering ALPN ``h2``.

    ``cafile`` replaces the system trust store (e.g. the sandbox CA);
    ``certfile``/``keyfile`` add a client certificate (APNs certificate auth).
    """
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context
