"""Requests and responses as the HTTP/2 transport sees them.

A request's headers (:data:`Headers`) must pass HTTP/2's field rules
(:func:`field_problem`) before they are sent: a server closes the whole
connection over one malformed request. An answer, whatever its status, is
one complete :class:`H2Response`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Headers = Mapping[str, str] | Iterable[tuple[str, str]]
"""Request headers: a mapping or (name, value) pairs. Names are lowercased."""


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
