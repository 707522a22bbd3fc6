"""HTTP/2 client transport for the provider senders, on the sans-I/O ``h2`` library.

Why not httpx: httpcore deadlocks when a server lowers
SETTINGS_MAX_CONCURRENT_STREAMS below the number of streams in flight, and
APNs does exactly that after every rejected push. Here the stream limit is a
counter that the frame reader re-sizes without ever waiting: requests already
in flight finish, new ones wait for a slot.

:class:`H2Connection` is one TLS connection (ALPN ``h2``). Every frame is
parsed in the asyncio protocol's ``data_received``, the connection's single
reader; requests only queue frames and await a future. :class:`H2Pool` keeps
up to ``max_connections`` of them to one origin and reopens lost ones.

Errors
------
A response, whatever its status, is an :class:`H2Response`. Only "no answer"
raises, always a subclass of :class:`TransportError`; the ``ssl``, ``OSError``
and ``h2`` exceptions underneath are translated here and kept as ``__cause__``.

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

Cost per request
----------------
h2 and hpack are pure Python, so their work per request is what limits
throughput (bench/http2_loop.py measures it). Requests are written once per
event-loop pass for all of them; a request's frames are written as bytes
(see :mod:`pushstream.senders.h2state`), with the body in the same pass
when it fits the flow-control windows; h2's header checks are off (its
outbound checks do not look at characters; :func:`field_problem` checks
what a server would refuse, in one regular expression per header). HPACK
literals skip Huffman coding, and ``:path`` and the options'
``never_indexed`` headers are sent never-indexed: an APNs path is a device
token and an apns-id is new on every request, which would otherwise evict
the reusable entries (authorization, apns-topic) from the HPACK table. The
table then holds still, and each reused field's encoding is kept. Request
deadlines share one timer per DEADLINE_TICK.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import re
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hpack import NeverIndexedHeaderTuple

from pushstream.senders.h2state import ClientState

log = logging.getLogger(__name__)

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
STABLE_AFTER = 10.0
"""Seconds after which a closed connection counts as used even if it never
answered; one that closes sooner, unused, counts as a failed attempt."""
RECEIVE_WINDOW = 1 << 20
"""Bytes a server may send on one stream before we acknowledge (advertised)."""
CONNECTION_RECEIVE_WINDOW = 16 << 20
CHECKED_FIELDS = 256
"""Request fields remembered as valid per connection (authorization...)."""
CLOSE_WAIT = 5.0
"""Seconds ``aclose`` waits for TLS shutdown before dropping the socket."""

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
"""Request headers: a mapping or (name, value) pairs. Names are lowercased."""


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


# RFC 9113 8.2.1: a field name is lowercase token characters (RFC 9110
# 5.6.2), a value holds no NUL, CR or LF and has no leading or trailing space
# or tab. 8.2.2: connection-specific fields, and TE other than "trailers",
# make a request malformed.
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")
_FIELD_VALUE = re.compile(r"(?:[^\x00\r\n\t ](?:[^\x00\r\n]*[^\x00\r\n\t ])?)?")
_CONNECTION_FIELDS = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"}
)


def field_problem(name: str, value: str) -> str | None:
    """Why a (lowercased) request header would make the request malformed.

    None when it may be sent. Pseudo-headers are the transport's own, so a
    name starting with ``:`` is refused too.
    """
    if _FIELD_NAME.fullmatch(name) is None:
        return "not a lowercase token (pseudo-headers are the transport's)"
    if _FIELD_VALUE.fullmatch(value) is None:
        return "its value has NUL, CR, LF, or surrounding whitespace"
    if name in _CONNECTION_FIELDS or (name == "te" and value != "trailers"):
        return "a connection-specific header"
    return None


@dataclass(frozen=True, slots=True)
class H2Response:
    """A complete response. Header names are lowercase; repeated headers are
    joined with ", " (RFC 9110 §5.3)."""

    status: int
    headers: dict[str, str]
    body: bytes


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


class _Stream:
    """One request's state while its stream is open."""

    __slots__ = ("body", "closed", "headers", "id", "outgoing", "response", "status")

    def __init__(self, stream_id: int, response: asyncio.Future[H2Response]) -> None:
        self.id = stream_id
        self.response = response
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.outgoing = memoryview(b"")  # request body not yet sent
        self.closed = False


DEADLINE_TICK = 0.01
"""Seconds: request deadlines are rounded up to a multiple of this."""


class _Deadline:
    """When a request times out, the future it waits for (a stream slot or
    the response) fails with RequestTimeout.

    ``expired`` is set whatever the request waits for: a slot granted just
    before the batch fired leaves nothing to fail, and the batch's timer is
    gone, so the request must see it before it opens a stream.
    """

    __slots__ = ("awaited", "expired", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.awaited: asyncio.Future[Any] | None = None
        self.expired = False

    def error(self, peer: str) -> RequestTimeout:
        return RequestTimeout(f"no response from {peer} within {self.timeout:g}s")


class H2Connection(asyncio.Protocol):
    """One HTTP/2 connection over TLS; open it with :meth:`connect`.

    Concurrent :meth:`request` calls share the connection up to the server's
    current MAX_CONCURRENT_STREAMS; the others wait for a slot in FIFO order.
    The asyncio callbacks (``connection_made``, ``data_received``...) belong
    to the event loop, not to callers.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        authority: str | None = None,
        options: H2Options | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.options = options or H2Options()
        self._peer = f"{host}:{port}"
        self._authority = authority or (host if port == 443 else self._peer)
        self._authority_bytes = self._authority.encode()
        self._loop = asyncio.get_running_loop()
        self._h2 = ClientState()
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: RECEIVE_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            },
        )
        self._transport: asyncio.Transport | None = None
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._streams: dict[int, _Stream] = {}
        self._sending: dict[int, _Stream] = {}  # bodies waiting for window, FIFO
        self._slot_waiters: collections.deque[asyncio.Future[None]] = (
            collections.deque()
        )
        self._active = 0  # open streams plus slots granted to waiters
        self._limit = 1  # replaced by the server's first SETTINGS
        self._closing = False
        self._closed = False
        self._goaway: GoAway | None = None
        self._close_callbacks: list[Callable[[H2Connection], None]] = []
        self._flush_scheduled = False
        self._deadlines: dict[float, list[_Deadline]] = {}
        # Reused fields (authorization, apns-topic) that passed field_problem.
        self._checked_fields: set[tuple[str, str]] = set()
        self._last_received = self._loop.time()
        self._ping_timer: asyncio.TimerHandle | None = None
        self._ping_deadline: asyncio.TimerHandle | None = None
        self._pings_sent = 0
        self.opened_at = self._loop.time()
        self.responses = 0
        """Number of complete responses received (a liveness witness)."""
        self._dispatch: dict[type[h2.events.Event], Callable[[Any], None]] = {
            h2.events.ResponseReceived: self._on_response,
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_stream_reset,
            h2.events.WindowUpdated: self._on_window_updated,
            h2.events.RemoteSettingsChanged: self._on_settings,
            h2.events.ConnectionTerminated: self._on_goaway,
            h2.events.PingAckReceived: self._on_ping_ack,
        }

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        options: H2Options | None = None,
    ) -> H2Connection:
        """Open a connection and wait for the server's SETTINGS.

        ``ssl_context`` must offer ALPN ``h2`` (see :func:`client_ssl_context`);
        ``server_hostname`` overrides the name checked against the certificate
        and sent as ``:authority``. Raises :class:`ConnectError`.
        """
        loop = asyncio.get_running_loop()
        name = server_hostname or host
        authority = name if port == 443 else f"{name}:{port}"
        conn = cls(host, port, authority=authority, options=options)
        limit = conn.options.connect_timeout
        try:
            async with asyncio.timeout(limit):
                await loop.create_connection(
                    lambda: conn, host, port, ssl=ssl_context, server_hostname=name
                )
                await conn._ready
        except TimeoutError as exc:
            conn._abort()
            message = f"no HTTP/2 connection to {conn._peer} within {limit:g}s"
            raise ConnectError(message) from exc
        except OSError as exc:  # includes ssl.SSLError and socket.gaierror
            conn._abort()
            raise ConnectError(f"cannot connect to {conn._peer}: {exc}") from exc
        log.info("connected to %s (max concurrent streams %d)", conn._peer, conn._limit)
        return conn

    # -- public state ---------------------------------------------------------

    @property
    def is_usable(self) -> bool:
        """True while new requests are accepted (no GOAWAY, not lost or closed)."""
        return not self._closing

    @property
    def closed(self) -> bool:
        """True once the connection is gone and every request has its outcome."""
        return self._closed

    @property
    def in_flight(self) -> int:
        """Open streams (requests sent and not yet answered)."""
        return len(self._streams)

    @property
    def waiting(self) -> int:
        """Requests waiting for a stream slot."""
        return len(self._slot_waiters)

    @property
    def max_concurrent_streams(self) -> int:
        """The server's current SETTINGS_MAX_CONCURRENT_STREAMS."""
        return self._limit

    @property
    def free_slots(self) -> int:
        """Streams that could be opened now; negative when requests queue."""
        return self._limit - self._active - len(self._slot_waiters)

    def add_close_callback(self, callback: Callable[[H2Connection], None]) -> None:
        """Call ``callback(self)`` once, when the connection stops taking requests."""
        self._close_callbacks.append(callback)
        if self._closing:
            self._start_closing()

    # -- requests -------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        headers: Headers = (),
        body: bytes = b"",
        # The timeout is part of the contract: expiry resets the stream.
        timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    ) -> H2Response:
        """Send one request and return its complete response.

        ``:method``, ``:path``, ``:scheme`` and ``:authority`` come from the
        arguments and the connection; ``headers`` holds the others.
        ``timeout`` (seconds, rounded up to DEADLINE_TICK) covers waiting for
        a stream slot, sending the body and receiving the whole response;
        on expiry the stream is reset
        (RST_STREAM CANCEL) and :class:`RequestTimeout` is raised. Raises the
        other :class:`TransportError` subclasses when no answer can come,
        and :class:`InvalidRequest` at once for a header that breaks
        HTTP/2's field rules (see :func:`field_problem`).
        """
        if self._closing:
            raise self._closed_error()
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        never_indexed = self.options.never_indexed
        block: list[tuple[str, str] | NeverIndexedHeaderTuple] = [
            (":method", method),
            (":scheme", "https"),
            (":authority", self._authority),
            NeverIndexedHeaderTuple(":path", path),
        ]
        checked = self._checked_fields
        for name, value in pairs:
            field = (name.lower(), value)
            if field in checked:
                block.append(field)
                continue
            problem = field_problem(*field)
            if problem is not None:
                shown = repr(field[0][:64])
                raise InvalidRequest(f"request header {shown} refused: {problem}")
            if field[0] in never_indexed:
                block.append(NeverIndexedHeaderTuple(*field))
            else:
                if len(checked) >= CHECKED_FIELDS:
                    checked.clear()
                checked.add(field)
                block.append(field)
        stream: _Stream | None = None
        has_slot = False
        deadline = self._deadline(timeout)
        try:
            if self._slot_waiters or self._active >= self._limit:
                await self._wait_for_slot(deadline)
            else:
                self._active += 1
            has_slot = True
            stream = self._open_stream(block, body)
            deadline.awaited = stream.response
            return await stream.response
        finally:
            deadline.awaited = None
            if stream is not None:
                if not stream.closed:
                    self._cancel_stream(stream)
            elif has_slot:
                self._release_slot()

    def _deadline(self, timeout: float) -> _Deadline:
        """A request's deadline, in the batch of those ending within the same
        DEADLINE_TICK: one timer per batch instead of one per request."""
        loop = self._loop
        due = math.ceil((loop.time() + timeout) / DEADLINE_TICK) * DEADLINE_TICK
        deadline = _Deadline(timeout)
        batch = self._deadlines.get(due)
        if batch is None:
            batch = self._deadlines[due] = []
            loop.call_at(due, self._expire, due)
        batch.append(deadline)
        return deadline

    def _expire(self, due: float) -> None:
        """Fail what the requests of an expired batch still wait for; each
        request then resets its stream (RST_STREAM CANCEL) or gives up its
        place in the queue."""
        for deadline in self._deadlines.pop(due, ()):
            deadline.expired = True
            awaited = deadline.awaited
            if awaited is not None and not awaited.done():
                awaited.set_exception(deadline.error(self._peer))

    def _open_stream(
        self, block: list[tuple[str, str] | NeverIndexedHeaderTuple], body: bytes
    ) -> _Stream:
        h2conn = self._h2
        stream_id = h2conn.get_next_available_stream_id()
        try:
            h2conn.send_request_headers(
                stream_id, block, self._authority_bytes, not body
            )
            stream = _Stream(stream_id, self._loop.create_future())
            if body:
                size = len(body)
                if (
                    not self._sending
                    and size <= h2conn.max_outbound_frame_size
                    and size <= h2conn.local_flow_control_window(stream_id)
                ):
                    h2conn.send_body(stream_id, body)
                else:
                    stream.outgoing = memoryview(body)
                    self._sending[stream_id] = stream
        except h2.exceptions.ProtocolError as exc:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                h2conn.reset_stream(stream_id)
            raise ProtocolError(f"cannot send to {self._peer}: {exc}") from exc
        self._streams[stream_id] = stream
        if self._sending:
            self._send_pending()
        self._schedule_flush()
        return stream

    def _send_pending(self) -> None:
        """Send queued request bodies, oldest first, as far as windows allow.

        Runs whenever a window may have grown; bodies that fit when their
        request starts never queue.
        """
        h2conn = self._h2
        frame_size = h2conn.max_outbound_frame_size
        for stream in list(self._sending.values()):
            if h2conn.outbound_flow_control_window <= 0:
                break  # the connection window is shared: the rest waits
            outgoing = stream.outgoing
            try:
                window = h2conn.local_flow_control_window(stream.id)
                while window > 0 and outgoing:
                    size = min(window, frame_size, len(outgoing))
                    chunk, outgoing = outgoing[:size], outgoing[size:]
                    h2conn.send_data(stream.id, bytes(chunk), end_stream=not outgoing)
                    window -= size
            except h2.exceptions.StreamClosedError:
                outgoing = memoryview(b"")  # reset by the server: its event follows
            stream.outgoing = outgoing
            if not outgoing:
                del self._sending[stream.id]

    async def _wait_for_slot(self, deadline: _Deadline) -> None:
        """Wait in FIFO order until a stream slot is granted to this request.

        Raises RequestTimeout, with the slot given back, when the deadline
        fired between the grant and this task running again.
        """
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._slot_waiters.append(waiter)
        while True:
            deadline.awaited = waiter
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and not waiter.exception():
                    self._release_slot()  # granted, then cancelled
                with contextlib.suppress(ValueError):
                    self._slot_waiters.remove(waiter)
                raise
            if deadline.expired:
                self._release_slot()
                raise deadline.error(self._peer)
            if self._active <= self._limit:
                return
            # The limit shrank between the grant and now: queue again, first.
            self._active -= 1
            waiter = self._loop.create_future()
            self._slot_waiters.appendleft(waiter)

    def _release_slot(self) -> None:
        self._active -= 1
        self._grant_slots()

    def _grant_slots(self) -> None:
        waiters = self._slot_waiters
        while waiters and self._active < self._limit:
            waiter = waiters.popleft()
            if not waiter.done():
                self._active += 1
                waiter.set_result(None)

    def _cancel_stream(self, stream: _Stream) -> None:
        """Forget a stream whose caller gave up, telling the server to stop."""
        self._finish(stream)
        if self._closed:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
        self._schedule_flush()

    def _finish(self, stream: _Stream) -> None:
        stream.closed = True
        del self._streams[stream.id]
        if stream.outgoing:
            del self._sending[stream.id]
        if self._closing:
            self._close_if_idle()
        else:
            self._release_slot()

    # -- frames from the server ----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        alpn = ssl_object.selected_alpn_protocol() if ssl_object else None
        if alpn != "h2":
            reason = (
                f"{self._peer} did not agree to HTTP/2 via ALPN (got {alpn!r}); "
                "the SSLContext must offer 'h2' (see client_ssl_context)"
            )
            self._die(reason)  # connect() raises it as ConnectError
            return
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_RECEIVE_WINDOW - 65535)
        transport.write(self._h2.data_to_send())
        if self.options.ping_interval is not None:
            self._ping_timer = self._loop.call_later(
                self.options.ping_interval, self._ping_tick
            )

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        self._last_received = self._loop.time()
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()  # h2 queued a GOAWAY
            self._die(f"HTTP/2 protocol error from {self._peer}: {exc}", cause=exc)
            return
        dispatch = self._dispatch
        for event in events:
            handler = dispatch.get(type(event))
            if handler is not None:
                handler(event)
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._lost.done():
            self._lost.set_result(None)
        if self._closed:
            return
        detail = f": {exc}" if exc else ""
        if self._ready.done() and self._goaway is None and not self._closing:
            log.info("connection to %s lost%s", self._peer, detail)
        self._die(f"connection to {self._peer} lost{detail}")

    def _on_response(self, event: h2.events.ResponseReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        headers = stream.headers
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            if name == ":status":
                stream.status = int(value)
            elif name in headers:
                headers[name] += ", " + value
            else:
                headers[name] = value

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.body.append(event.data)
        # The whole body is buffered anyway, so credit the window at once.
        self._h2.acknowledge_received_data(
            event.flow_controlled_length, event.stream_id
        )

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        if stream.outgoing:
            # Answered before the whole body went out: stop sending it.
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.reset_stream(stream.id, h2.errors.ErrorCodes.CANCEL)
        self.responses += 1
        self._finish(stream)
        self._h2.forget_closed(stream.id)
        if not stream.response.done():
            body = b"".join(stream.body)
            response = H2Response(stream.status, stream.headers, body)
            stream.response.set_result(response)

    def _on_stream_reset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        self._finish(stream)
        self._h2.forget_closed(stream.id)
        code = event.error_code
        name = getattr(code, "name", str(code))
        error = ProtocolError(f"{self._peer} reset the stream ({name})", int(code))
        self._fail(stream, error)

    def _on_window_updated(self, event: h2.events.WindowUpdated) -> None:
        if self._sending:
            self._send_pending()

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        limit = self._h2.remote_settings.max_concurrent_streams
        if limit != self._limit:
            log.debug(
                "%s: max concurrent streams %d -> %d", self._peer, self._limit, limit
            )
            self._limit = limit
            self._grant_slots()
        if self._sending:
            self._send_pending()  # INITIAL_WINDOW_SIZE may have grown
        if not self._ready.done():
            self._ready.set_result(None)

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        code = event.error_code if event.error_code is not None else 0
        last = event.last_stream_id if event.last_stream_id is not None else 0
        debug = (event.additional_data or b"").decode("utf-8", "replace")
        self._goaway = GoAway(int(code), last, debug)
        log.info(
            "GOAWAY from %s (%s, last stream %d): %s",
            self._peer,
            getattr(code, "name", code),
            last,
            debug or "no debug data",
        )
        if not self._ready.done():
            self._ready.set_exception(
                ConnectError(f"{self._peer} sent GOAWAY: {debug}")
            )
        self._closing = True  # no slot goes to a waiter from here on
        for stream in [s for s in self._streams.values() if s.id > last]:
            self._finish(stream)
            self._fail(stream, self._closed_error())
        self._start_closing()
        self._close_if_idle()

    # -- keep-alive -----------------------------------------------------------

    def _ping_tick(self) -> None:
        interval = self.options.ping_interval
        assert interval is not None
        idle = self._loop.time() - self._last_received
        if idle >= interval and self._ping_deadline is None:
            self._pings_sent += 1
            self._h2.ping(self._pings_sent.to_bytes(8, "big"))
            self._flush()
            self._ping_deadline = self._loop.call_later(
                self.options.ping_timeout, self._ping_timed_out
            )
            delay = interval
        else:
            delay = max(interval - idle, 0.01)
        self._ping_timer = self._loop.call_later(delay, self._ping_tick)

    def _on_ping_ack(self, event: h2.events.PingAckReceived) -> None:
        if self._ping_deadline is not None:
            self._ping_deadline.cancel()
            self._ping_deadline = None

    def _ping_timed_out(self) -> None:
        self._ping_deadline = None
        timeout = self.options.ping_timeout
        log.info("no PING answer from %s within %gs; dropping", self._peer, timeout)
        self._die(f"{self._peer} did not answer a PING within {timeout:g}s")

    # -- closing --------------------------------------------------------------

    def close_when_idle(self) -> None:
        """Take no new requests; close once the in-flight ones are answered."""
        self._start_closing()
        self._close_if_idle()

    async def aclose(self) -> None:
        """Close now: in-flight requests fail with :class:`ConnectionLost`.

        Safe to call more than once.
        """
        if not self._closed and self._transport is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
            self._flush()
            self._die(f"connection to {self._peer} closed by the client", abort=False)
        if self._transport is not None and not self._lost.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._lost), CLOSE_WAIT)
            except TimeoutError:
                self._transport.abort()

    def _start_closing(self) -> None:
        """Refuse new requests, fail the queued ones, tell the listeners."""
        self._closing = True
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_exception(self._closed_error())
        self._slot_waiters.clear()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            callback(self)

    def _close_if_idle(self) -> None:
        if self._closing and not self._streams and not self._closed:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
            self._flush()
            self._die(f"connection to {self._peer} closed", abort=False)

    def _die(
        self, reason: str, *, abort: bool = True, cause: Exception | None = None
    ) -> None:
        """Fail every pending request with ``reason`` and drop the transport;
        a ``cause`` from h2 makes it a :class:`ProtocolError`."""
        if self._closed:
            return
        self._closed = True
        for timer in (self._ping_timer, self._ping_deadline):
            if timer is not None:
                timer.cancel()
        if not self._ready.done():
            self._ready.set_exception(ConnectError(reason))
        self._start_closing()
        streams = list(self._streams.values())
        self._streams.clear()
        self._sending.clear()
        for stream in streams:
            stream.closed = True
            error: TransportError
            if cause is not None:
                error = ProtocolError(reason)
                error.__cause__ = cause
            else:
                error = ConnectionLost(self._with_goaway(reason), self._goaway)
            self._fail(stream, error)
        if self._transport is not None:
            if abort:
                self._transport.abort()
            else:
                self._transport.close()

    def _abort(self) -> None:
        """Drop a connection that :meth:`connect` gave up on."""
        self._ready.cancel()  # nobody waits for it any more
        self._die(f"connection to {self._peer} abandoned")

    def _fail(self, stream: _Stream, error: TransportError) -> None:
        if not stream.response.done():
            stream.response.set_exception(error)

    def _closed_error(self) -> ConnectionLost:
        if self._goaway is not None:
            return ConnectionLost(self._with_goaway(""), self._goaway)
        return ConnectionLost(f"connection to {self._peer} is closing")

    def _with_goaway(self, reason: str) -> str:
        goaway = self._goaway
        if goaway is None:
            return reason
        text = (
            f"{self._peer} sent GOAWAY (last stream {goaway.last_stream_id}): "
            f"{goaway.debug_data or 'no debug data'}"
        )
        return f"{reason}; {text}" if reason else text

    # -- writing --------------------------------------------------------------

    def _schedule_flush(self) -> None:
        """Write queued frames once per event-loop pass, batching requests."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)


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
