"""One HTTP/2 client connection over TLS: :class:`H2Connection`.

Every frame is parsed in the asyncio protocol's ``data_received``, the
connection's single reader; requests only queue frames and await a future.
The stream limit is a counter that the reader re-sizes without ever
waiting when the server changes SETTINGS_MAX_CONCURRENT_STREAMS: requests
already in flight finish, new ones wait for a slot in FIFO order.

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
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from hpack import NeverIndexedHeaderTuple

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
from pushstream.senders.h2options import DEFAULT_TIMEOUT, H2Options
from pushstream.senders.h2state import ClientState

# The transport logs under one name, whichever of its modules writes the line.
log = logging.getLogger("pushstream.senders.http2")

RECEIVE_WINDOW = 1 << 20
"""Bytes a server may send on one stream before we acknowledge (advertised)."""
CONNECTION_RECEIVE_WINDOW = 16 << 20
CHECKED_FIELDS = 256
"""Request fields remembered as valid per connection (authorization...)."""
CLOSE_WAIT = 5.0
"""Seconds ``aclose`` waits for TLS shutdown before dropping the socket."""


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
