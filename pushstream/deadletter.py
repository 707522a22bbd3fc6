"""Building dead letters that always fit in one Kafka record.

A dead letter keeps the refused record's key and value so that an operator
can see what was refused. The input may be as large as the broker accepts
(1 MB by default), and keeping it whole would make the dead letter larger
still: JSON escapes double a value of quotes, base64 adds a third to a value
that is not UTF-8. The producer refuses a record over its limit, so the
refused input would be lost instead of kept.

So at most :data:`VALUE_KEPT` bytes of the value and :data:`KEY_KEPT` bytes of
the key are kept, and fewer when their JSON form would pass twice that
(control characters are escaped as six bytes each). A shortened value has
``value_truncated`` set; ``value_size`` is always the original size in bytes.
The worst case, about 600 KiB, is well under the producer's 1 MB limit.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Literal

from pushstream.events import DeadLetter

Encoding = Literal["utf-8", "base64"]

# Bytes of the original kept, and the most its JSON string form may take.
VALUE_KEPT = 256 * 1024
KEY_KEPT = 16 * 1024
VALUE_JSON_MAX = 2 * VALUE_KEPT
KEY_JSON_MAX = 2 * KEY_KEPT


@dataclass(frozen=True, slots=True)
class Kept:
    """What a dead letter keeps of a key or value."""

    raw: bytes | None
    text: str | None
    encoding: Encoding
    truncated: bool
    size: int | None


def keep(data: bytes | None, kept: int, json_max: int) -> Kept:
    """At most ``kept`` bytes of ``data``, as UTF-8 text when it is, else base64.

    ``raw`` is the kept prefix of the original bytes; ``text`` is never
    longer than ``json_max`` bytes once written as a JSON string. A cut
    never splits a UTF-8 character.
    """
    if data is None:
        return Kept(None, None, "utf-8", False, None)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raw = data[:kept]
        encoded = base64.b64encode(raw).decode("ascii")
        return Kept(raw, encoded, "base64", len(raw) < len(data), len(data))

    if len(data) > kept:
        text = data[:kept].decode("utf-8", errors="ignore")  # the split character
    text = _fit_json(text, json_max)
    raw = text.encode("utf-8")
    return Kept(raw, text, "utf-8", len(raw) < len(data), len(data))


def _fit_json(text: str, json_max: int) -> str:
    """The longest prefix of ``text`` whose JSON string takes at most ``json_max``."""
    size = _json_size(text)
    while size > json_max:
        text = text[: max(0, len(text) * json_max // size - 1)]
        size = _json_size(text)
    return text


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


def build(
    *,
    stage: str,
    error: str,
    source_topic: str,
    key: bytes | None,
    value: bytes | None,
    partition: int | None,
    offset: int | None,
    at_ms: int,
) -> tuple[bytes | None, DeadLetter]:
    """The dead-letters record: its key (the kept key bytes) and its value."""
    kept_key = keep(key, KEY_KEPT, KEY_JSON_MAX)
    kept_value = keep(value, VALUE_KEPT, VALUE_JSON_MAX)
    letter = DeadLetter(
        source_topic=source_topic,
        partition=partition,
        offset=offset,
        key=kept_key.text,
        key_encoding=kept_key.encoding,
        key_truncated=kept_key.truncated,
        key_size=kept_key.size,
        value=kept_value.text,
        value_encoding=kept_value.encoding,
        value_truncated=kept_value.truncated,
        value_size=kept_value.size,
        error=error,
        stage=stage,
        at_ms=at_ms,
    )
    return kept_key.raw, letter
