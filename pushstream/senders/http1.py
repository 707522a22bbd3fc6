"""HTTP/1.1 keep-alive client for the WNS sender, on the sans-I/O ``h11`` library.

Why not httpx: WNS speaks HTTP/1.1 only, one request per connection at a
time, so a busy sender keeps a few dozen connections, and httpcore walks
every one of them (and anyio's socket attributes) for each request: about a
millisecond of CPU per send. Here a request costs building its bytes,
parsing its answer and a few list operations.

:class:`Http1Pool` keeps, per origin (host, port), at most
``max_connections`` connections. A request takes the most recently used
idle connection, or opens a new one while under the limit, or else waits;
waiters are served first come, first served, by handing them the connection
another request just released. An idle connection is closed after
``idle_timeout`` seconds, and dropped as soon as the server closes it. A
server's close can be in the socket before the event loop has read it (a
server that answers without ``Connection: close`` and hangs up at once), so
before a connection is reused its socket is polled: an idle connection has
nothing to read, and one that has (the end of the connection, a TLS
close_notify, bytes nobody asked for) is dropped, as httpcore does.

Errors
------
A response, whatever its status, is a :class:`Response`. Only "no answer"
raises, always a subclass of :class:`TransportError`:

- :class:`InvalidRequest`: a header h11 refuses to write (not ASCII, CR/LF,
  or framing the pool owns). Nothing was sent.
- :class:`ConnectError`: no connection could be opened (DNS, TCP, TLS), or
  the pool is closed. Nothing was sent. :class:`ConnectTimeout` when the
  connect took too long.
- :class:`ConnectionLost`: the connection ended before the whole answer.
  The server may have acted on the request.
- :class:`RequestTimeout`: no complete answer in time; the connection was
  dropped. The server may have acted on the request.
- :class:`ProtocolError`: the answer broke HTTP/1.1 (or was too large); the
  connection was dropped.

A request is never sent again by the pool: the only connections it skips
are those it already knows to be closed or finds readable, before a byte
was written to them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import select
import ssl
from collections.abc import Iterable
from dataclasses import dataclass

import h11

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
"""Seconds from writing a request until its complete response."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds for TCP and TLS together."""
DEFAULT_IDLE_TIMEOUT = 5.0
"""Seconds an unused connection stays open (httpx's keep-alive expiry)."""
DEFAULT_MAX_CONNECTIONS = 10
MAX_RESPONSE_BYTES = 1 << 20
"""A longer response body is refused: no push service answers with that much."""
CLOSE_WAIT = 2.0
"""Seconds ``aclose`` waits for TLS shutdown before dropping the sockets."""

# Framing is the pool's: Content-Length is always set, bodies are never chunked.
_POOL_HEADERS = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "expect", "te"}
)


class TransportError(Exception):
    """No answer from the server; see the module docstring for the subclasses."""


class InvalidRequest(TransportError):
    """A request header cannot be written; nothing was sent."""


class ConnectError(TransportError):
    """No connection could be opened; nothing was sent."""


class Timeout(TransportError):
    """No connection or no answer in time."""


class ConnectTimeout(ConnectError, Timeout):
    """No connection within the connect timeout; nothing was sent."""


class RequestTimeout(Timeout):
    """No complete answer within the request's timeout."""


class ConnectionLost(TransportError):
    """The connection ended before the complete answer."""


class ProtocolError(TransportError):
    """The server's answer broke HTTP/1.1, or was too large."""


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response. Header names are lowercase; repeated headers are
    joined with ", " (RFC 9110 5.3)."""

    status: int
    headers: dict[str, str]
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection; it carries one request at a time for its origin.

    The asyncio callbacks parse the answer as it arrives and complete the
    request's future; ``reusable`` says whether another request may follow.
    """

    def __init__(self, origin: _Origin) -> None:
        self._origin = origin
        self._loop = origin.loop
        self._h11 = h11.Connection(h11.CLIENT)
        self._transport: asyncio.Transport | None = None
        self._response: asyncio.Future[Response] | None = None
        self._status = 0
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._size = 0
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.reusable = False
        self.idle_timer: asyncio.TimerHandle | None = None
        self._eof = False

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.reusable = True

    def data_received(self, data: bytes) -> None:
        response = self._response
        if response is None or response.done():
            # Bytes nobody asked for (a server's 408 before it hangs up).
            self.close()
            return
        self._h11.receive_data(data)
        self._read()

    def eof_received(self) -> bool:
        self.reusable = False
        self._eof = True
        if self._response is not None:
            # A body delimited by the end of the connection ends here.
            self._h11.receive_data(b"")
            self._read()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self._fail(self._lost_error())
        if not self.lost.done():
            self.lost.set_result(None)
        self._origin.connection_lost(self)

    def usable(self) -> bool:
        """Whether the next request may be written to this idle connection.

        The socket of an idle connection has nothing to read; if it has,
        that is the server's end of the connection (or, under TLS, a
        close_notify or stray bytes) not yet read by the event loop, and
        the request would be lost with it. A zero-timeout poll, so it never
        waits.
        """
        if not self.reusable or self._transport is None:
            return False
        sock = self._transport.get_extra_info("socket")
        if sock is None:
            return True
        fd = sock.fileno()
        if fd < 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return not poller.poll(0)

    # -- requests ------------------------------------------------------------

    async def request(self, head: h11.Request, body: bytes, timeout: float) -> Response:  # noqa: ASYNC109
        """Write one request and wait for its complete answer."""
        assert self._transport is not None
        h = self._h11
        try:
            data = h.send(head) or b""
            if body:
                data += h.send(h11.Data(data=body)) or b""
            data += h.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            self.abort()
            raise InvalidRequest("h11 cannot write the request") from None
        response: asyncio.Future[Response] = self._loop.create_future()
        self._response = response
        self._transport.write(data)
        timer = self._loop.call_later(timeout, self._expire, timeout)
        try:
            return await response
        except BaseException:
            self.abort()  # a late answer must not become the next request's
            raise
        finally:
            timer.cancel()
            self._response = None

    def _read(self) -> None:
        h = self._h11
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if self._eof:  # the connection ended in the middle of the answer
                    self._fail(self._lost_error())
                else:
                    name = self._origin.name
                    self._fail(ProtocolError(f"{name} broke HTTP/1.1: {exc}"))
                self.abort()
                return
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.Response):
                self._start(event)
            elif isinstance(event, h11.Data):
                self._size += len(event.data)
                if self._size > MAX_RESPONSE_BYTES:
                    message = f"response body over {MAX_RESPONSE_BYTES} bytes"
                    self._fail(ProtocolError(message))
                    self.abort()
                    return
                self._body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._finish()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self._fail(self._lost_error())
                self.close()
                return
            # An InformationalResponse (1xx) precedes the answer: skip it.

    def _start(self, event: h11.Response) -> None:
        self._status = event.status_code
        self._body, self._size = [], 0
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        self._headers = headers

    def _finish(self) -> None:
        h = self._h11
        if (
            h.our_state is h11.DONE
            and h.their_state is h11.DONE
            and not h.trailing_data[0]
        ):
            h.start_next_cycle()
        else:
            self.reusable = False  # Connection: close, HTTP/1.0, or extra bytes
            self.close()
        response = self._response
        if response is not None and not response.done():
            response.set_result(
                Response(self._status, self._headers, b"".join(self._body))
            )

    def _lost_error(self) -> ConnectionLost:
        return ConnectionLost(f"{self._origin.name} closed the connection")

    def _fail(self, exc: TransportError) -> None:
        self.reusable = False
        response = self._response
        if response is not None and not response.done():
            response.set_exception(exc)

    def _expire(self, timeout: float) -> None:
        self._fail(
            RequestTimeout(f"no response from {self._origin.name} within {timeout:g}s")
        )
        self.abort()

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Close after what was written (TLS close_notify included)."""
        self.reusable = False
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection now."""
        self.reusable = False
        if self._transport is not None:
            self._transport.abort()


class _Origin:
    """The connections to one (host, port) and the requests waiting for one.

    ``count`` is every connection the origin owns: idle, busy or being
    opened. A waiter's future gets a connection handed over by a finished
    request, or None: a slot to open a connection of its own.
    """

    def __init__(self, pool: Http1Pool, host: str, port: int) -> None:
        self.pool = pool
        self.host = host
        self.port = port
        self.loop = asyncio.get_running_loop()
        self.name = f"{host}:{port}"
        default_port = 443 if pool.ssl_context is not None else 80
        bracketed = f"[{host}]" if ":" in host else host
        self.authority = bracketed if port == default_port else f"{bracketed}:{port}"
        self.idle: list[_Connection] = []
        self.connections: set[_Connection] = set()
        self.count = 0
        self.waiters: collections.deque[asyncio.Future[_Connection | None]] = (
            collections.deque()
        )

    async def acquire(self) -> _Connection:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
            if conn.usable():
                return conn
            self._discard(conn)  # closed while idle: nothing was written to it
            self.count -= 1
        if self.count < self.pool.max_connections and not self.waiters:
            self.count += 1
            return await self._open()
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            handed = await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                with contextlib.suppress(ValueError):  # unless already skipped
                    self.waiters.remove(waiter)
            else:  # served, then cancelled before it could run: pass it on
                self.release(waiter.result())
            raise
        if handed is not None and handed.usable():
            return handed
        if handed is not None:
            self._discard(handed)
        return await self._open()

    def release(self, conn: _Connection | None) -> None:
        """Give a connection (or, with None, its slot) back after a request."""
        if conn is not None and conn.reusable:
            while self.waiters:
                waiter = self.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(conn)
                    return
            self.idle.append(conn)
            conn.idle_timer = self.loop.call_later(
                self.pool.idle_timeout, self._expire, conn
            )
            return
        if conn is not None:
            self._discard(conn)
        self._free_slot()

    def connection_lost(self, conn: _Connection) -> None:
        """A connection closed; one sitting idle gives its slot back."""
        if conn in self.idle:
            self.idle.remove(conn)
            if conn.idle_timer is not None:
                conn.idle_timer.cancel()
            self._discard(conn)
            self._free_slot()

    def _expire(self, conn: _Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
            self._discard(conn)
            self._free_slot()

    def _free_slot(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter
                return
        self.count -= 1
        if self.count == 0:
            self.pool.forget(self)

    def _discard(self, conn: _Connection) -> None:
        conn.close()
        self.connections.discard(conn)

    async def _open(self) -> _Connection:
        """Open a connection for a slot already counted; on failure the slot
        goes to the next waiter."""
        pool = self.pool
        conn = _Connection(self)
        limit = pool.connect_timeout
        try:
            pool.check_open()
            async with asyncio.timeout(limit):
                await self.loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=pool.ssl_context,
                    server_hostname=self.host if pool.ssl_context else None,
                )
            pool.check_open()  # closed while this connection was being opened
        except TimeoutError as exc:
            conn.abort()
            self._free_slot()
            message = f"no connection to {self.name} within {limit:g}s"
            raise ConnectTimeout(message) from exc
        except (OSError, ValueError) as exc:
            # OSError includes ssl.SSLError and socket.gaierror; a host name
            # DNS cannot carry (an empty label, one over 63 characters) fails
            # IDNA encoding with UnicodeError, a ValueError.
            conn.abort()
            self._free_slot()
            raise ConnectError(f"cannot connect to {self.name}: {exc}") from exc
        except BaseException:
            conn.abort()
            self._free_slot()
            raise
        self.connections.add(conn)
        log.debug("connected to %s (%d connections)", self.name, self.count)
        return conn


class Http1Pool:
    """Keep-alive HTTP/1.1 connections, at most ``max_connections`` per origin.

    ``ssl_context`` None means plain TCP (tests); otherwise the server's
    certificate is checked against it for the host name. ``timeout`` is the
    default time from writing a request to its complete answer;
    ``connect_timeout`` bounds opening a connection. Waiting for a free
    connection is not timed: the callers' own in-flight limit bounds it.
    """

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        for name, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("idle_timeout", idle_timeout),
        ):
            if value <= 0:
                raise ValueError(f"{name} must be positive")
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.closed = False
        self._origins: dict[tuple[str, int], _Origin] = {}

    def connections(self, host: str, port: int) -> int:
        """Connections open (or opening) to an origin, busy or idle."""
        origin = self._origins.get((host, port))
        return 0 if origin is None else origin.count

    async def request(
        self,
        host: str,
        port: int,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Response:
        """Send one request to ``host:port`` and return its complete answer.

        ``target`` is the path and query, sent as given. The pool adds
        ``Host`` and ``Content-Length``; ``headers`` may not set those, nor
        other framing (Transfer-Encoding, Connection, Expect, TE). Raises
        :class:`TransportError` subclasses when no answer comes.
        """
        self.check_open()
        key = (host, port)
        origin = self._origins.get(key)
        if origin is None:
            origin = self._origins[key] = _Origin(self, host, port)
        try:
            head = _head(method, target, origin.authority, headers, len(body))
        except InvalidRequest:
            if origin.count == 0:
                self.forget(origin)
            raise
        conn = await origin.acquire()
        try:
            return await conn.request(head, body, timeout or self.timeout)
        finally:
            origin.release(conn)

    def check_open(self) -> None:
        """Raise ConnectError once :meth:`aclose` has been called."""
        if self.closed:
            raise ConnectError("the HTTP/1.1 pool is closed")

    def forget(self, origin: _Origin) -> None:
        """Drop an origin that has no connection and no waiter left."""
        if self._origins.get((origin.host, origin.port)) is origin:
            del self._origins[origin.host, origin.port]

    async def aclose(self) -> None:
        """Close every connection; requests in flight fail with ConnectionLost
        and later ones with ConnectError (safe to call twice)."""
        self.closed = True
        connections = []
        for origin in list(self._origins.values()):
            for conn in origin.connections:
                conn.close()
                connections.append(conn)
        if connections:
            waits = [asyncio.shield(conn.lost) for conn in connections]
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_WAIT):
                    await asyncio.gather(*waits)
            for conn in connections:
                conn.abort()


def _head(
    method: str,
    target: str,
    authority: str,
    headers: Iterable[tuple[str, str]],
    length: int,
) -> h11.Request:
    fields = [("Host", authority), ("Content-Length", str(length))]
    for name, value in headers:
        if name.lower() in _POOL_HEADERS:
            raise InvalidRequest(f"request header {name[:64]!r} is the pool's to set")
        fields.append((name, value))
    try:
        return h11.Request(method=method, target=target, headers=fields)
    except (h11.LocalProtocolError, UnicodeError):
        # h11's message quotes the value, and a value may be a bearer token.
        raise InvalidRequest(
            "the target or a header is not ASCII, or holds characters "
            "HTTP/1.1 does not allow"
        ) from None
