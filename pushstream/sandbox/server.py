"""The TLS server under the provider stand-ins: HTTP/2 (h2) and HTTP/1.1 (h11).

ALPN picks the protocol per connection. Each request is read completely and
passed to one async handler, ``handler(request) -> Response``. A handler runs
as soon as its request is complete, up to its first wait, and a task finishes
it if it waits, so a slow one holds up only its own stream; on HTTP/2 the
answers of one read go out in one write. Handlers shape the connection the
way a provider does through ``request.conn``: lower or raise
SETTINGS_MAX_CONCURRENT_STREAMS, send a GOAWAY, or drop the connection.

HTTP/1.1 follows WNS: keep-alive, one request at a time, no chunked request
bodies (400). A request without Content-Length has no body, as RFC 9112 says.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import (
    Awaitable,
    Callable,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
from hyperframe.frame import GoAwayFrame

from pushstream.sandbox.h2wire import (
    H2_CONFIG,
    H2ServerState,
    RequestDecoder,
    ResponseEncoder,
    field_problem,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_STREAMS = 1000
"""SETTINGS_MAX_CONCURRENT_STREAMS a new HTTP/2 connection advertises."""
DEFAULT_PROTOCOLS = ("h2", "http/1.1")
MAX_HEADER_LIST_SIZE = 65536
CONNECTION_WINDOW = 1 << 20
"""Bytes of request bodies in flight per connection (streams keep 64 KiB each)."""

ResponseHeaders = Mapping[str, str] | Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler answers. Header names are sent lowercase; on HTTP/1.1
    Content-Length is computed from ``body``."""

    status: int = 200
    headers: ResponseHeaders = ()
    body: bytes = b""


@dataclass(slots=True)
class Request:
    """A complete request, as the handler sees it (treat as read-only).

    ``headers`` maps lowercase names to the last value received; ``raw_headers``
    keeps every (name, value) pair in order, to spot duplicates. Pseudo-headers
    are not in either: they are ``method``, ``path`` and ``authority``.
    ``http_version`` is ``"2"``, ``"1.1"`` or ``"1.0"``.
    """

    method: str
    path: str
    authority: str
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    body: bytes
    http_version: str
    conn: ConnectionContext
    stream_id: int | None = None


Handler = Callable[[Request], Awaitable[Response]]


class _Session(Protocol):
    max_concurrent_streams: int

    def set_max_concurrent_streams(self, limit: int) -> None: ...
    def send_goaway(
        self, error_code: int, debug_data: bytes, last: int | None
    ) -> None: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class ConnectionContext:
    """One client connection, shared by all its requests.

    ``state`` is the provider's scratch space for this connection (e.g. the
    JWT key id it was first used with). ``peer_certificate`` is the client's
    certificate (DER) when the TLS context asked for one.
    """

    http_version: str
    peer: str
    peer_certificate: bytes | None
    state: dict[str, Any] = field(default_factory=dict)
    _session: _Session | None = field(default=None, repr=False)

    @property
    def max_concurrent_streams(self) -> int:
        """The stream limit last advertised (HTTP/2 only; 1 on HTTP/1.1)."""
        return self._session.max_concurrent_streams if self._session else 1

    def set_max_concurrent_streams(self, limit: int) -> None:
        """Advertise a new SETTINGS_MAX_CONCURRENT_STREAMS; no-op on HTTP/1.1.

        Queued before the response being built, so a client reads the new
        limit first, as with APNs after a rejected push.
        """
        if self._session is not None:
            self._session.set_max_concurrent_streams(limit)

    def send_goaway(
        self,
        error_code: int = 0,
        debug_data: bytes | str = b"",
        last_stream_id: int | None = None,
    ) -> None:
        """Send GOAWAY: streams up to ``last_stream_id`` (default: all received
        so far) are still answered, later ones are dropped, then the connection
        closes. On HTTP/1.1 the connection closes after the current response.
        """
        data = debug_data.encode() if isinstance(debug_data, str) else debug_data
        if self._session is not None:
            self._session.send_goaway(error_code, data, last_stream_id)

    def close(self) -> None:
        """Drop the connection now, without answering anything still open."""
        if self._session is not None:
            self._session.close()


class _InboundStream:
    __slots__ = (
        "authority",
        "body",
        "headers",
        "id",
        "method",
        "outgoing",
        "path",
        "task",
    )

    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.method = ""
        self.path = ""
        self.authority = ""
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.task: asyncio.Task[None] | None = None
        self.outgoing = memoryview(b"")  # response body not yet sent


class _H2Session:
    """HTTP/2 on one connection: frames are parsed in ``data_received``."""

    def __init__(
        self,
        server: SandboxServer,
        transport: asyncio.Transport,
        ctx: ConnectionContext,
    ) -> None:
        self._server = server
        self._transport = transport
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self.max_concurrent_streams = server.initial_max_streams
        self._validate = server.validate_headers
        self._h2 = H2ServerState(H2_CONFIG)
        self._h2.encoder = ResponseEncoder()
        self._h2.decoder = RequestDecoder(self._h2.decoder.max_header_list_size)
        codes = h2.settings.SettingCodes
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                codes.MAX_CONCURRENT_STREAMS: server.initial_max_streams,
                codes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST_SIZE,
            },
        )
        self._streams: dict[int, _InboundStream] = {}
        self._sending: dict[int, _InboundStream] = {}  # waiting for window, FIFO
        self._goaway_last: int | None = None
        self._flush_scheduled = False
        self._h2.initiate_connection()
        self._h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        transport.write(self._h2.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(str(exc))
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                problem = self._validate and field_problem(event.headers)
                if problem:
                    self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    self._protocol_error(problem)
                    return
                self._on_request(event)
            elif isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_stream_ended(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._drop(event.stream_id)
            elif isinstance(
                event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged
            ):
                if self._sending:
                    self._send_pending()
            elif isinstance(event, h2.events.TrailersReceived):
                problem = self._validate and field_problem(event.headers, True)
                if problem:
                    self._h2.close_connection(h2.errors.ErrorCodes.PROTOCOL_ERROR)
                    self._protocol_error(problem)
                    return
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.close()
                return
        self._flush()

    def _protocol_error(self, problem: str) -> None:
        """End the connection after a protocol error, GOAWAY sent first."""
        log.info("HTTP/2 protocol error from %s: %s", self._ctx.peer, problem)
        self._flush()
        self.close()

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        limit = self._h2.local_settings.max_concurrent_streams  # as acknowledged
        cut_off = self._goaway_last is not None and event.stream_id > self._goaway_last
        if cut_off or len(self._streams) >= limit:
            self._h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        stream = _InboundStream(event.stream_id)
        headers = stream.headers
        for raw_name, raw_value in event.headers:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            if name[0] != ":":
                headers.append((name, value))
            elif name == ":method":
                stream.method = value
            elif name == ":path":
                stream.path = value
            elif name == ":authority":
                stream.authority = value
        self._streams[event.stream_id] = stream

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.body.append(event.data)
        self._h2.acknowledge_received_data(
            event.flow_controlled_length, event.stream_id
        )

    def _on_stream_ended(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        request = Request(
            method=stream.method,
            path=stream.path,
            authority=stream.authority,
            headers=dict(stream.headers),
            raw_headers=stream.headers,
            body=b"".join(stream.body),
            http_version="2",
            conn=self._ctx,
            stream_id=stream_id,
        )
        stream.task = _run_eagerly(self._loop, self._serve(stream, request))

    async def _serve(self, stream: _InboundStream, request: Request) -> None:
        response = await _call_handler(self._server.handler, request)
        if self._streams.get(stream.id) is stream:  # not reset, not cut off
            self._respond(stream, response)

    def _respond(self, stream: _InboundStream, response: Response) -> None:
        block = [(":status", str(response.status))]
        block.extend([(k.lower(), v) for k, v in _pairs(response.headers)])
        body = response.body
        try:
            self._h2.send_headers(stream.id, block, end_stream=not body)
        except h2.exceptions.StreamClosedError:
            body = b""  # the client reset the stream meanwhile
        self._schedule_flush()
        if body:
            stream.outgoing = memoryview(body)
            self._sending[stream.id] = stream
            self._send_pending()
        else:
            self._forget(stream)

    def _send_pending(self) -> None:
        """Send queued response bodies, oldest first, as far as windows allow."""
        h2conn = self._h2
        frame_size = h2conn.max_outbound_frame_size
        for stream in list(self._sending.values()):
            if h2conn.outbound_flow_control_window <= 0:
                break
            outgoing = stream.outgoing
            try:
                window = h2conn.local_flow_control_window(stream.id)
                while window > 0 and outgoing:
                    size = min(window, frame_size, len(outgoing))
                    chunk, outgoing = outgoing[:size], outgoing[size:]
                    h2conn.send_data(stream.id, bytes(chunk), end_stream=not outgoing)
                    window -= size
            except h2.exceptions.StreamClosedError:
                outgoing = memoryview(b"")
            stream.outgoing = outgoing
            if not outgoing:
                self._forget(stream)
        self._schedule_flush()

    def _drop(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            self._forget(stream)
            if stream.task is not None:
                stream.task.cancel()

    def _forget(self, stream: _InboundStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
        self._sending.pop(stream.id, None)
        if self._goaway_last is not None and not self._streams:
            self._loop.call_soon(self.close)  # after the last frames are flushed

    def set_max_concurrent_streams(self, limit: int) -> None:
        self._h2.update_settings(
            {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit}
        )
        self.max_concurrent_streams = limit
        self._schedule_flush()

    def send_goaway(self, error_code: int, debug_data: bytes, last: int | None) -> None:
        if last is None:
            last = self._h2.highest_inbound_stream_id
        # Written directly: h2 would refuse to send the responses still owed
        # on streams up to `last` after its own close_connection().
        self._flush()
        frame = GoAwayFrame(
            0, last_stream_id=last, error_code=error_code, additional_data=debug_data
        )
        self._transport.write(frame.serialize())
        self._goaway_last = last
        for stream in [s for s in self._streams.values() if s.id > last]:
            self._drop(stream.id)
        if not self._streams:
            self.close()

    def close(self) -> None:
        self._transport.close()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [s.task for s in self._streams.values() if s.task is not None]

    def connection_lost(self) -> None:
        for task in self.tasks():
            task.cancel()
        self._streams.clear()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        data = self._h2.data_to_send()
        if data and not self._transport.is_closing():
            self._transport.write(data)


class _H11Session:
    """HTTP/1.1 on one connection: one request at a time, keep-alive."""

    max_concurrent_streams = 1

    def __init__(
        self,
        server: SandboxServer,
        transport: asyncio.Transport,
        ctx: ConnectionContext,
    ) -> None:
        self._server = server
        self._transport = transport
        self._ctx = ctx
        self._h11 = h11.Connection(h11.SERVER)
        self._head: h11.Request | None = None
        self._body: list[bytes] = []
        self._task: asyncio.Task[None] | None = None
        self._close_after = False

    def data_received(self, data: bytes) -> None:
        self._h11.receive_data(data)
        self._process()

    def _process(self) -> None:
        while self._task is None and not self._transport.is_closing():
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                self._reject(exc.error_status_hint, str(exc))
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if any(name == b"transfer-encoding" for name, _ in event.headers):
                    self._reject(400, "chunked request bodies are not accepted")
                    return
                self._head, self._body = event, []
                if self._h11.they_are_waiting_for_100_continue:
                    self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif isinstance(event, h11.Data):
                self._body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                task = _run_eagerly(asyncio.get_running_loop(), self._serve())
                if task is not None:
                    self._task = task  # the rest of the buffer waits for it
                    return
            elif isinstance(event, h11.ConnectionClosed):
                self.close()

    async def _serve(self) -> None:
        head = self._head
        assert head is not None
        raw = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers]
        request = Request(
            method=head.method.decode("ascii"),
            path=head.target.decode("latin-1"),
            authority=dict(raw).get("host", ""),
            headers=dict(raw),
            raw_headers=raw,
            body=b"".join(self._body),
            http_version=head.http_version.decode("ascii"),
            conn=self._ctx,
        )
        response = await _call_handler(self._server.handler, request)
        keep_alive = _keep_alive(head) and not self._close_after
        self._send(response, keep_alive, head_only=head.method == b"HEAD")
        if not keep_alive:
            self.close()
            return
        self._next_cycle()
        if self._task is not None:  # answered later: go on with what came since
            self._task = None
            self._process()

    def _next_cycle(self) -> None:
        """A fresh parser for the next request, with the bytes already read.

        Responses are written here, not through h11, so its state machine
        never sees them; a new parser per request is cheaper than h11's
        event checks and writers.
        """
        data, closed = self._h11.trailing_data
        self._h11 = h11.Connection(h11.SERVER)
        if data:
            self._h11.receive_data(bytes(data))
        if closed:
            self._h11.receive_data(b"")  # end of file, to h11

    def _send(self, response: Response, keep_alive: bool, head_only: bool) -> None:
        status = response.status
        lines = [f"HTTP/1.1 {status} {_reason(status).decode()}"]
        for name, value in _pairs(response.headers):
            if name.lower() not in _FRAMING_HEADERS:
                if "\n" in value or "\r" in value:
                    raise ValueError(f"response header {name} holds a line break")
                lines.append(f"{name}: {value}")
        body = response.body
        if status < 200 or status in (204, 304):
            body = b""
        else:
            lines.append(f"content-length: {len(body)}")
        if not keep_alive:
            lines.append("connection: close")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode("latin-1")
        self._transport.write(head if head_only or not body else head + body)

    def _reject(self, status: int, text: str) -> None:
        self._close_after = True
        body = text.encode()
        self._send(
            Response(status, [("content-type", "text/plain")], body), False, False
        )
        self.close()

    def set_max_concurrent_streams(self, limit: int) -> None:
        pass  # one request at a time on HTTP/1.1

    def send_goaway(self, error_code: int, debug_data: bytes, last: int | None) -> None:
        self._close_after = True

    def close(self) -> None:
        self._transport.close()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [self._task] if self._task is not None else []

    def connection_lost(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _ServerProtocol(asyncio.Protocol):
    """Picks HTTP/2 or HTTP/1.1 from ALPN and hands the bytes to that session."""

    def __init__(self, server: SandboxServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self.session: _H2Session | _H11Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        protocol = (ssl_object and ssl_object.selected_alpn_protocol()) or "http/1.1"
        peername = transport.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "?"
        if protocol not in self._server.protocols:
            log.info("%s: refusing %s from %s", self._server.name, protocol, peer)
            transport.abort()
            return
        cert = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        version = "2" if protocol == "h2" else "1.1"
        ctx = ConnectionContext(version, peer, cert or None)
        if protocol == "h2":
            self.session = _H2Session(self._server, transport, ctx)
        else:
            self.session = _H11Session(self._server, transport, ctx)
        ctx._session = self.session
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        if self.session is not None:
            self.session.connection_lost()


class SandboxServer:
    """An HTTPS server on ``host:port`` (0 picks a free port, see :attr:`port`).

    ``ssl_context`` is a server context whose ALPN list offers the protocols
    wanted (see :mod:`pushstream.sandbox.certs`); ``protocols`` is what this
    server accepts: a connection that negotiates anything else is dropped, and
    a client that sends no ALPN counts as ``http/1.1``. ``initial_max_streams``
    is the MAX_CONCURRENT_STREAMS each new HTTP/2 connection advertises;
    streams beyond it are refused (RST_STREAM REFUSED_STREAM).

    ``validate_headers`` checks HTTP/2 request headers as RFC 9113 §8.2 asks
    (lowercase names, no connection headers, pseudo-headers first), as a real
    provider does; a malformed request then resets the connection
    (:func:`field_problem`). Turning it off saves a few percent of the
    server's time per request.
    """

    def __init__(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        handler: Handler,
        *,
        initial_max_streams: int = DEFAULT_MAX_STREAMS,
        protocols: Iterable[str] = DEFAULT_PROTOCOLS,
        validate_headers: bool = True,
        name: str = "sandbox",
    ) -> None:
        self.host = host
        self.handler = handler
        self.initial_max_streams = initial_max_streams
        self.validate_headers = validate_headers
        self.protocols = frozenset(protocols)
        self.name = name
        self._requested_port = port
        self._ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._connections: set[_ServerProtocol] = set()

    @property
    def port(self) -> int:
        """The bound port; only valid after :meth:`start`."""
        if self._server is None:
            raise RuntimeError(f"{self.name} server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start accepting; safe to call twice."""
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerProtocol(self),
            self.host,
            self._requested_port,
            ssl=self._ssl_context,
        )
        log.info("%s listening on %s:%d", self.name, self.host, self.port)

    async def aclose(self) -> None:
        """Stop listening and drop every connection at once (like a crash, so
        clients see a lost connection). Safe to call twice."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        tasks = []
        for conn in list(self._connections):
            if conn.session is not None:
                tasks.extend(conn.session.tasks())
            if conn.transport is not None:
                conn.transport.abort()
        self._connections.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        log.info("%s stopped", self.name)

    async def __aenter__(self) -> SandboxServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


async def _call_handler(handler: Handler, request: Request) -> Response:
    try:
        return await handler(request)
    except Exception:
        # Path and headers can hold device tokens: name only the connection.
        log.exception("handler failed on a request from %s", request.conn.peer)
        return Response(500)


def _pairs(headers: ResponseHeaders) -> Iterable[tuple[str, str]]:
    return headers.items() if isinstance(headers, Mapping) else headers


_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection"})


def _keep_alive(request: h11.Request) -> bool:
    """Whether HTTP/1.1 lets the connection serve another request (RFC 9112
    §9.3): not after ``Connection: close``, nor by default on HTTP/1.0."""
    for name, value in request.headers:
        if name == b"connection":
            tokens = [token.strip() for token in value.lower().split(b",")]
            if b"close" in tokens:
                return False
    return request.http_version >= b"1.1"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _run_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]
) -> asyncio.Task[None] | None:
    """Run ``coro`` now, up to its first wait; a Task finishes it, if it waits.

    Most answers need no waiting: they go out in the same event-loop pass as
    the request, in the same write as the other answers of that pass, and
    cost no Task. Returns the Task, or None when ``coro`` is done.
    """
    try:
        waiting = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(_finish(coro, waiting))


async def _finish(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _Resumed(coro, waiting)


class _Resumed:
    """Awaits what a started coroutine waits for, then goes on driving it."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting: Any) -> None:
        self._coro = coro
        self._waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting = self._coro, self._waiting
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:  # cancellation, thrown in by the Task
                try:
                    waiting = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coro.send(sent)
                except StopIteration:
                    return
