"""The sandbox TLS server and its run-time certificates."""

from __future__ import annotations

import asyncio
import random
import ssl
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import hpack
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
)

from pushstream.sandbox import h2wire
from pushstream.sandbox.certs import SandboxCerts, ensure_certs
from pushstream.sandbox.h2wire import RequestDecoder, ResponseEncoder, field_problem
from pushstream.sandbox.server import (
    MAX_HEADER_LIST_SIZE,
    Request,
    Response,
    SandboxServer,
)
from pushstream.senders.http2 import ConnectError, H2Connection, H2Options

GUARD = 10.0  # seconds: only to turn a hang into a failure


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SandboxCerts:
    folder = tmp_path_factory.mktemp("certs")
    return ensure_certs(folder, dns_names=["*.notify.windows.com"])


async def echo(req: Request) -> Response:
    seen = req.conn.state.setdefault("requests", 0) + 1
    req.conn.state["requests"] = seen
    headers = [
        ("x-method", req.method),
        ("x-path", req.path),
        ("x-version", req.http_version),
        ("x-seen-on-connection", str(seen)),
        ("x-duplicates", str(len(req.raw_headers) - len(req.headers))),
    ]
    return Response(201, headers, req.body)


async def http11_exchange(port: int, context: ssl.SSLContext, raw: bytes) -> bytes:
    """Send raw HTTP/1.1 bytes and read until the server closes or goes quiet."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    writer.write(raw)
    chunks = []
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 0.5)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


async def test_h2_request_reaches_handler(certs: SandboxCerts) -> None:
    """A stand-in misreads HTTP/2 requests and accepts what a provider rejects."""
    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), echo
    ) as server:
        conn = await H2Connection.connect(
            "127.0.0.1", server.port, certs.client_ssl_context()
        )
        headers = [("apns-id", "a"), ("apns-id", "b"), ("apns-topic", "t")]
        response = await conn.request("POST", "/3/device/ff", headers, b"{}")
        await conn.aclose()
    assert response.status == 201
    assert response.body == b"{}"
    assert response.headers["x-method"] == "POST"
    assert response.headers["x-path"] == "/3/device/ff"
    assert response.headers["x-version"] == "2"
    assert response.headers["x-duplicates"] == "1"


async def test_http11_keep_alive(certs: SandboxCerts) -> None:
    """WNS clients lose keep-alive, or per-connection state resets between requests."""
    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), echo
    ) as server:
        request = (
            b"POST /?token=abc HTTP/1.1\r\nHost: db3.notify.windows.com\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        data = await http11_exchange(
            server.port, certs.client_ssl_context(alpn=["http/1.1"]), request * 2
        )
    responses = data.split(b"HTTP/1.1 201 Created\r\n")
    assert len(responses) == 3, data
    assert b"x-version: 1.1" in responses[1]
    assert b"x-seen-on-connection: 1" in responses[1]
    assert b"x-seen-on-connection: 2" in responses[2]
    assert responses[2].endswith(b"hello")


async def test_http11_connection_close_ends_the_connection(
    certs: SandboxCerts,
) -> None:
    """A client asking to close waits for an end that never comes, or a
    request after it is answered on a connection both sides gave up."""
    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), echo
    ) as server:
        request = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n"
        data = await http11_exchange(
            server.port,
            certs.client_ssl_context(alpn=["http/1.1"]),
            request + b"Connection: close\r\n\r\n" + request + b"\r\n",
        )
    assert data.count(b"HTTP/1.1 201 Created\r\n") == 1
    assert b"connection: close\r\n" in data


async def test_http11_waiting_handler_keeps_requests_in_order(
    certs: SandboxCerts,
) -> None:
    """A request read while a slow answer is pending is lost or answered first."""

    async def slow_first(req: Request) -> Response:
        if req.path == "/slow":
            await asyncio.sleep(0.05)
        return await echo(req)

    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), slow_first
    ) as server:
        data = await http11_exchange(
            server.port,
            certs.client_ssl_context(alpn=["http/1.1"]),
            b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /fast HTTP/1.1\r\nHost: h\r\n\r\n",
        )
    assert data.index(b"x-path: /slow") < data.index(b"x-path: /fast")
    assert b"x-seen-on-connection: 2" in data


async def test_http11_rejects_chunked_body(certs: SandboxCerts) -> None:
    """A chunked body passes the WNS stand-in but fails against the real WNS."""
    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), echo
    ) as server:
        request = (
            b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        data = await http11_exchange(
            server.port, certs.client_ssl_context(alpn=["http/1.1"]), request
        )
    assert data.startswith(b"HTTP/1.1 400 ")


async def test_h2_only_server_refuses_http11(certs: SandboxCerts) -> None:
    """The APNs stand-in serves HTTP/1.1, which the real APNs refuses."""
    context = certs.server_ssl_context(alpn=["h2"])
    async with SandboxServer("127.0.0.1", 0, context, echo, protocols=["h2"]) as server:
        data = await http11_exchange(
            server.port,
            certs.client_ssl_context(alpn=["http/1.1"]),
            b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
    assert data == b""


async def test_slow_handlers_run_concurrently(certs: SandboxCerts) -> None:
    """One slow stream holds up the other requests on an HTTP/2 connection."""
    barrier = asyncio.Barrier(10)

    async def together(req: Request) -> Response:
        await barrier.wait()
        return Response(200)

    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), together
    ) as server:
        conn = await H2Connection.connect(
            "127.0.0.1", server.port, certs.client_ssl_context()
        )
        async with asyncio.timeout(GUARD):
            results = await asyncio.gather(
                *(conn.request("GET", "/") for _ in range(10))
            )
        await conn.aclose()
    assert [r.status for r in results] == [200] * 10


async def test_handler_error_becomes_500(certs: SandboxCerts) -> None:
    """A bug in a stand-in leaves the client hanging instead of answering 500."""

    async def broken(req: Request) -> Response:
        raise RuntimeError("bug")

    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), broken
    ) as server:
        conn = await H2Connection.connect(
            "127.0.0.1", server.port, certs.client_ssl_context()
        )
        response = await conn.request("GET", "/", timeout=GUARD)
        await conn.aclose()
    assert response.status == 500


async def test_initial_stream_limit_is_advertised(certs: SandboxCerts) -> None:
    """A new token connection to the APNs stand-in allows more than one stream."""
    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), echo, initial_max_streams=1
    ) as server:
        conn = await H2Connection.connect(
            "127.0.0.1", server.port, certs.client_ssl_context()
        )
        assert conn.max_concurrent_streams == 1
        await conn.aclose()


async def read_frames(
    reader: asyncio.StreamReader, done: Callable[[Frame], bool]
) -> list[Frame]:
    """Frames from the server up to one ``done`` is true of, or a GOAWAY."""
    buffer = b""
    frames: list[Frame] = []
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), GUARD)
        if not chunk:
            return frames
        buffer += chunk
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(buffer[9 : 9 + length]))
            buffer = buffer[9 + length :]
            frames.append(frame)
            if isinstance(frame, GoAwayFrame) or done(frame):
                return frames


async def test_streams_past_the_limit_are_refused_not_the_connection(
    certs: SandboxCerts,
) -> None:
    """Excess streams are a stream error (RFC 9113 §5.1.2): 200 opened in one
    write against a limit of 1 get 199 REFUSED_STREAM, and no GOAWAY ends
    the one in flight."""
    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), echo, initial_max_streams=1
    ) as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=certs.client_ssl_context(alpn=("h2",))
        )
        request = [*REQUEST, (b":authority", b"h")]
        block = hpack.Encoder().encode(request)
        ids = list(range(1, 400, 2))
        # Stream 1 stays open, waiting for its body, while the rest arrive.
        opened = [HeadersFrame(i, data=block, flags=["END_HEADERS"]) for i in ids]
        writer.write(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + SettingsFrame(0).serialize()
            + b"".join(f.serialize() for f in opened)
        )
        frames = await read_frames(reader, lambda f: f.stream_id == ids[-1])
        writer.write(
            SettingsFrame(0, flags=["ACK"]).serialize()
            + DataFrame(1, b"x", flags=["END_STREAM"]).serialize()
            + HeadersFrame(
                1001, data=block, flags=["END_HEADERS", "END_STREAM"]
            ).serialize()
        )
        frames += await read_frames(
            reader, lambda f: f.stream_id == 1001 and "END_STREAM" in f.flags
        )
        writer.close()
    assert not [f for f in frames if isinstance(f, GoAwayFrame)]
    refused = {
        f.stream_id
        for f in frames
        if isinstance(f, RstStreamFrame)
        and f.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    }
    assert refused == set(ids[1:])
    answered = {f.stream_id for f in frames if isinstance(f, HeadersFrame)}
    assert answered == {1, 1001}


async def test_client_certificate_required(certs: SandboxCerts) -> None:
    """APNs certificate auth: no client cert is required, or the handler sees none."""
    seen: list[bytes | None] = []

    async def who(req: Request) -> Response:
        seen.append(req.conn.peer_certificate)
        return Response(200)

    client = certs.issue_client_certificate(
        "apns-client",
        common_name="Apple Push Services: com.example",
        user_id="com.example",
    )
    context = certs.server_ssl_context(client_auth="required")
    options = H2Options(connect_timeout=GUARD)
    async with SandboxServer("127.0.0.1", 0, context, who) as server:
        with pytest.raises(ConnectError):
            await H2Connection.connect(
                "127.0.0.1", server.port, certs.client_ssl_context(), options=options
            )
        conn = await H2Connection.connect(
            "127.0.0.1",
            server.port,
            certs.client_ssl_context(client_cert=client),
            options=options,
        )
        assert (await conn.request("GET", "/", timeout=GUARD)).status == 200
        await conn.aclose()
    assert seen[0] is not None
    subject = x509.load_der_x509_certificate(seen[0]).subject
    assert subject.get_attributes_for_oid(NameOID.USER_ID)[0].value == "com.example"


def test_certs_are_reused_and_keys_private(tmp_path: Path) -> None:
    """Each run makes a new CA, keys are readable by others, or new hosts fail TLS."""
    first = ensure_certs(tmp_path)
    ca_pem = first.ca_cert.read_bytes()
    assert ensure_certs(tmp_path).ca_cert.read_bytes() == ca_pem
    for key in (first.ca_key, first.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600

    ensure_certs(tmp_path, dns_names=["*.notify.windows.com"])
    leaf = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "*.notify.windows.com" in san.value.get_values_for_type(x509.DNSName)
    assert "localhost" in san.value.get_values_for_type(x509.DNSName)


def test_broken_cert_files_are_replaced(tmp_path: Path) -> None:
    """A truncated certificate file stays in place and TLS to the sandbox fails."""
    certs = ensure_certs(tmp_path)
    certs.server_cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    ensure_certs(tmp_path)
    x509.load_pem_x509_certificate(certs.server_cert.read_bytes())


def test_request_decoder_matches_hpack() -> None:
    """A decoding slip gives handlers wrong headers, or refuses good requests."""
    rng = random.Random(7)
    names = [b":method", b":path", b"authorization", b"apns-id", b"x-a", b"accept"]

    def value() -> bytes:
        size = rng.choice([0, 3, 40, 300])
        return bytes(rng.choice(b"abcXYZ019-_ :/") for _ in range(size))

    for _ in range(100):
        encoder, reference = hpack.Encoder(), hpack.Decoder()
        decoder = RequestDecoder(MAX_HEADER_LIST_SIZE)
        for _ in range(20):
            if rng.random() < 0.05:
                encoder.header_table_size = rng.choice([0, 100, 4096])
            headers = [
                hpack.NeverIndexedHeaderTuple(name, value())
                if rng.random() < 0.2
                else (name, value())
                for name in rng.choices(names, k=rng.randint(1, 10))
            ]
            huffman = rng.random() < 0.5
            # Sent again, the headers come as the same block of table indexes.
            for _ in range(rng.choice([1, 3])):
                block = encoder.encode(headers, huffman=huffman)
                expected = [tuple(h) for h in reference.decode(block, raw=True)]
                assert list(decoder.decode(block, raw=True)) == expected


def test_truncated_header_block_is_an_error() -> None:
    block = hpack.Encoder().encode([(b"x-a", b"y" * 50)], huffman=True)
    for cut in range(1, len(block)):
        with pytest.raises((hpack.HPACKError, IndexError)):
            RequestDecoder(MAX_HEADER_LIST_SIZE).decode(block[:cut], raw=True)


REQUEST = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/3/device/ff")]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ([(b":authority", b"h"), (b"apns-topic", b"t")], None),
        ([(b"host", b"h"), (b"te", b"trailers")], None),
        ([(b":authority", b"h"), (b"Apns-Topic", b"t")], "bad header name"),
        ([(b":authority", b"h"), (b"x:y", b"t")], "bad header name"),
        ([(b":authority", b"h"), (b"", b"t")], "bad header name"),
        ([(b":authority", b"h"), (b"x", b" t")], "bad value"),
        ([(b":authority", b"h"), (b"x", b"a\r\nb")], "bad value"),
        ([(b":authority", b"h"), (b"connection", b"close")], "connection-specific"),
        ([(b":authority", b"h"), (b"te", b"gzip")], "te other"),
        ([(b"x", b"1"), (b":authority", b"h")], "pseudo-header"),
        ([(b":authority", b"h"), (b":path", b"/")], "pseudo-header"),
        ([(b":authority", b"h"), (b":status", b"200")], "pseudo-header"),
        ([(b"apns-topic", b"t")], "neither :authority nor host"),
        ([(b":authority", b"h"), (b"host", b"other")], "differ"),
        ([(b"host", b"h"), (b"host", b"h")], "more than one host"),
    ],
)
def test_malformed_requests_are_found(
    extra: list[tuple[bytes, bytes]], problem: str | None
) -> None:
    """A provider resets the connection of a malformed request (RFC 9113 §8.1.1)."""
    for _ in range(2):  # the second time, good fields are known
        found = field_problem(REQUEST + extra)
        assert (found is None) if problem is None else (problem in str(found))


def test_good_field_cache_is_bounded_in_bytes() -> None:
    """Unique large headers, even from requests later refused, must not grow
    the process for good (a client sent thousands of 60 KB values)."""
    for i in range(h2wire.MAX_GOOD_FIELDS + 100):
        extra = [(b":authority", b"h"), (b"x-big", b"%d" % i + b"v" * 60_000)]
        assert field_problem(REQUEST + extra) is None
    cached = h2wire._GOOD_FIELDS
    assert len(cached) <= h2wire.MAX_GOOD_FIELDS
    assert all(len(n) + len(v) <= h2wire.MAX_GOOD_FIELD_BYTES for n, v in cached)
    short = (b"authorization", b"bearer " + b"j" * 200)
    field_problem([*REQUEST, (b":authority", b"h"), short])
    assert short in cached  # a client's repeated token is still only looked up


def test_request_decoder_caches_are_bounded_in_bytes() -> None:
    """Large unique header strings and blocks are decoded, not remembered."""
    decoder = RequestDecoder(MAX_HEADER_LIST_SIZE)
    encoder = hpack.Encoder()
    encoder.header_table_size = 0  # blocks are remembered while the table holds
    for i in range(300):
        value = b"%d" % i + b"v" * 30_000
        block = encoder.encode([(b"x-big", value)], huffman=True)
        assert list(decoder.decode(block, raw=True)) == [(b"x-big", value)]
    cached_strings = sum(len(k) + len(v) for k, v in decoder._huffman.items())
    cached_blocks = sum(
        len(k) + sum(len(n) + len(v) for n, v in block)
        for k, block in decoder._blocks.items()
    )
    assert cached_strings <= decoder.MAX_STRINGS * 2 * decoder.MAX_STRING_BYTES
    assert cached_blocks <= decoder.MAX_BLOCKS * decoder.MAX_BLOCK_BYTES


def test_missing_pseudo_headers_are_found() -> None:
    assert field_problem([(b":scheme", b"https"), (b":path", b"/")]) == "no :method"
    assert field_problem([(b":method", b"GET"), (b"host", b"h")]) is not None
    assert field_problem([(b":method", b"POST"), *REQUEST[1:2], (b"host", b"h")])
    assert field_problem([*REQUEST[:2], (b":path", b""), (b"host", b"h")])
    assert field_problem([(b"x", b"1")], trailers=True) is None
    assert field_problem([(b":path", b"/")], trailers=True) is not None


async def test_malformed_request_ends_the_connection(certs: SandboxCerts) -> None:
    """An uppercase header name reaches the handler instead of a connection error."""
    served: list[Request] = []

    async def handler(req: Request) -> Response:
        served.append(req)
        return Response(200)

    async with SandboxServer(
        "127.0.0.1", 0, certs.server_ssl_context(), handler
    ) as server:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=certs.client_ssl_context(alpn=("h2",))
        )
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(
                validate_outbound_headers=False, normalize_outbound_headers=False
            )
        )
        client.initiate_connection()
        headers = [*REQUEST, (b":authority", b"h"), (b"X-Upper", b"1")]
        client.send_headers(1, headers, end_stream=True)
        writer.write(client.data_to_send())
        events: list[h2.events.Event] = []
        while data := await asyncio.wait_for(reader.read(65536), GUARD):
            events.extend(client.receive_data(data))
        writer.close()
    assert not served
    ended = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert ended
    assert ended[0].error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_response_encoder_is_read_by_hpack() -> None:
    """A client that misreads answers sees wrong statuses or apns-ids."""
    encoder, decoder = ResponseEncoder(), hpack.Decoder()
    for size in (4096, 100, 0):
        encoder.header_table_size = size  # as h2 does on the client's SETTINGS
        decoder.max_allowed_table_size = size
        for status in ("200", "410", "503"):
            headers = [
                (":status", status),
                ("content-type", "application/json"),
                ("apns-id", "x" * 130),
                ("x-" + "long" * 40, ""),
            ]
            block = encoder.encode(headers)
            decoded: list[Any] = [tuple(h) for h in decoder.decode(block)]
            assert decoded == headers
