"""The FCM stand-in's message size check, measured only when it can matter."""

from __future__ import annotations

import json

import pytest

from pushstream.sandbox.fcm_answers import Refusal
from pushstream.sandbox.fcm_message import MAX_MESSAGE_BYTES, check_message


def check(raw: str) -> str | None:
    """The refusal of a message (its text as sent), or None."""
    message = json.loads(raw)
    try:
        check_message(message, len(raw.encode()))
    except Refusal as refusal:
        return refusal.response.body.decode()
    return None


def message_text(numbers: int, token: str = "t" * 20) -> str:
    payload = ",".join(["1e15"] * numbers)
    return f'{{"token":"{token}","apns":{{"payload":{{"aps":{{"n":[{payload}]}}}}}}}}'


@pytest.mark.parametrize("numbers", [10, 200, 220, 230, 250, 400])
def test_message_growing_past_the_limit_is_refused(numbers: int) -> None:
    """1e15 is written back as 1000000000000000.0: a message small as sent can
    be over the limit as FCM counts it, and must still be refused."""
    raw = message_text(numbers)
    counted = json.loads(raw)
    del counted["token"]
    size = len(json.dumps(counted, separators=(",", ":")).encode())
    refusal = check(raw)
    if size > MAX_MESSAGE_BYTES:
        assert refusal is not None
        assert f"Message is too big: {size} bytes" in refusal
    else:
        assert refusal is None
