"""HTTP/2 on the wire for the sandbox server: h2's state, HPACK and field checks.

The sandbox answers thousands of requests a second beside the broker and the
worker, so the parts of h2 and hpack that cost most per request are replaced
here, with the same rules: request header blocks decoded by
:class:`RequestDecoder`, response headers encoded by :class:`ResponseEncoder`,
fields checked in one pass by :func:`field_problem` (RFC 9113 §8.2-8.3), and
:class:`H2ServerState`, h2's server state without its per-stream scans.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
import hpack.table
from hpack.huffman_table import decode_huffman
from hyperframe.frame import Frame, RstStreamFrame


class H2ServerState(h2.connection.H2Connection):
    """h2's server state without its per-stream scan of all open streams.

    h2 counts open inbound streams by scanning every stream before accepting
    a new one (O(streams in flight) per request) and ends the connection
    when the count passes SETTINGS_MAX_CONCURRENT_STREAMS. That would be a
    connection error where RFC 9113 §5.1.2 makes excess streams a stream
    error, and it would count streams opened in the same read that
    _H2Session is about to refuse. So _H2Session's limit is the only one
    (excess streams are refused with REFUSED_STREAM): the count h2 consults
    is always 0, and the scan, which also drops closed streams from h2's
    table, runs every PRUNE_EVERY-th new stream.
    """

    PRUNE_EVERY = 64
    _new_streams = 0

    @property
    def open_inbound_streams(self) -> int:
        self._new_streams += 1
        if not self._new_streams % self.PRUNE_EVERY:
            self._open_streams(1)  # client-initiated (odd) streams
        return 0

    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        """h2's own, without its trace log: that formats every frame received
        (``repr``), logged or not, which costs a few percent per request."""
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as exc:
            if not self._stream_is_closed_by_reset(exc.stream_id):
                raise
            reset = RstStreamFrame(exc.stream_id)
            reset.error_code = exc.error_code
            self._prepare_for_sending([reset])
            events = exc._events
            return events
        except h2.exceptions.StreamIDTooLowError as exc:
            if self._stream_is_closed_by_reset(exc.stream_id):
                reset = RstStreamFrame(exc.stream_id)
                reset.error_code = h2.errors.ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([reset])
                return []
            if self._stream_is_closed_by_end(exc.stream_id):
                raise h2.exceptions.StreamClosedError(exc.stream_id) from exc
            raise
        self._prepare_for_sending(frames)
        return events


class ResponseEncoder(hpack.Encoder):
    """HPACK for responses without the dynamic table or Huffman coding.

    A response's varying headers (apns-id, apns-unique-id) would replace one
    another in the table, and searching and filling it, and Huffman coding
    in pure Python, cost more than the bytes they save on loopback. Fields
    are sent as static-table indexes where RFC 7541's table has them, else
    as literals not added to any table; a table size the client sets is
    still acknowledged (RFC 7541 §4.2).
    """

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        block = bytearray()
        if self.header_table.resized:
            block += self._encode_table_size_change()
            self.header_table.resized = False
        for name, value in headers:
            name = name.encode() if isinstance(name, str) else name
            value = value.encode() if isinstance(value, str) else value
            block += _encoded_field(name, value)
        return bytes(block)


_STATIC_FIELDS = hpack.table.HeaderTable.STATIC_TABLE_MAPPING


def _encoded_field(name: bytes, value: bytes) -> bytes:
    """One field as RFC 7541 §6.1 (indexed) or §6.2.2 (literal, not indexed)."""
    static = _STATIC_FIELDS.get(name)
    if static is not None:
        index = static[1].get(value)
        if index is not None:
            return bytes(_hpack_encoded_integer(index, 7, 0x80))
        head = _hpack_encoded_integer(static[0], 4, 0x00)
    else:
        head = b"\x00" + _hpack_encoded_integer(len(name), 7, 0x00) + name
    return bytes(head + _hpack_encoded_integer(len(value), 7, 0x00) + value)


def _hpack_encoded_integer(value: int, prefix: int, flags: int) -> bytes:
    """An RFC 7541 §5.1 integer, ``flags`` in its first byte's other bits."""
    mask = (1 << prefix) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


H2_CONFIG = h2.config.H2Configuration(
    client_side=False,
    header_encoding=None,
    # Responses are built here with lowercase names: no outbound checks.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    # Requests are checked by field_problem, in one pass instead of h2's
    # seven generators.
    validate_inbound_headers=False,
)

_PSEUDO_HEADERS = frozenset({b":method", b":scheme", b":authority", b":path"})
_CONNECTION_HEADERS = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
    }
)
# The characters RFC 9113 §8.2.1 allows in a name: no controls, space,
# uppercase, non-ASCII, nor colon (pseudo-header names are looked up whole).
# ``name.translate(None, _NAME_CHARACTERS)`` leaves what is not allowed.
_NAME_CHARACTERS = bytes(c for c in range(0x21, 0x7F) if not 0x41 <= c <= 0x5A)
_NAME_CHARACTERS = _NAME_CHARACTERS.replace(b":", b"")
_BLANK = (0x20, 0x09)
# Fields found good before, for the life of the process and shared by all
# connections, so bounded in bytes: at most MAX_GOOD_FIELDS fields of at most
# MAX_GOOD_FIELD_BYTES each (a bearer JWT fits; a client's large unique
# values are checked each time instead of filling memory).
MAX_GOOD_FIELDS = 4096
MAX_GOOD_FIELD_BYTES = 512
_GOOD_FIELDS: set[tuple[bytes, bytes]] = set()  # (name, value) checked before


def field_problem(
    headers: Iterable[tuple[bytes, bytes]], trailers: bool = False
) -> str | None:
    """Why a request's header block is malformed (RFC 9113 §8.2-8.3), or None.

    A server answers a malformed request with a connection error, as h2's
    own checks did; these are the same checks in one pass. Ordinary fields
    found good before (most of them: a client repeats its headers) are only
    looked up.
    """
    pseudo: set[bytes] = set()
    regular = False
    method = None
    host = authority = None
    for pair in headers:
        name, value = pair
        if name[:1] == b":":
            if trailers or regular or name in pseudo or name not in _PSEUDO_HEADERS:
                return f"misplaced, repeated or unknown pseudo-header {name!r}"
            if _bad_value(value):
                return f"bad value in header {name!r}"
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
            continue
        regular = True
        if pair in _GOOD_FIELDS:
            continue
        if not name or name.translate(None, _NAME_CHARACTERS):
            return f"bad header name {name!r}"
        if _bad_value(value):
            return f"bad value in header {name!r}"
        if name in _CONNECTION_HEADERS:
            return f"connection-specific header {name!r}"
        if name == b"te" and value.lower() != b"trailers":
            return "te other than trailers"
        if name == b"host":
            if host is not None:
                return "more than one host header"
            host = value
        elif len(name) + len(value) <= MAX_GOOD_FIELD_BYTES:
            if len(_GOOD_FIELDS) >= MAX_GOOD_FIELDS:
                _GOOD_FIELDS.clear()  # rotated tokens still get remembered
            _GOOD_FIELDS.add(pair)
    if trailers:
        return None
    if method is None:
        return "no :method"
    if method == b"CONNECT":
        if b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT with :scheme or :path"
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        return "no :scheme or :path"
    if authority is None and host is None:
        return "neither :authority nor host"
    if authority is not None and host is not None and authority != host:
        return ":authority and host differ"
    return None


def _bad_value(value: bytes) -> bool:
    """A value with NUL, CR or LF, or starting or ending with blanks."""
    return bool(value) and (
        b"\n" in value
        or b"\r" in value
        or b"\x00" in value
        or value[0] in _BLANK
        or value[-1] in _BLANK
    )


class _CountingTable(hpack.table.HeaderTable):
    """A header table that counts additions, to tell when its contents change."""

    additions = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.additions += 1
        super().add(name, value)


class RequestDecoder(hpack.Decoder):
    """HPACK decoding (RFC 7541) for request headers, at a fraction of the cost.

    hpack's decoder builds a memoryview, a tuple object and a log call per
    field; this one reads the block with plain indexes and yields plain
    ``(name, value)`` tuples, which is all h2 needs. Huffman-coded strings
    (pure Python to decode) are remembered, since clients repeat them
    (``authorization``, ``:path``). And a whole block is remembered while the
    dynamic table is unchanged: a client repeating one request (h2load, a
    sender pushing to one device) then sends the same bytes, which mean the
    same headers.

    Both are kept per connection and bounded in bytes: at most MAX_BLOCKS
    blocks of at most MAX_BLOCK_BYTES (encoded, and decoded), and at most
    MAX_STRINGS strings of at most MAX_STRING_BYTES (Huffman-coded, about
    5/8 of the decoded size); larger ones are decoded each time.
    """

    MAX_BLOCKS = 32
    MAX_BLOCK_BYTES = 2048
    MAX_STRINGS = 256
    MAX_STRING_BYTES = 512

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size=max_header_list_size)
        self.header_table = _CountingTable()
        self._blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._table_state: tuple[int, int, int] = (-1, 0, 0)
        self._huffman: dict[bytes, bytes] = {}

    def decode(self, data: bytes, raw: bool = False) -> Iterable[hpack.HeaderTuple]:
        if not raw:  # h2 always asks for bytes
            return super().decode(data, raw)
        table = self.header_table
        assert isinstance(table, _CountingTable)
        state = (table.additions, table.maxsize, self.max_header_list_size)
        if state != self._table_state:
            self._blocks.clear()
            self._table_state = state
        else:
            known = self._blocks.get(data)
            if known is not None:
                return cast(list[hpack.HeaderTuple], list(known))
        headers, size = self._decode_block(data, table)
        unchanged = (table.additions, table.maxsize) == state[:2]
        if unchanged and len(data) + size <= self.MAX_BLOCK_BYTES:
            if len(self._blocks) >= self.MAX_BLOCKS:
                self._blocks.clear()
            self._blocks[bytes(data)] = headers
            headers = list(headers)
        return cast(list[hpack.HeaderTuple], headers)

    def _decode_block(
        self, data: bytes, table: hpack.table.HeaderTable
    ) -> tuple[list[tuple[bytes, bytes]], int]:
        """The block's fields, and their size as RFC 9113 §6.5.2 counts it."""
        headers: list[tuple[bytes, bytes]] = []
        size = 0
        limit = self.max_header_list_size
        i, end = 0, len(data)
        while i < end:
            first = data[i]
            if first & 0x80:  # indexed field
                index, i = _hpack_integer(data, i, 7)
                name, value = table.get_by_index(index)
            elif first & 0x40:  # literal, added to the table
                name, value, i = self._literal(data, i, 6, table)
                table.add(name, value)
            elif first & 0x20:  # dynamic table size update
                if headers:
                    msg = "table size update after a header field"
                    raise hpack.HPACKDecodingError(msg)
                new_size, i = _hpack_integer(data, i, 5)
                if new_size > self.max_allowed_table_size:
                    msg = "table size over the allowed maximum"
                    raise hpack.InvalidTableSizeError(msg)
                table.maxsize = new_size
                continue
            else:  # literal, not added (0x00) or never to be added (0x10)
                name, value, i = self._literal(data, i, 4, table)
            headers.append((name, value))
            size += 32 + len(name) + len(value)
            if size > limit:
                msg = f"a header list larger than {limit} bytes"
                raise hpack.OversizedHeaderListError(msg)
        if table.maxsize > self.max_allowed_table_size:
            msg = "table size over the allowed maximum"
            raise hpack.InvalidTableSizeError(msg)
        return headers, size

    def _literal(
        self, data: bytes, i: int, prefix: int, table: hpack.table.HeaderTable
    ) -> tuple[bytes, bytes, int]:
        index, i = _hpack_integer(data, i, prefix)
        if index:
            name = table.get_by_index(index)[0]
        else:
            name, i = self._string(data, i)
        value, i = self._string(data, i)
        return name, value, i

    def _string(self, data: bytes, i: int) -> tuple[bytes, int]:
        huffman = data[i] & 0x80
        length, i = _hpack_integer(data, i, 7)
        end = i + length
        if end > len(data):
            raise hpack.HPACKDecodingError("truncated header block")
        text = data[i:end]
        if huffman and length > self.MAX_STRING_BYTES:
            text = decode_huffman(text)
        elif huffman:
            decoded = self._huffman.get(text)
            if decoded is None:
                decoded = decode_huffman(text)
                if len(self._huffman) >= self.MAX_STRINGS:
                    self._huffman.clear()
                self._huffman[text] = decoded
            text = decoded
        return text, end


def _hpack_integer(data: bytes, i: int, prefix: int) -> tuple[int, int]:
    """An RFC 7541 §5.1 integer at ``data[i]`` with a ``prefix``-bit prefix:
    its value and the index after it."""
    mask = (1 << prefix) - 1
    value = data[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        if i >= len(data) or shift > 28:
            raise hpack.HPACKDecodingError("truncated or oversized integer")
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
