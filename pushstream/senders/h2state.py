"""h2's client connection state, made cheaper per request.

:class:`ClientState` is the sans-I/O ``h2`` connection that
:class:`~pushstream.senders.http2.H2Connection` drives. It keeps h2's stream
and connection state machines and flow-control accounting, but writes a
request's frames itself, and encodes headers with :class:`HeaderEncoder`: in
pure Python, h2's frame objects and hpack's table search cost more than the
rest of a request. h2 still parses everything the server sends.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
from h2.connection import AllowedStreamIDs, ConnectionInputs
from h2.stream import StreamInputs
from hpack import HeaderTuple
from hpack.hpack import encode_integer
from hpack.table import table_entry_size
from hyperframe.frame import Frame, GoAwayFrame

_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    # Request headers never pass through h2's checks: send_request_headers
    # writes them, after H2Connection.request lowercased every name, put the
    # pseudo-headers first and refused what field_problem refuses. Responses
    # are read by H2Connection._on_response, which takes any header name and
    # joins repeated ones; the providers send well-formed ones.
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
    validate_inbound_headers=False,
)


class ClientState(h2.connection.H2Connection):
    """h2's connection state with these changes for a client that multiplexes.

    h2 moves to CLOSED on GOAWAY and then rejects the responses still owed on
    streams up to last_stream_id, which RFC 9113 §6.8 says will complete.

    Before each new stream h2 counts the open ones by scanning all of them
    (which also drops closed ones): O(streams in flight) per request, up to
    1000 with APNs. H2Connection admits a stream only within the server's
    limit by its own count, so the scan runs on every PRUNE_EVERY-th stream,
    and H2Connection drops each answered stream itself
    (:meth:`forget_closed`).

    A request's frames are written without h2's frame objects
    (:meth:`send_request_headers`, :meth:`send_body`).
    """

    PRUNE_EVERY = 64
    _new_streams = 0

    def __init__(self) -> None:
        super().__init__(_CONFIG)
        self.encoder = HeaderEncoder()
        self.decoder = HeaderDecoder(self.decoder.max_header_list_size)

    @property
    def open_outbound_streams(self) -> int:
        self._new_streams += 1
        if self._new_streams % self.PRUNE_EVERY:
            return 0
        return super().open_outbound_streams

    def send_request_headers(
        self, stream_id: int, headers: Iterable[Any], authority: bytes, end: bool
    ) -> None:
        """Open ``stream_id`` with a request's headers; ``end``: no body.

        What ``send_headers`` does, with the same state changes, but the
        frames are written as bytes: h2's frame objects cost more than the
        rest of a request.
        """
        limit = self.remote_settings.max_concurrent_streams
        if self.open_outbound_streams + 1 > limit:
            raise h2.exceptions.TooManyStreamsError(f"{limit} streams are open")
        self.state_machine.process_input(ConnectionInputs.SEND_HEADERS)
        stream = self._begin_new_stream(stream_id, AllowedStreamIDs.ODD)
        stream.state_machine.process_input(StreamInputs.SEND_HEADERS)
        stream._authority = authority
        block = self.encoder.encode(headers)
        end_stream = 0
        if end:
            stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
            end_stream = _END_STREAM
        size = self.max_outbound_frame_size
        if len(block) <= size:
            self._data_to_send += _frame(
                _HEADERS, _END_HEADERS | end_stream, stream_id, block
            )
            return
        self._data_to_send += _frame(_HEADERS, end_stream, stream_id, block[:size])
        for start in range(size, len(block), size):
            flags = _END_HEADERS if start + size >= len(block) else 0
            chunk = block[start : start + size]
            self._data_to_send += _frame(_CONTINUATION, flags, stream_id, chunk)

    def forget_closed(self, stream_id: int) -> None:
        """Drop a closed stream now, as h2's stream count would later, so that
        the count scans only the streams in flight."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.closed:
            del self.streams[stream_id]
            self._closed_streams[stream_id] = stream.closed_by

    def send_body(self, stream_id: int, body: bytes) -> None:
        """Send all of ``body`` and end the stream. The caller has checked
        that it fits one frame and both flow-control windows."""
        stream = self.streams[stream_id]
        self.state_machine.process_input(ConnectionInputs.SEND_DATA)
        stream.state_machine.process_input(StreamInputs.SEND_DATA)
        stream.state_machine.process_input(StreamInputs.SEND_END_STREAM)
        stream.outbound_flow_control_window -= len(body)
        self.outbound_flow_control_window -= len(body)
        self._data_to_send += _frame(_DATA, _END_STREAM, stream_id, body)

    def _receive_goaway_frame(
        self, frame: GoAwayFrame
    ) -> tuple[list[Frame], list[h2.events.Event]]:
        event = h2.events.ConnectionTerminated()
        event.error_code = _error_code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4
_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length, type, flags, stream


def _frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    """One HTTP/2 frame (RFC 9113 4.1), unpadded."""
    size = len(payload)
    return _FRAME_HEADER.pack(size >> 8, size & 0xFF, kind, flags, stream_id) + payload


class HeaderEncoder(hpack.Encoder):
    """HPACK that reuses each field's encoding while the dynamic table holds
    still, and never Huffman-codes literals.

    Most of a request's fields are those of the one before (method, scheme,
    authority, authorization, apns-topic): once in the table each is one
    index, and that index stays right until the table changes. The fields
    that differ per request (``:path``, the options' ``never_indexed``
    names) never enter the table, so after the first requests it holds
    still and a field costs one dict lookup instead of hpack's table search
    (and its debug logging). Any change to the table or its size drops
    every saved encoding.

    In pure Python, Huffman coding a new value costs more than the rest of
    the request; the bytes it saves (about a fifth of a literal) are few.
    """

    def __init__(self) -> None:
        super().__init__()
        self._indexed: dict[tuple[str | bytes, str | bytes], bytes] = {}
        self._names: dict[str | bytes, bytes] = {}  # a never-indexed name's part

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._forget()
        hpack.Encoder.header_table_size.fset(self, value)  # type: ignore[attr-defined]

    def encode(self, headers: Any, huffman: bool = False) -> bytes:
        """Encode (name, value) pairs of str or bytes; a NeverIndexedHeaderTuple
        is sent as a never-indexed literal."""
        block = []
        table = self.header_table
        if table.resized:
            block.append(self._encode_table_size_change())
            table.resized = False
        indexed = self._indexed
        for header in headers:
            if isinstance(header, HeaderTuple) and not header.indexable:
                name, value = header
                prefix = self._names.get(name)
                if prefix is None:
                    prefix = self._names[name] = self._never_indexed_name(name)
                raw = _bytes(value)
                block.append(prefix + _length(len(raw)) + raw)
                continue
            encoded = indexed.get(header)
            if encoded is None:
                field = (_bytes(header[0]), _bytes(header[1]))
                encoded = self.add(field, False, False)
                if encoded[0] & 0x80:  # an index: the table did not change
                    indexed[header] = encoded
                else:  # a literal added to the table: indexes moved
                    self._forget()
            block.append(encoded)
        return b"".join(block)

    def _never_indexed_name(self, text: str | bytes) -> bytes:
        """RFC 7541 6.2.3: the name as a table index if there is one, else
        a literal. Values are never looked up: they are unique anyway."""
        name = _bytes(text)
        table = self.header_table
        static = table.STATIC_TABLE_MAPPING.get(name)
        index = static[0] if static else 0
        if not index:
            for i, (entry, _) in enumerate(table.dynamic_entries):
                if entry == name:
                    index = i + table.STATIC_TABLE_LENGTH + 1
                    break
        if index:
            prefix = encode_integer(index, 4)
            prefix[0] |= 0x10
            return bytes(prefix)
        return b"\x10" + _length(len(name)) + name

    def _forget(self) -> None:
        self._indexed.clear()
        self._names.clear()


class HeaderDecoder(hpack.Decoder):
    """hpack's decoding of the raw (bytes) fields h2 asks for, without the
    pass that copies every decoded field, and with a field sent as a one-byte
    table index looked up once while the table holds still."""

    def __init__(self, max_header_list_size: int) -> None:
        super().__init__(max_header_list_size)
        self._indexed: dict[int, HeaderTuple] = {}

    @property
    def header_table_size(self) -> int:
        return self.header_table.maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._indexed.clear()
        self.header_table.maxsize = value

    def decode(self, data: bytes, raw: bool = False) -> list[HeaderTuple]:
        """hpack's ``Decoder.decode``; ``raw`` must be true (h2's call)."""
        if not raw:
            raise ValueError("HeaderDecoder decodes raw headers only")
        view = memoryview(data)
        indexed = self._indexed
        headers: list[HeaderTuple] = []
        inflated = 0
        at = 0
        while at < len(data):
            first = data[at]
            header: HeaderTuple | None
            if first & 0x80:  # indexed; 0xff starts a multi-byte index
                header = indexed.get(first)
                consumed = 1
                if header is None:
                    header, consumed = self._decode_indexed(view[at:])
                    if consumed == 1:
                        indexed[first] = header
            elif first & 0x40:  # a literal the table takes in: indexes move
                header, consumed = self._decode_literal_index(view[at:])
                indexed.clear()
            elif first & 0x20:
                if headers:
                    msg = "Table size update not at the start of the block"
                    raise hpack.HPACKDecodingError(msg)
                consumed = self._update_encoding_context(view[at:])
                header = None
            else:
                header, consumed = self._decode_literal_no_index(view[at:])
            if header is not None:
                headers.append(header)
                inflated += table_entry_size(header[0], header[1])
                if inflated > self.max_header_list_size:
                    msg = f"a header list over {self.max_header_list_size} bytes"
                    raise hpack.OversizedHeaderListError(msg)
            at += consumed
        self._assert_valid_table_size()
        return headers


def _bytes(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode()


def _length(size: int) -> bytes:
    """An HPACK string length (7-bit prefix, no Huffman flag)."""
    if size < 127:
        return bytes((size,))
    return bytes(encode_integer(size, 7))


def _error_code(code: int) -> h2.errors.ErrorCodes | int:
    try:
        return h2.errors.ErrorCodes(code)
    except ValueError:
        return code
