"""Logging for pushstream's processes: one handler on stderr, text or JSON lines.

:func:`setup` installs the handler (replacing a plain stderr handler that
``logging.basicConfig`` may have put there) with :class:`GuardFilter` and
:class:`RepeatFilter`, and sets the levels. The worker calls
:func:`setup_from_settings` (``log_level``, ``log_json``); every command gets
text at INFO (DEBUG with ``-v``) first.

What is logged where (house style): INFO for a state change (connected,
partitions assigned, token refreshed, breaker opened, shutdown), DEBUG for
each message, WARNING once per condition, ERROR when a task dies. Counts go
to metrics. Kafka's and Faust's libraries log a line per failed attempt
while the broker is away; :class:`RepeatFilter` lets one line of each kind
through every 30 seconds, with the count of those it dropped. Secrets
never: settings hold them as ``SecretStr``, whose repr is ``'**********'``.
A device token is shown only as :func:`shorten_token`. A message longer than
:data:`MESSAGE_MAX` characters is cut (:func:`cut_long`).

The HTTP libraries (httpx, httpcore, h2, hpack) log request URLs and header
blocks at DEBUG: an APNs URL holds a device token, a WNS URL is the channel
itself, and headers carry bearer tokens. Faust's ``faust.topics`` logger
prints the key and value of every record sent at DEBUG: sends, table
changelogs and token claims hold tokens. These loggers are set to WARNING and
the guard drops anything below WARNING from them even if someone turns their
level down again (``-v`` included).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from pydantic import TypeAdapter, ValidationError

from pushstream.config import ConfigError, Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TOKEN_SHOWN = 8

# Loggers that print request URLs or headers (tokens, channel URIs, bearers),
# and Faust's topic logger, which prints every record it sends at DEBUG.
GUARDED_LOGGERS = ("httpx", "httpcore", "h2", "hpack", "faust.topics")
# Loggers that are only noisy below WARNING: a line per fetch, per request.
QUIET_LOGGERS = ("aiokafka", "aiohttp.access")

# Loggers whose repeated warnings and errors are rate-limited: while the broker
# is unreachable, aiokafka logs every failed connection, fetch and metadata
# refresh, thousands of lines a second.
REPEAT_LIMITED_LOGGERS = ("aiokafka", "faust", "mode")
REPEAT_WINDOW_S = 30.0
REPEAT_KINDS_MAX = 1000
# The longest message kept whole. Faust's "wait_empty" warning lists every
# message still in hand on one line, hundreds of kilobytes during a long
# handover; many log shippers cut or drop lines that long.
MESSAGE_MAX = 4000

# The attribute that marks the handler this module installed.
_MARK = "_pushstream_handler"
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({})))


def shorten_token(token: str) -> str:
    """The first 8 characters of a token and an ellipsis: safe to print."""
    return token[:TOKEN_SHOWN] + "…"


class GuardFilter(logging.Filter):
    """Drops records below WARNING from the guarded loggers and their children,
    and hides the input that pydantic quotes in its errors.

    A ``ValidationError``'s text repeats part of the input it refused
    (``input_value='...'``), which may hold a token: wherever one reaches a
    log line, in the message or in a traceback (also as the context of
    another exception), the quoted input is replaced by ``<hidden>``.
    """

    def __init__(self, names: tuple[str, ...] = GUARDED_LOGGERS) -> None:
        super().__init__()
        self._names = names
        self._prefixes = tuple(name + "." for name in names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            name = record.name
            if name in self._names or name.startswith(self._prefixes):
                return False
        hide_input(record)
        cut_long(record)
        return True


class RepeatFilter(logging.Filter):
    """Lets the first warning or error of a kind through, then one per window.

    A kind is the logger and the message template before its arguments, so
    aiokafka's "Unable connect to node with id %s: %s" is one kind whatever
    the node and the error. The first line of a kind passes; more of its
    kind within ``window_s`` are counted and dropped; the first one after
    the window passes with the count appended ("... [412 more like this in
    30s]", and ``repeated`` in JSON lines). Only warnings and errors of
    ``names`` and their children are limited. Thread-safe: Faust's consumer
    logs from its own thread.
    """

    def __init__(
        self,
        names: tuple[str, ...] = REPEAT_LIMITED_LOGGERS,
        window_s: float = REPEAT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self._names = names
        self._prefixes = tuple(name + "." for name in names)
        self._window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        # kind -> [when its last line passed, lines dropped since]
        self._seen: dict[tuple[str, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        name = record.name
        if not (name in self._names or name.startswith(self._prefixes)):
            return True
        kind = (name, str(record.msg))
        with self._lock:
            now = self._clock()
            seen = self._seen.get(kind)
            if seen is not None and now - seen[0] < self._window_s:
                seen[1] += 1
                return False
            dropped = int(seen[1]) if seen is not None else 0
            since = now - seen[0] if seen is not None else 0.0
            self._forget_old(now)
            self._seen[kind] = [now, 0]
        if dropped:
            message = record.getMessage()
            record.msg = f"{message} [{dropped} more like this in {since:.0f}s]"
            record.args = None
            record.repeated = dropped
        return True

    def _forget_old(self, now: float) -> None:
        # Faust formats some messages itself, so kinds are not a closed set.
        if len(self._seen) < REPEAT_KINDS_MAX:
            return
        self._seen = {
            kind: seen
            for kind, seen in self._seen.items()
            if seen[1] or now - seen[0] < self._window_s
        }
        if len(self._seen) >= REPEAT_KINDS_MAX:
            self._seen.clear()


_INPUT_VALUE = re.compile(r"input_value=.*(, input_type=[\w.]+\])|input_value=.*")
_EXCEPTION_TEXT = logging.Formatter()


def hide_input(record: logging.LogRecord) -> None:
    """Replace pydantic's quotes of the input in a record's message and traceback."""
    if record.args or "input_value=" in str(record.msg):
        message = record.getMessage()
        if "input_value=" in message:
            record.msg, record.args = _hidden(message), None
    # Another handler may have formatted the traceback already.
    text = record.exc_text
    if not text and record.exc_info:
        text = _EXCEPTION_TEXT.formatException(record.exc_info)
    if text:
        record.exc_text = _hidden(text) if "input_value=" in text else text


def cut_long(record: logging.LogRecord, limit: int = MESSAGE_MAX) -> None:
    """Cut a record's message to ``limit`` characters, saying how many were cut."""
    if not record.args and len(str(record.msg)) <= limit:
        return
    message = record.getMessage()
    if len(message) > limit:
        cut = len(message) - limit
        record.msg, record.args = f"{message[:limit]}… ({cut} characters cut)", None


def _hidden(text: str) -> str:
    return _INPUT_VALUE.sub(lambda m: "input_value=<hidden>" + (m[1] or ""), text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, exception, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            entry["exception"] = record.exc_text
        elif record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = value
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup(
    level: int | str = logging.INFO,
    *,
    json_lines: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Log to ``stream`` (stderr) at ``level``, as text or JSON lines.

    Idempotent: a second call replaces the handler of the first. Handlers
    that others installed (a test's capture handler) are left alone, except
    a plain stderr handler from ``logging.basicConfig``, which would print
    every line twice.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False) or _is_basic_stderr(handler):
            root.removeHandler(handler)

    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT)
    )
    handler.addFilter(GuardFilter())
    handler.addFilter(RepeatFilter())
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())

    for name in GUARDED_LOGGERS + QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    return handler


def setup_from_settings(settings: Settings) -> logging.Handler:
    """:func:`setup` with ``log_level`` and ``log_json``; ``-v`` keeps DEBUG.

    Raises ConfigError naming PUSHSTREAM_LOG_LEVEL when the level is unknown.
    """
    level: int | str = settings.log_level.upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(
            f"PUSHSTREAM_LOG_LEVEL: unknown level {settings.log_level!r} "
            "(DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        )
    if logging.getLogger().level == logging.DEBUG:  # -v asks for DEBUG
        level = logging.DEBUG
    return setup(level, json_lines=settings.log_json)


def json_from_env() -> bool:
    """``PUSHSTREAM_LOG_JSON`` read as the settings read it (false if unset/bad).

    For the commands that log before, or without, loading the settings.
    """
    value = os.environ.get("PUSHSTREAM_LOG_JSON", "false")
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return False


def _is_basic_stderr(handler: logging.Handler) -> bool:
    return (
        type(handler) is logging.StreamHandler
        and getattr(handler, "stream", None) is sys.stderr
    )
