"""The HTTP/2 client against the sandbox server, over real TLS on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import hpack
import pytest
from hpack import NeverIndexedHeaderTuple

from pushstream.sandbox.certs import SandboxCerts, ensure_certs
from pushstream.sandbox.server import (
    ConnectionContext,
    Handler,
    Request,
    Response,
    SandboxServer,
)
from pushstream.senders.h2state import HeaderDecoder, HeaderEncoder
from pushstream.senders.http2 import (
    ConnectError,
    ConnectionLost,
    H2Connection,
    H2Options,
    H2Pool,
    InvalidRequest,
    ProtocolError,
    RequestTimeout,
    TransportError,
)

GUARD = 10.0  # seconds: only to turn a hang into a failure


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SandboxCerts:
    return ensure_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def client_context(certs: SandboxCerts) -> ssl.SSLContext:
    return certs.client_ssl_context()


class Recorder:
    """A handler that tracks concurrency and lets a test hold requests."""

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.seen: list[Request] = []
        self.cancelled = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.arrived = asyncio.Condition()

    async def __call__(self, req: Request) -> Response:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.seen.append(req)
        async with self.arrived:
            self.arrived.notify_all()
        try:
            if req.path.startswith("/hold"):
                await self.gate.wait()
            elif req.path == "/never":
                await asyncio.Event().wait()
            elif req.path == "/slow":
                await asyncio.sleep(0.05)
            return Response(200, [("X-Path", req.path)], req.body)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def wait_for(self, count: int) -> None:
        async with self.arrived:
            await self.arrived.wait_for(lambda: self.active >= count)

    @property
    def conn(self) -> ConnectionContext:
        return self.seen[-1].conn


Serve = Callable[..., Awaitable[SandboxServer]]


@pytest.fixture
async def serve(certs: SandboxCerts) -> AsyncIterator[Serve]:
    """Start sandbox servers for a test and stop them after it."""
    servers: list[SandboxServer] = []

    async def start(handler: Handler, initial_max_streams: int = 1000) -> SandboxServer:
        ctx = certs.server_ssl_context()
        server = SandboxServer(
            "127.0.0.1", 0, ctx, handler, initial_max_streams=initial_max_streams
        )
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.aclose()


async def connect(server: SandboxServer, context: ssl.SSLContext) -> H2Connection:
    return await H2Connection.connect(
        "127.0.0.1", server.port, context, server_hostname="localhost"
    )


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(GUARD):
        # Polls client counters, which have no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


async def test_round_trip(serve: Serve, client_context: ssl.SSLContext) -> None:
    """Nothing could be sent at all: a request or its response arrives altered."""
    handler = Recorder()
    server = await serve(handler)
    async with H2Pool(
        "127.0.0.1", server.port, client_context, server_hostname="localhost"
    ) as pool:
        headers = {"Content-Type": "application/json", "apns-topic": "com.example"}
        response = await pool.request("POST", "/3/device/ab", headers, b'{"a":1}')
    assert response.status == 200
    assert response.headers["x-path"] == "/3/device/ab"
    assert response.body == b'{"a":1}'
    seen = handler.seen[0]
    assert (seen.method, seen.http_version) == ("POST", "2")
    assert seen.headers["content-type"] == "application/json"
    assert seen.authority == f"localhost:{server.port}"


async def test_many_requests_respect_stream_limit(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """A burst of sends is refused for opening more streams than the server allows."""
    handler = Recorder()
    server = await serve(handler, initial_max_streams=100)
    conn = await connect(server, client_context)
    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(
            *(conn.request("POST", "/slow", {}, b"%d" % i) for i in range(200))
        )
    assert [r.body for r in results] == [b"%d" % i for i in range(200)]
    assert 1 < handler.peak <= 100
    assert conn.in_flight == 0
    await conn.aclose()


# APNs lowers MAX_CONCURRENT_STREAMS to 1 after a rejected push, with other pushes
# in flight, and raises it after the next accepted one. httpcore deadlocks there:
# it waits for free slots while holding the lock that reads the responses.
async def test_lowered_stream_limit_mid_flight_does_not_hang(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """Sends stall forever after APNs lowers the stream limit (the httpx hang)."""
    handler = Recorder()
    handler.gate.clear()
    server = await serve(handler, initial_max_streams=100)
    conn = await connect(server, client_context)

    held = [asyncio.create_task(conn.request("POST", "/hold")) for _ in range(3)]
    await asyncio.wait_for(handler.wait_for(3), GUARD)
    handler.conn.set_max_concurrent_streams(1)
    await until(lambda: conn.max_concurrent_streams == 1)

    later = [asyncio.create_task(conn.request("POST", "/later")) for _ in range(3)]
    await until(lambda: conn.waiting == 3)
    assert len(handler.seen) == 3  # none of the later ones was sent

    handler.peak = 0
    handler.gate.set()
    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(*held, *later)
    assert [r.status for r in results] == [200] * 6
    assert handler.peak == 1  # the later ones went one at a time

    handler.conn.set_max_concurrent_streams(100)
    await until(lambda: conn.max_concurrent_streams == 100)
    handler.peak = 0
    async with asyncio.timeout(GUARD):
        await asyncio.gather(*(conn.request("GET", "/slow") for _ in range(20)))
    assert handler.peak > 1
    await conn.aclose()


async def test_apns_style_reject_then_accept(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """Pushes in flight with a rejected one never get their answers (httpx hang)."""
    in_flight = 0
    all_in = asyncio.Event()
    state = {"rejected": False}

    async def apns(req: Request) -> Response:
        nonlocal in_flight
        in_flight += 1
        if in_flight >= 3:
            all_in.set()
        await all_in.wait()
        if not state["rejected"]:
            state["rejected"] = True
            req.conn.set_max_concurrent_streams(1)
            return Response(400, body=json.dumps({"reason": "BadDeviceToken"}).encode())
        await asyncio.sleep(0.01)
        req.conn.set_max_concurrent_streams(1000)
        return Response(200, {"apns-id": "00000000-0000-0000-0000-000000000001"})

    server = await serve(apns, initial_max_streams=1000)
    conn = await connect(server, client_context)
    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(
            *(conn.request("POST", "/3/device/" + "ab" * 32) for _ in range(5))
        )
    assert sorted(r.status for r in results) == [200, 200, 200, 200, 400]
    assert conn.max_concurrent_streams == 1000
    await conn.aclose()


async def test_goaway_fails_only_unprocessed_streams(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """After an APNs GOAWAY, pushes are lost without a retryable error or sends stop."""
    handler = Recorder()
    handler.gate.clear()
    server = await serve(handler)
    async with H2Pool(
        "127.0.0.1", server.port, client_context, server_hostname="localhost"
    ) as pool:
        tasks = [asyncio.create_task(pool.request("POST", "/hold")) for _ in range(4)]
        await asyncio.wait_for(handler.wait_for(4), GUARD)
        ids = sorted(req.stream_id or 0 for req in handler.seen)
        handler.conn.send_goaway(0, '{"reason":"Shutdown"}', last_stream_id=ids[1])
        await until(lambda: pool.stats().open_connections == 0)
        handler.gate.set()
        async with asyncio.timeout(GUARD):
            results = await asyncio.gather(*tasks, return_exceptions=True)

        answered = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, ConnectionLost)]
        assert len(answered) == 2
        assert len(lost) == 2
        assert all(r.status == 200 for r in answered)
        for error in lost:
            assert error.retryable
            assert error.goaway is not None
            assert error.goaway.last_stream_id == ids[1]
            assert "Shutdown" in error.goaway.debug_data
            assert "Shutdown" in str(error)

        response = await pool.request("POST", "/after", {}, b"x", timeout=GUARD)
        assert response.status == 200
        assert pool.stats().open_connections == 1


async def test_server_killed_mid_flight(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """Sends stall until their timeout when the provider's server dies mid-flight."""
    handler = Recorder()
    server = await serve(handler)
    conn = await connect(server, client_context)
    tasks = [
        asyncio.create_task(conn.request("POST", "/never", timeout=60))
        for _ in range(3)
    ]
    await asyncio.wait_for(handler.wait_for(3), GUARD)
    await server.aclose()
    async with asyncio.timeout(GUARD):
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionLost) for r in results), results
    assert not conn.is_usable


async def test_request_timeout_resets_stream_and_keeps_connection(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """One unanswered push hangs its sender or takes a stream slot for good."""
    handler = Recorder()
    server = await serve(handler, initial_max_streams=1)
    conn = await connect(server, client_context)
    with pytest.raises(RequestTimeout):
        async with asyncio.timeout(GUARD):
            await conn.request("POST", "/never", timeout=0.3)
    await until(lambda: handler.cancelled == 1)  # the server saw RST_STREAM
    response = await conn.request("POST", "/ok", {}, b"still here", timeout=GUARD)
    assert response.body == b"still here"
    assert conn.in_flight == 0
    assert conn.is_usable
    await conn.aclose()


async def test_request_timeout_while_waiting_for_a_slot(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """A request queued for a stream slot waits past its timeout, or its
    place (or a slot granted to it) is lost for the requests behind it."""
    handler = Recorder()
    handler.gate.clear()
    server = await serve(handler, initial_max_streams=1)
    conn = await connect(server, client_context)
    held = asyncio.create_task(conn.request("POST", "/hold", timeout=GUARD))
    await handler.wait_for(1)
    started = asyncio.get_running_loop().time()
    with pytest.raises(RequestTimeout):
        await conn.request("POST", "/queued", timeout=0.2)
    assert 0.2 <= asyncio.get_running_loop().time() - started < 1.0
    assert conn.waiting == 0
    later = asyncio.create_task(conn.request("POST", "/later", timeout=GUARD))
    handler.gate.set()
    async with asyncio.timeout(GUARD):
        assert (await held).status == 200
        assert (await later).status == 200
    assert [seen.path for seen in handler.seen] == ["/hold", "/later"]
    assert conn.in_flight == 0
    assert conn.free_slots == 1
    await conn.aclose()


async def test_deadline_firing_as_the_slot_is_granted(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """A slot granted in the loop pass where the waiter's deadline fires
    left the request without a timer: unanswered, it held the connection's
    only slot for good."""
    handler = Recorder()
    server = await serve(handler, initial_max_streams=1)
    conn = await connect(server, client_context)
    held = asyncio.create_task(conn.request("POST", "/never", timeout=GUARD))
    await handler.wait_for(1)
    queued = asyncio.create_task(conn.request("POST", "/never", timeout=0.05))
    await until(lambda: conn.waiting == 1)
    # Cancelling the held request frees its slot when its task next runs,
    # which is before the timers due in that pass: blocking the loop past
    # the queued request's deadline puts the grant and the expiry together.
    held.cancel()
    time.sleep(0.1)  # noqa: ASYNC251
    with pytest.raises(RequestTimeout):
        async with asyncio.timeout(GUARD):
            await queued
    assert held.cancelled()
    assert conn.in_flight == 0
    assert conn.free_slots == 1
    response = await conn.request("POST", "/ok", {}, b"still here", timeout=GUARD)
    assert response.body == b"still here"
    await conn.aclose()


async def test_large_bodies_both_ways(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """Bodies beyond the 64 KiB flow-control window stall until they time out."""

    async def digest(req: Request) -> Response:
        body = hashlib.sha256(req.body).hexdigest().encode()
        return Response(200, body=body * 100_000)  # 6.4 MB

    server = await serve(digest)
    conn = await connect(server, client_context)
    payload = bytes(range(256)) * 12_000  # 3 MB
    async with asyncio.timeout(GUARD * 3):
        response = await conn.request("POST", "/big", {}, payload, timeout=GUARD * 3)
    expected = hashlib.sha256(payload).hexdigest().encode()
    assert response.body == expected * 100_000
    await conn.aclose()


async def test_many_bodies_share_the_connection_window(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """Some pushes of a burst starve behind the connection window and time out."""
    server = await serve(Recorder())
    conn = await connect(server, client_context)
    bodies = [bytes([i % 256]) * 8192 for i in range(300)]  # 2.4 MB in all
    async with asyncio.timeout(GUARD * 3):
        results = await asyncio.gather(
            *(conn.request("POST", "/", {}, body, timeout=GUARD * 3) for body in bodies)
        )
    assert [r.body for r in results] == bodies
    await conn.aclose()


class FreezableProxy:
    """A TCP relay that can stop passing bytes, like a silently dead peer."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            "127.0.0.1", self.target_port
        )
        self.writers += [writer, up_writer]
        self.tasks += [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while data := await reader.read(65536):
            await self.flowing.wait()
            writer.write(data)

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()


async def test_ping_detects_dead_peer(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """Sends wait on a connection whose peer silently vanished (no PING check)."""
    server = await serve(Recorder())
    proxy = FreezableProxy(server.port)
    port = await proxy.start()
    conn = await H2Connection.connect(
        "127.0.0.1",
        port,
        client_context,
        server_hostname="localhost",
        options=H2Options(ping_interval=0.2, ping_timeout=0.5),
    )
    try:
        assert (await conn.request("GET", "/", timeout=GUARD)).status == 200
        proxy.flowing.clear()
        with pytest.raises(ConnectionLost, match="PING"):
            async with asyncio.timeout(GUARD):
                await conn.request("GET", "/", timeout=60)
        assert not conn.is_usable
    finally:
        await conn.aclose()
        await proxy.aclose()


async def test_pool_spreads_over_connections(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """Throughput stays capped at one full connection despite max_connections."""
    handler = Recorder()
    handler.gate.clear()
    server = await serve(handler, initial_max_streams=5)
    options = H2Options(max_connections=2)
    async with H2Pool(
        "127.0.0.1", server.port, client_context, options=options
    ) as pool:
        tasks = [asyncio.create_task(pool.request("GET", "/hold")) for _ in range(10)]
        await asyncio.wait_for(handler.wait_for(10), GUARD)
        stats = pool.stats()
        assert stats.open_connections == 2
        assert stats.in_flight == 10
        assert stats.max_concurrent_streams == (5, 5)
        assert len({id(req.conn) for req in handler.seen}) == 2
        handler.gate.set()
        async with asyncio.timeout(GUARD):
            await asyncio.gather(*tasks)
        assert pool.stats().in_flight == 0


async def test_pool_reset_opens_a_fresh_connection(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """After an APNs key change, sends keep failing on the old connection."""
    handler = Recorder()
    server = await serve(handler)
    async with H2Pool("127.0.0.1", server.port, client_context) as pool:
        await pool.request("GET", "/one", timeout=GUARD)
        pool.reset()
        await pool.request("GET", "/two", timeout=GUARD)
    assert handler.seen[0].conn is not handler.seen[1].conn


async def test_pool_backs_off_when_server_is_down(
    client_context: ssl.SSLContext,
) -> None:
    """A provider outage turns into a storm of connection attempts."""
    attempts = 0

    async def refuse(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    listener = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    options = H2Options(reconnect_backoff=30, reconnect_backoff_max=60)
    try:
        async with H2Pool("127.0.0.1", port, client_context, options=options) as pool:
            for _ in range(20):
                with pytest.raises(ConnectError):
                    await pool.request("GET", "/", timeout=GUARD)
    finally:
        listener.close()
    assert attempts == 2  # one immediate retry, then the backoff holds


async def test_pool_close_fails_requests_waiting_for_a_connection(
    client_context: ssl.SSLContext,
) -> None:
    """Shutting a sender down mid-connect cancels its caller instead of failing."""
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    pool = H2Pool("127.0.0.1", port, client_context)
    try:
        waiting = asyncio.create_task(pool.request("GET", "/"))
        await until(lambda: pool.stats().connecting)
        await pool.aclose()
        with pytest.raises(ConnectError):
            await asyncio.wait_for(waiting, GUARD)
    finally:
        silent.close()


async def test_connect_requires_h2_alpn(
    serve: Serve, certs: SandboxCerts, client_context: ssl.SSLContext
) -> None:
    """A server without HTTP/2 gives a hang or an obscure error, not an ALPN one."""
    handler = Recorder()
    ctx = certs.server_ssl_context(alpn=["http/1.1"])
    server = SandboxServer("127.0.0.1", 0, ctx, handler, protocols=["http/1.1"])
    async with server:
        with pytest.raises(ConnectError, match="ALPN"):
            await connect(server, certs.client_ssl_context(alpn=["h2", "http/1.1"]))


def test_errors_share_one_base() -> None:
    """A sender catching TransportError misses some no-answer cases."""
    for error in (ConnectError, ConnectionLost, RequestTimeout):
        assert issubclass(error, TransportError)


ILLEGAL_HEADERS = [
    {"x\r\ninjected": "1"},
    {"x-value": "a\r\nx-injected: 1"},
    {"x-value": "nul\x00"},
    {"x-value": "\tpadded"},
    {"x-caf\u00e9": "1"},
    {":path": "/elsewhere"},
    {"connection": "close"},
    {"te": "gzip"},
]


@pytest.mark.parametrize("headers", ILLEGAL_HEADERS)
async def test_illegal_header_fails_alone_and_keeps_the_connection(
    serve: Serve, client_context: ssl.SSLContext, headers: dict[str, str]
) -> None:
    """One bad header would make the server close the connection under every push."""
    handler = Recorder()
    handler.gate.clear()
    server = await serve(handler)
    conn = await connect(server, client_context)
    held = [asyncio.create_task(conn.request("POST", "/hold")) for _ in range(3)]
    await asyncio.wait_for(handler.wait_for(3), GUARD)

    with pytest.raises(InvalidRequest) as caught:
        await conn.request("POST", "/bad", headers, b"x", timeout=GUARD)

    handler.gate.set()
    async with asyncio.timeout(GUARD):
        answered = await asyncio.gather(*held)
    assert [r.status for r in answered] == [200, 200, 200]
    assert isinstance(caught.value, ProtocolError)
    assert not caught.value.retryable
    assert "\r" not in str(caught.value)
    assert "\n" not in str(caught.value)
    assert "/bad" not in [req.path for req in handler.seen]
    assert conn.is_usable
    assert conn.in_flight == 0
    await conn.aclose()


async def test_legal_headers_of_every_shape_are_sent(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """A valid provider header would be refused by our own check."""
    handler = Recorder()
    server = await serve(handler)
    headers = {
        "Apns-Priority": "10",
        "apns-collapse-id": "a b~!",
        "x-empty": "",
        "te": "trailers",
        "authorization": "bearer " + "e30." * 40,
    }
    async with H2Pool(
        "127.0.0.1", server.port, client_context, server_hostname="localhost"
    ) as pool:
        response = await pool.request("POST", "/ok", headers, b"x", timeout=GUARD)
    assert response.status == 200
    assert handler.seen[0].headers["apns-collapse-id"] == "a b~!"


async def test_goaway_for_a_protocol_error_says_so(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """A connection closed for our protocol error would look like an outage."""

    async def handler(req: Request) -> Response:
        if req.path == "/poison":
            last = max((req.stream_id or 1) - 2, 0)
            req.conn.send_goaway(1, "malformed request", last_stream_id=last)
        return Response(200)

    server = await serve(handler)
    conn = await connect(server, client_context)
    with pytest.raises(ConnectionLost) as caught:
        await conn.request("POST", "/poison", timeout=GUARD)
    assert caught.value.protocol_error
    assert caught.value.retryable

    quiet = await serve(_shutdown)
    conn = await connect(quiet, client_context)
    with pytest.raises(ConnectionLost) as shutdown:
        await conn.request("POST", "/x", timeout=GUARD)
    assert not shutdown.value.protocol_error


async def _shutdown(req: Request) -> Response:
    req.conn.send_goaway(0, "Shutdown", last_stream_id=0)
    return Response(503)


def test_header_encoding_round_trips() -> None:
    """Saved encodings outlive a change of the HPACK table: the server would
    read other headers than were sent, or close the connection."""
    encoder = HeaderEncoder()
    decoder = hpack.Decoder()
    blocks: list[list[tuple[str, str]]] = []
    for i in range(300):
        block = [
            (":method", "POST"),
            (":scheme", "https"),
            (":authority", "api.example:443"),
            NeverIndexedHeaderTuple(":path", f"/3/device/{i:064x}"),
            ("authorization", "bearer " + "k" * (200 + i // 100)),  # renewed
            ("apns-topic", "com.example"),
            NeverIndexedHeaderTuple("apns-id", f"{i:08x}-0000-0000-0000-{i:012x}"),
            NeverIndexedHeaderTuple("apns-topic", "é" * (i % 3)),  # a table name
            ("x-long", "v" * (100 + i)),  # over 127 bytes; up to the table size
        ]
        if i % 7 == 0:
            block.append(("x-new", str(i)))  # a field the table must take in
        if i % 50 == 49:
            encoder.header_table_size = (0, 256, 4096)[i // 50 % 3]
        blocks.append(block)
    for block in blocks:
        decoded = decoder.decode(encoder.encode(block))
        assert [tuple(h) for h in decoded] == [tuple(h) for h in block]
        assert [h.indexable for h in decoded] == [
            not isinstance(h, NeverIndexedHeaderTuple) for h in block
        ]


def test_unique_headers_leave_the_table_alone() -> None:
    """A per-request value in the HPACK table evicts the reusable ones, which
    are then sent in full on every request."""
    encoder = HeaderEncoder()
    sizes = []
    for i in range(100):
        block = encoder.encode(
            [
                (":method", "POST"),
                NeverIndexedHeaderTuple(":path", f"/3/device/{i:064x}"),
                ("authorization", "bearer " + "k" * 200),
                NeverIndexedHeaderTuple("apns-id", f"{i:036x}"),
            ]
        )
        sizes.append(len(block))
    assert len(set(sizes[1:])) == 1
    assert sizes[0] - sizes[1] > 200  # authorization went in once


async def test_long_headers_and_unique_values_arrive_intact(
    serve: Serve, client_context: ssl.SSLContext
) -> None:
    """A header block over one frame (CONTINUATION frames), and never-indexed
    headers between indexed ones, reach the server as sent."""
    handler = Recorder()
    server = await serve(handler)
    options = H2Options(never_indexed=frozenset({"apns-id"}))
    async with H2Pool(
        "127.0.0.1",
        server.port,
        client_context,
        server_hostname="localhost",
        options=options,
    ) as pool:
        big = {"x-big": "b" * 40_000, "x-other": "c" * 20_000}
        response = await pool.request("POST", "/big", big, b"body", timeout=GUARD)
        assert response.status == 200
        async with asyncio.timeout(GUARD):
            await asyncio.gather(
                *(
                    pool.request(
                        "GET",
                        f"/n/{i}",
                        {"authorization": "bearer t", "apns-id": f"id-{i}"},
                    )
                    for i in range(50)
                )
            )
    assert handler.seen[0].headers["x-big"] == big["x-big"]
    assert handler.seen[0].headers["x-other"] == big["x-other"]
    assert handler.seen[0].body == b"body"
    for seen in handler.seen[1:]:
        assert seen.headers["apns-id"] == "id-" + seen.path.rsplit("/", 1)[1]
        assert seen.headers["authorization"] == "bearer t"


def test_header_decoding_matches_hpack() -> None:
    """A saved lookup outlives a change of the table: responses would carry
    another response's status or apns-id."""
    encoder = hpack.Encoder()
    ours, theirs = HeaderDecoder(65536), hpack.Decoder()
    for i in range(300):
        block = [
            (":status", ("200", "410", "429")[i % 3]),
            NeverIndexedHeaderTuple("apns-id", f"{i:036x}"),
            ("content-type", "application/json"),
            ("x-count", str(i // 4)),  # new every fourth response
            ("x-long", "v" * (100 + i)),
        ]
        if i % 50 == 49:
            encoder.header_table_size = (0, 256, 4096)[i // 50 % 3]
        data = encoder.encode(block, huffman=i % 2 == 0)
        mine, reference = ours.decode(data, raw=True), theirs.decode(data, raw=True)
        assert mine == reference
        assert [type(h) for h in mine] == [type(h) for h in reference]
        assert ours.header_table.dynamic_entries == theirs.header_table.dynamic_entries
    small = HeaderDecoder(100)
    with pytest.raises(hpack.OversizedHeaderListError):
        small.decode(hpack.Encoder().encode([("x", "y" * 200)]), raw=True)
