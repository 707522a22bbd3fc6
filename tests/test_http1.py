"""The HTTP/1.1 pool against a small h11 server on loopback (plain and TLS).

Each request says with its ``x-mode`` header how the server treats it:
``ok`` answers and keeps the connection, ``close`` answers with
``Connection: close``, ``hangup`` answers and then closes without saying so,
``drop`` closes without answering, ``hold`` answers once the test opens the
gate, ``hang`` never answers (it waits for the client to hang up).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import h11
import pytest

from pushstream.sandbox.certs import SandboxCerts, ensure_certs
from pushstream.senders.http1 import (
    ConnectError,
    ConnectionLost,
    Http1Pool,
    InvalidRequest,
    RequestTimeout,
    Response,
)

GUARD = 10.0  # seconds: only to turn a hang into a failure


@dataclass
class Server:
    """Counts connections, records requests as (connection, x-seq)."""

    connections: int = 0
    open: int = 0
    peak: int = 0
    requests: list[tuple[int, str]] = field(default_factory=list)
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        number = self.connections
        self.open += 1
        self.peak = max(self.peak, self.open)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                head = await _next_event(conn, reader)
                if not isinstance(head, h11.Request):
                    break
                body = b""
                while not isinstance(
                    event := await _next_event(conn, reader), h11.EndOfMessage
                ):
                    assert isinstance(event, h11.Data)
                    body += event.data
                headers = {k.decode(): v.decode() for k, v in head.headers}
                self.requests.append((number, headers.get("x-seq", "")))
                async with self.changed:
                    self.changed.notify_all()
                mode = headers.get("x-mode", "ok")
                if mode == "hold":
                    await self.gate.wait()
                elif mode == "hang":
                    await reader.read()  # until the client hangs up
                    break
                elif mode == "drop":
                    break
                fields = [
                    ("content-length", str(len(body))),
                    ("x-connection", str(number)),
                ]
                if mode == "close":
                    fields.append(("connection", "close"))
                writer.write(
                    (conn.send(h11.Response(status_code=200, headers=fields)) or b"")
                    + (conn.send(h11.Data(data=body)) or b"")
                    + (conn.send(h11.EndOfMessage()) or b"")
                )
                if mode in ("close", "hangup"):
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()
            self.open -= 1
            async with self.changed:
                self.changed.notify_all()

    async def wait_open(self, count: int) -> None:
        """Wait until exactly ``count`` connections are open."""
        async with asyncio.timeout(GUARD), self.changed:
            await self.changed.wait_for(lambda: self.open == count)

    async def wait_requests(self, count: int) -> None:
        """Wait until the server has read ``count`` requests."""
        async with asyncio.timeout(GUARD), self.changed:
            await self.changed.wait_for(lambda: len(self.requests) >= count)


class HangingUp:
    """A blocking server in a thread: it answers each request with a plain
    keep-alive 200, then closes the connection at once.

    The test blocks on ``closed`` while the close travels, so the event loop
    has not read it when the next request takes the connection.
    """

    def __init__(self, context: ssl.SSLContext | None) -> None:
        self.context = context
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)  # to see ``stopping`` in time
        self.stopping = threading.Event()
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self.closed = threading.Semaphore(0)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                raw, _ = self.listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(GUARD)
            self.connections += 1
            try:
                with self._wrap(raw) as conn:
                    self._answer(conn)
            except OSError:
                pass
            self.closed.release()

    def _wrap(self, raw: socket.socket) -> socket.socket:
        if self.context is None:
            return raw
        return self.context.wrap_socket(raw, server_side=True)

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        while len(body) < length:
            body += conn.recv(65536)
        number = str(self.connections).encode()
        conn.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-connection: "
            + number
            + b"\r\n\r\nok"
        )

    def wait_closed(self) -> None:
        """Block, without running the event loop, until a connection closed."""
        assert self.closed.acquire(timeout=GUARD)
        time.sleep(0.05)  # the FIN reaches the client's socket

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(GUARD)
        self.listener.close()


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await reader.read(65536))


async def serve(context: ssl.SSLContext | None = None) -> Server:
    server = Server()
    server.server = await asyncio.start_server(
        server.handle, "127.0.0.1", 0, ssl=context
    )
    return server


async def shut(server: Server) -> None:
    server.gate.set()
    assert server.server is not None
    server.server.close()
    await server.server.wait_closed()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    running = await serve()
    try:
        yield running
    finally:
        await shut(running)


@pytest.fixture
async def pool() -> AsyncIterator[Http1Pool]:
    running = Http1Pool(None, max_connections=2, timeout=GUARD)
    try:
        yield running
    finally:
        await running.aclose()


async def post(
    pool: Http1Pool, server: Server, mode: str = "ok", seq: str = "", **options: float
) -> Response:
    headers = [("x-mode", mode), ("x-seq", seq)]
    return await pool.request(
        "127.0.0.1", server.port, "POST", "/?token=t", headers, b"hello", **options
    )


@pytest.fixture
def hanging_up() -> Iterator[HangingUp]:
    running = HangingUp(None)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SandboxCerts:
    return ensure_certs(tmp_path_factory.mktemp("certs"))


# --- keep-alive ----------------------------------------------------------------------


async def test_sequential_requests_share_one_connection(
    server: Server, pool: Http1Pool
) -> None:
    """Every send would pay for a new TCP (and TLS) connection."""
    answers = [await post(pool, server) for _ in range(5)]

    assert [a.status for a in answers] == [200] * 5
    assert {a.headers["x-connection"] for a in answers} == {"1"}
    assert answers[0].body == b"hello"
    assert server.connections == 1


async def test_connection_close_is_not_reused(server: Server, pool: Http1Pool) -> None:
    """A request would be written to a connection the server said it closes."""
    first = await post(pool, server, "close")
    second = await post(pool, server)

    assert (first.status, second.status) == (200, 200)
    assert server.connections == 2
    assert pool.connections("127.0.0.1", server.port) == 1


async def test_server_closing_an_idle_connection_is_survived(
    server: Server, pool: Http1Pool
) -> None:
    """A keep-alive connection the server closed would fail the next send."""
    assert (await post(pool, server, "hangup")).status == 200
    await server.wait_open(0)
    await asyncio.sleep(0.05)  # the client reads the end of the connection

    answer = await post(pool, server)

    assert answer.status == 200
    assert answer.headers["x-connection"] == "2"
    assert len(server.requests) == 2


async def test_close_not_yet_read_by_the_loop_is_survived(
    hanging_up: HangingUp, pool: Http1Pool
) -> None:
    """A server that hangs up right after a keep-alive answer would fail the
    next send with ConnectionLost (a retry counted as an outage)."""
    url = ("127.0.0.1", hanging_up.port, "POST", "/?token=t")
    first = await pool.request(*url, body=b"hello")
    hanging_up.wait_closed()

    second = await pool.request(*url, body=b"hello")

    assert (first.status, second.status) == (200, 200)
    assert second.headers["x-connection"] == "2"
    assert hanging_up.connections == 2


async def test_connection_lost_before_the_answer_is_not_resent(
    server: Server, pool: Http1Pool
) -> None:
    """A request the server may have acted on would be sent twice."""
    with pytest.raises(ConnectionLost):
        await post(pool, server, "drop")

    assert len(server.requests) == 1
    assert (await post(pool, server)).status == 200
    assert pool.connections("127.0.0.1", server.port) == 1


async def test_idle_connections_expire(server: Server) -> None:
    """Connections to a host no longer sent to would stay open for good."""
    pool = Http1Pool(None, idle_timeout=0.1)
    try:
        await post(pool, server)
        await server.wait_open(0)
        assert pool.connections("127.0.0.1", server.port) == 0
        assert (await post(pool, server)).status == 200
    finally:
        await pool.aclose()


# --- the limit -----------------------------------------------------------------------


async def test_limit_bounds_connections_and_waiters_go_in_order(
    server: Server, pool: Http1Pool
) -> None:
    """A burst would open a connection per send, or starve the first waiters."""
    tasks = [
        asyncio.create_task(post(pool, server, "hold", seq=str(i))) for i in range(6)
    ]
    await server.wait_requests(2)
    assert server.open == 2

    server.gate.set()
    async with asyncio.timeout(GUARD):
        answers = await asyncio.gather(*tasks)

    assert [a.status for a in answers] == [200] * 6
    assert server.peak == 2
    assert server.connections == 2
    assert [seq for _, seq in server.requests] == [str(i) for i in range(6)]


async def test_cancelled_waiter_gives_way(server: Server, pool: Http1Pool) -> None:
    """A caller that gave up would keep its place, or its connection, for good."""
    held = [asyncio.create_task(post(pool, server, "hold")) for _ in range(2)]
    await server.wait_requests(2)
    quitter = asyncio.create_task(post(pool, server, seq="quitter"))
    waiter = asyncio.create_task(post(pool, server, seq="waiter"))
    await asyncio.sleep(0.01)
    quitter.cancel()

    server.gate.set()
    async with asyncio.timeout(GUARD):
        await asyncio.gather(*held)
        assert (await waiter).status == 200

    assert quitter.cancelled()
    assert [seq for _, seq in server.requests][2:] == ["waiter"]
    assert pool.connections("127.0.0.1", server.port) == 2


# --- failures ------------------------------------------------------------------------


async def test_timeout_drops_the_connection(server: Server, pool: Http1Pool) -> None:
    """A host that never answers would hold the send, or its late answer
    would become the next request's."""
    with pytest.raises(RequestTimeout):
        await post(pool, server, "hang", timeout=0.2)

    answer = await post(pool, server)

    assert answer.status == 200
    assert answer.headers["x-connection"] == "2"
    assert pool.connections("127.0.0.1", server.port) == 1


@pytest.mark.parametrize(
    "host", ["a..notify.windows.com", "a" * 64 + ".notify.windows.com"]
)
async def test_host_dns_cannot_carry_is_a_connect_error(
    pool: Http1Pool, host: str
) -> None:
    """Name encoding fails with UnicodeError, not OSError: it would escape the
    pool as an unexpected error instead of a failed connection."""
    with pytest.raises(ConnectError):
        await pool.request(host, 443, "POST", "/", body=b"x")
    assert pool.connections(host, 443) == 0


async def test_refused_connection_is_a_connect_error(pool: Http1Pool) -> None:
    """A host that is down would look like a lost answer (maybe delivered)."""
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()

    with pytest.raises(ConnectError):
        await pool.request("127.0.0.1", port, "POST", "/", body=b"x")
    assert pool.connections("127.0.0.1", port) == 0


@pytest.mark.parametrize(
    "header",
    [
        ("Authorization", "Bearer s3cret\r\nInjected: 1"),
        ("X-Name", "caf\u00e9"),
        ("Content-Length", "3"),
    ],
)
async def test_bad_header_sends_nothing(
    server: Server, pool: Http1Pool, header: tuple[str, str]
) -> None:
    """A header h11 cannot write would reach the server, open a connection,
    or put its value (a bearer token) in the error."""
    with pytest.raises(InvalidRequest) as refused:
        await pool.request("127.0.0.1", server.port, "POST", "/", [header], b"x")

    assert "s3cret" not in str(refused.value)

    assert server.connections == 0
    assert pool.connections("127.0.0.1", server.port) == 0


async def test_aclose_ends_every_connection(server: Server) -> None:
    """Closing the sender would leave sockets open, or requests hanging."""
    pool = Http1Pool(None, max_connections=2, timeout=GUARD)
    await post(pool, server)
    in_flight = asyncio.create_task(post(pool, server, "hang"))
    await server.wait_requests(2)

    await pool.aclose()

    with pytest.raises(ConnectionLost):
        await in_flight
    with pytest.raises(ConnectError):
        await post(pool, server)
    await server.wait_open(0)
    await pool.aclose()


# --- TLS -----------------------------------------------------------------------------


async def test_tls_with_the_configured_ca(certs: SandboxCerts) -> None:
    """The pool would skip certificate checks, or not reuse TLS connections."""
    server = await serve(certs.server_ssl_context(alpn=("http/1.1",)))
    trusting = Http1Pool(certs.client_ssl_context(alpn=("http/1.1",)))
    stranger = Http1Pool(ssl.create_default_context())
    try:
        answers = [await post(trusting, server) for _ in range(3)]
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(stranger, server)
    finally:
        await trusting.aclose()
        await stranger.aclose()
        await shut(server)

    assert [a.body for a in answers] == [b"hello"] * 3
    assert {a.headers["x-connection"] for a in answers} == {"1"}


async def test_tls_close_not_yet_read_by_the_loop_is_survived(
    certs: SandboxCerts,
) -> None:
    """Under TLS the socket of a closed connection is readable too; reusing
    it would fail the next send with ConnectionLost."""
    server = HangingUp(certs.server_ssl_context(alpn=("http/1.1",)))
    pool = Http1Pool(certs.client_ssl_context(alpn=("http/1.1",)), timeout=GUARD)
    url = ("127.0.0.1", server.port, "POST", "/?token=t")
    try:
        first = await pool.request(*url, body=b"hello")
        server.wait_closed()
        second = await pool.request(*url, body=b"hello")
    finally:
        await pool.aclose()
        server.stop()

    assert (first.status, second.status) == (200, 200)
    assert second.headers["x-connection"] == "2"
