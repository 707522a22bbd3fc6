"""A pool of HTTP/2 connections to one origin: :class:`H2Pool`.

The senders talk to a provider through a pool. It spreads requests over up
to ``max_connections`` :class:`~pushstream.senders.h2connection.H2Connection`
objects, replaces lost or GOAWAY-ed ones on demand, and backs off when
connecting fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pushstream.senders.h2connection import H2Connection
from pushstream.senders.h2errors import ConnectError, TransportError
from pushstream.senders.h2message import H2Response, Headers
from pushstream.senders.h2options import DEFAULT_TIMEOUT, H2Options

# The transport logs under one name, whichever of its modules writes the line.
log = logging.getLogger("pushstream.senders.http2")

STABLE_AFTER = 10.0
"""Seconds after which a closed connection counts as used even if it never
answered; one that closes sooner, unused, counts as a failed attempt."""


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A snapshot for metrics: requests on the wire and waiting for a slot,
    open connections and each one's current MAX_CONCURRENT_STREAMS."""

    in_flight: int
    waiting: int
    open_connections: int
    max_concurrent_streams: tuple[int, ...]
    connecting: bool


ConnectionFactory = Callable[[], Awaitable[H2Connection]]


class H2Pool:
    """Up to ``options.max_connections`` HTTP/2 connections to one origin.

    A request goes to the open connection with the most free stream slots; a
    new connection is opened (one at a time) only when every open one is
    full. Lost or GOAWAY-ed connections are dropped and replaced on demand.
    A failed connect (or a connection that died young without ever answering)
    is retried once at once, then with exponential backoff and jitter; during
    a backoff, requests that have no open connection fail at once with
    :class:`ConnectError` instead of hammering the server.

    ``connection_factory`` replaces :meth:`H2Connection.connect` (e.g. to key
    connections by something of the caller's); :meth:`reset` retires every
    current connection so the next request starts on a fresh one.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        options: H2Options | None = None,
        connection_factory: ConnectionFactory | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.options = options or H2Options()
        self._peer = f"{host}:{port}"
        self._ssl_context = ssl_context
        self._server_hostname = server_hostname
        self._factory = connection_factory or self._connect
        self._connections: list[H2Connection] = []
        self._draining: set[H2Connection] = set()  # closing, requests in flight
        self._connecting: asyncio.Task[H2Connection] | None = None
        self._failures = 0
        self._failed_at = 0.0
        self._retry_at = 0.0
        self._closed = False

    async def __aenter__(self) -> H2Pool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Open the first connection in the background; errors surface on use.

        Optional (requests open connections anyway) and safe to call twice.
        """
        if self._closed:
            raise ConnectError(f"pool for {self._peer} is closed")
        if not self._connections and self._connecting is None:
            self._begin_connect()

    async def aclose(self) -> None:
        """Close every connection; in-flight requests fail. Safe to call twice."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        connections = [*self._connections, *self._draining]
        self._connections, self._draining = [], set()
        await asyncio.gather(*(conn.aclose() for conn in connections))

    def reset(self) -> None:
        """Retire all connections: they finish their in-flight requests and
        close, and the next request opens a new connection."""
        for conn in list(self._connections):
            conn.close_when_idle()

    def stats(self) -> PoolStats:
        """Current numbers for metrics and tests."""
        conns = self._connections
        return PoolStats(
            in_flight=sum(conn.in_flight for conn in conns),
            waiting=sum(conn.waiting for conn in conns),
            open_connections=len(conns),
            max_concurrent_streams=tuple(conn.max_concurrent_streams for conn in conns),
            connecting=self._connecting is not None,
        )

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers = (),
        body: bytes = b"",
        # The timeout is part of the contract: expiry resets the stream.
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> H2Response:
        """Send a request on the least busy connection; see
        :meth:`H2Connection.request`. Opening a connection first is bounded
        by ``options.connect_timeout``, not by ``timeout``."""
        conn = self._pick()
        while conn is None:
            conn = await self._connection()
        response = await conn.request(method, path, headers, body, timeout)
        if self._failures and conn.opened_at > self._failed_at:
            log.info("%s answers again after %d failure(s)", self._peer, self._failures)
            self._failures = 0
            self._retry_at = 0.0
        return response

    def _pick(self) -> H2Connection | None:
        """The connection with the most free slots, or None to open one."""
        best: H2Connection | None = None
        best_free = -(1 << 62)
        for conn in self._connections:
            free = conn.free_slots
            if free > best_free:
                best, best_free = conn, free
        if best_free > 0:
            return best
        if len(self._connections) < self.options.max_connections or best is None:
            return None
        return best

    async def _connection(self) -> H2Connection | None:
        """Wait for the connection being opened (starting one if needed), then
        return None to pick again; during a backoff, the least busy open
        connection."""
        if self._closed:
            raise ConnectError(f"pool for {self._peer} is closed")
        if self._connecting is None:
            wait = self._retry_at - asyncio.get_running_loop().time()
            if wait > 0:
                if self._connections:
                    return max(self._connections, key=lambda c: c.free_slots)
                raise ConnectError(
                    f"not connecting to {self._peer} for another {wait:.1f}s "
                    f"after {self._failures} failed attempt(s)"
                )
            self._begin_connect()
        task = self._connecting
        assert task is not None
        try:
            await asyncio.shield(task)  # one caller giving up must not stop it
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise ConnectError(f"pool for {self._peer} is closed") from None
            raise
        return self._pick()

    def _begin_connect(self) -> None:
        task = asyncio.get_running_loop().create_task(self._open())
        task.add_done_callback(_consume_exception)
        self._connecting = task

    async def _open(self) -> H2Connection:
        try:
            conn = await self._factory()
        except TransportError as exc:
            self._connecting = None
            self._record_failure(str(exc))
            raise
        except BaseException:
            self._connecting = None
            raise
        self._connecting = None
        if self._closed:
            await conn.aclose()
            raise ConnectError(f"pool for {self._peer} is closed")
        self._connections.append(conn)
        conn.add_close_callback(self._on_connection_closing)
        return conn

    async def _connect(self) -> H2Connection:
        return await H2Connection.connect(
            self.host,
            self.port,
            self._ssl_context,
            server_hostname=self._server_hostname,
            options=self.options,
        )

    def _on_connection_closing(self, conn: H2Connection) -> None:
        with contextlib.suppress(ValueError):
            self._connections.remove(conn)
        self._draining = {c for c in self._draining if not c.closed}
        if not conn.closed:
            self._draining.add(conn)
        lived = asyncio.get_running_loop().time() - conn.opened_at
        used = conn.responses or conn.in_flight or lived >= STABLE_AFTER
        if not used and not self._closed:
            self._record_failure(f"connection closed after {lived:.1f}s unused")

    def _record_failure(self, reason: str) -> None:
        """Allow one immediate retry, then back off exponentially with jitter."""
        self._failures += 1
        options = self.options
        delay = 0.0
        if self._failures > 1:
            delay = options.reconnect_backoff * 2 ** (self._failures - 2)
            delay = min(delay, options.reconnect_backoff_max)
            delay *= random.uniform(0.8, 1.2)
        now = asyncio.get_running_loop().time()
        self._failed_at = now
        self._retry_at = now + delay
        # WARNING once, when backing off starts; the rest of the streak at INFO.
        level = logging.WARNING if self._failures == 2 else logging.INFO
        log.log(
            level,
            "%s unavailable (%s); next attempt in %.1fs",
            self._peer,
            reason,
            delay,
        )


def _consume_exception(task: asyncio.Task[H2Connection]) -> None:
    """Mark a background connect's failure as seen; callers got it already."""
    if not task.cancelled():
        task.exception()
