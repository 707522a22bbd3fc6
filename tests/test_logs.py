"""Logging setup: text or JSON lines, the guard on chatty loggers, short tokens."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from pushstream import log
from pushstream.config import ConfigError, Settings

TOKEN = "0123456789abcdef" * 4


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging set up into a string; the root logger restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {n: logging.getLogger(n).level for n in log.GUARDED_LOGGERS}
    out = io.StringIO()
    try:
        yield out
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        for name, old in levels.items():
            logging.getLogger(name).setLevel(old)


def test_shorten_token_keeps_eight_characters() -> None:
    """A full device token in a log lets anyone who reads it push to the device."""
    assert log.shorten_token(TOKEN) == "01234567…"
    assert log.shorten_token("abc") == "abc…"


@pytest.mark.parametrize(
    "name", ["httpx", "httpcore.http2", "h2.connection", "hpack.hpack", "faust.topics"]
)
def test_guarded_loggers_stay_quiet_below_warning(
    stream: io.StringIO, name: str
) -> None:
    """httpx prints the request URL, which holds the APNs token or WNS channel."""
    log.setup(logging.DEBUG, stream=stream)
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)  # someone turns it up again: the guard holds
    logger.debug("HTTP Request: POST https://api.push.apple.com/3/device/%s", TOKEN)
    logger.info("send: v=%s", TOKEN)
    logger.warning("connection lost")
    text = stream.getvalue()
    assert TOKEN not in text
    assert "connection lost" in text


def test_a_huge_message_is_cut_to_one_readable_line(stream: io.StringIO) -> None:
    """A line of hundreds of kilobytes is cut or dropped by log shippers."""
    log.setup(logging.INFO, stream=stream)
    waiting = ", ".join(f"(1, <Message: offset={n}>)" for n in range(20_000))
    logging.getLogger("faust.transport.consumer").warning(
        "wait_empty: Waiting for tasks %r", waiting
    )
    [line] = stream.getvalue().splitlines()
    assert "wait_empty: Waiting for tasks" in line
    assert line.endswith(" characters cut)")
    assert len(line) < log.MESSAGE_MAX + 200


def test_other_loggers_pass_at_their_level(stream: io.StringIO) -> None:
    """The guard must not swallow pushstream's own DEBUG lines when asked for."""
    log.setup(logging.DEBUG, stream=stream)
    logging.getLogger("pushstream.router").debug("notification %s routed", "n-1")
    logging.getLogger("h2x").debug("not an HTTP library of ours")
    text = stream.getvalue()
    assert "notification n-1 routed" in text
    assert "not an HTTP library of ours" in text


def test_json_lines_carry_level_logger_message_and_exception(
    stream: io.StringIO,
) -> None:
    """A log pipeline set to JSON would drop lines it cannot parse."""
    log.setup(logging.INFO, json_lines=True, stream=stream)
    logger = logging.getLogger("pushstream.test")
    logger.info("partitions assigned: %d", 4, extra={"worker": "w-1"})
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("agent died")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["level"] == "INFO"
    assert first["logger"] == "pushstream.test"
    assert first["message"] == "partitions assigned: 4"
    assert first["worker"] == "w-1"
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exception"]


def test_setup_twice_prints_each_line_once(stream: io.StringIO) -> None:
    """The CLI sets logging up, then the worker again with its settings."""
    log.setup(logging.INFO, stream=stream)
    log.setup(logging.INFO, stream=stream)
    logging.getLogger("pushstream.test").info("once")
    assert stream.getvalue().count("once") == 1


def test_setup_keeps_a_capture_handler() -> None:
    """Replacing every root handler would blind log capture in tests and tools."""
    root = logging.getLogger()
    capture = logging.Handler()
    root.addHandler(capture)
    try:
        log.setup(logging.INFO, stream=io.StringIO())
        assert capture in root.handlers
    finally:
        root.removeHandler(capture)
        for handler in list(root.handlers):
            if getattr(handler, "_pushstream_handler", False):
                root.removeHandler(handler)


def test_unknown_log_level_names_the_setting(stream: io.StringIO) -> None:
    """A typo in the level would otherwise crash the worker with a bare traceback."""
    with pytest.raises(ConfigError, match="PUSHSTREAM_LOG_LEVEL"):
        log.setup_from_settings(Settings(log_level="verbose"))


def test_log_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sandbox and the CLI must read PUSHSTREAM_LOG_JSON as the worker does."""
    for text, expected in [("true", True), ("1", True), ("no", False), ("x", False)]:
        monkeypatch.setenv("PUSHSTREAM_LOG_JSON", text)
        assert log.json_from_env() is expected
    monkeypatch.delenv("PUSHSTREAM_LOG_JSON")
    assert log.json_from_env() is False


def test_secret_settings_do_not_print() -> None:
    """A settings object logged or shown in a traceback must not reveal secrets."""
    settings = Settings(kafka_sasl_password="hunter2-secret")
    assert "hunter2-secret" not in repr(settings)
    assert "hunter2-secret" not in str(settings)


def test_pydantic_input_is_hidden_in_messages_and_tracebacks(
    stream: io.StringIO,
) -> None:
    """A refused event's token would reach the log through pydantic's error text."""
    from pydantic import BaseModel, ValidationError

    class Register(BaseModel):
        token: int

    log.setup(logging.INFO, stream=stream)
    logger = logging.getLogger("pushstream.test")
    try:
        Register(token=TOKEN)  # type: ignore[arg-type]  # refused on purpose
    except ValidationError as refused:
        try:
            raise RuntimeError("the dead letter was not written")
        except RuntimeError:
            logger.exception("agent crashed: %r", refused)
    text = stream.getvalue()
    assert TOKEN[:12] not in text
    assert "input_value=<hidden>, input_type=str]" in text
    assert "the dead letter was not written" in text


def test_repeated_kafka_errors_are_counted_not_printed(stream: io.StringIO) -> None:
    """A broker outage would write thousands of identical lines a second."""
    clock = [0.0]
    handler = log.setup(logging.INFO, stream=stream)
    for old in [f for f in handler.filters if isinstance(f, log.RepeatFilter)]:
        handler.removeFilter(old)
    handler.addFilter(log.RepeatFilter(window_s=30, clock=lambda: clock[0]))
    kafka = logging.getLogger("aiokafka")
    for second in range(60):
        clock[0] = float(second)
        for node in range(100):
            kafka.error("Unable connect to node with id %s: %s", node, "refused")
        kafka.error("Unable to update metadata from %s", [1])
    logging.getLogger("pushstream.worker").error("own error")
    logging.getLogger("pushstream.worker").error("own error")

    lines = stream.getvalue().splitlines()
    connect = [line for line in lines if "Unable connect" in line]
    assert len(connect) == 2
    assert connect[1].endswith("[2999 more like this in 30s]")
    assert len([line for line in lines if "update metadata" in line]) == 2
    assert len([line for line in lines if "own error" in line]) == 2


def test_the_first_line_of_a_kind_keeps_its_level(stream: io.StringIO) -> None:
    """A new kind of Kafka error would be hidden behind an older one."""
    log.setup(logging.INFO, stream=stream)
    logging.getLogger("aiokafka.consumer.fetcher").warning("Failed fetch %s", 1)
    logging.getLogger("aiokafka.consumer.fetcher").warning("Failed fetch %s", 2)
    logging.getLogger("faust.app").error("Heartbeat failed %s", 1)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert " WARNING aiokafka.consumer.fetcher: Failed fetch 1" in lines[0]
    assert " ERROR faust.app: Heartbeat failed 1" in lines[1]
