"""The WNS channel allow-list: which URIs may receive the app's bearer token."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pushstream.senders.allowlist import channel_problem

GOOD = [
    "https://db3.notify.windows.com/?token=AwYAAAB%2bQkZsq",
    "https://wns2-by3p.notify.windows.com/w/?token=BQYAAAD",
    "https://notify.windows.com/?token=x",
    "https://DM3P.Notify.Windows.COM/?token=x",
    "https://db3.notify.windows.com:443/?token=x",
]

BAD = [
    ("http://db3.notify.windows.com/?token=x", "https"),
    ("ftp://db3.notify.windows.com/", "https"),
    ("https://evil.example/?token=x", "not a WNS host"),
    ("https://db3.notify.windows.com.evil.example/", "not a WNS host"),
    ("https://evilnotify.windows.com/", "not a WNS host"),
    ("https://windows.com/", "not a WNS host"),
    ("https://user:pw@db3.notify.windows.com/", "user name"),
    ("https://evil.example@db3.notify.windows.com/", "user name"),
    ("https://evil.example\\@db3.notify.windows.com/", "backslash"),
    ("https://evil.example\\.notify.windows.com/", "backslash"),
    ("https://db3.notify.windows.com /", "whitespace"),
    ("https://db3.notify.windows.com\t/", "whitespace"),
    ("https://db3%2enotify.windows.com/", "plain letters"),
    ("https://db3.notify.windows.com:8443/", "port 443"),
    ("https://db3.notify.windows.com:99999/", "valid https URL"),
    ("https:///?token=x", "names a host"),
    ("https://db3.notify.windows.com./", "plain letters"),
    ("https://a..notify.windows.com/?token=x", "labels of 1 to 63"),
    ("https://.notify.windows.com/?token=x", "labels of 1 to 63"),
    ("https://" + "a" * 64 + ".notify.windows.com/?token=x", "labels of 1 to 63"),
    ("https://" + "a" * 60 + "." * 4 + "notify.windows.com/", "labels of 1 to 63"),
    ("https://" + ("a" * 60 + ".") * 4 + "notify.windows.com/", "at most 253"),
    ("https://db3.notify.windows.com/" + "a" * 2048, "at most 2048"),
]


@pytest.mark.parametrize("uri", GOOD)
def test_microsoft_channels_are_trusted(uri: str) -> None:
    """Windows devices with ordinary channel URIs could not register or get pushes."""
    assert channel_problem(uri) is None


@pytest.mark.parametrize(("uri", "why"), BAD)
def test_other_channels_are_refused_with_a_reason(uri: str, why: str) -> None:
    """A forged channel URI would receive the app's WNS bearer token."""
    problem = channel_problem(uri)
    assert problem is not None
    assert why in problem


def test_operator_listed_host_and_port_is_trusted() -> None:
    """The sandbox's WNS stand-in could not be used in a demo or test."""
    assert channel_problem("https://127.0.0.1:8443/ch?t=1", ["127.0.0.1:8443"]) is None
    assert channel_problem("https://[::1]:8443/ch", ["[::1]:8443"]) is None
    assert channel_problem("https://wns.test:9/ch", ["wns.test"]) is None
    assert channel_problem("https://wns.test/ch", ["wns.test:443"]) is None


def test_listed_host_dns_cannot_carry_is_refused() -> None:
    """Every send to it would fail to connect, and the channel would never be
    dropped, so it is refused at registration like any untrusted one."""
    assert channel_problem("https://wns..test/ch", ["wns..test"])
    long_label = "a" * 64 + ".test"
    assert channel_problem(f"https://{long_label}/ch", [long_label])
    assert channel_problem("https://wns.test./ch", ["wns.test."]) is None


def test_listed_host_on_another_port_is_refused() -> None:
    """A service on another port of a trusted host would receive the credential."""
    assert channel_problem("https://127.0.0.1:8444/ch", ["127.0.0.1:8443"])
    assert channel_problem("https://127.0.0.2:8443/ch", ["127.0.0.1:8443"])
    assert channel_problem("http://127.0.0.1:8443/ch", ["127.0.0.1:8443"])


def test_reason_never_repeats_the_channel_token() -> None:
    """The channel URI is the device token; it would leak into dead letters."""
    uri = "https://evil.example/?token=SECRETCHANNELTOKEN"
    problem = channel_problem(uri)
    assert problem is not None
    assert "SECRETCHANNELTOKEN" not in problem


@given(st.text(max_size=300))
def test_any_text_gets_an_answer(uri: str) -> None:
    """A strange channel URI would crash the registry instead of being refused."""
    problem = channel_problem(uri)
    if problem is None:
        host = uri.split("/")[2].split(":")[0].lower()
        assert uri.startswith("https://")
        assert host == "notify.windows.com" or host.endswith(".notify.windows.com")


@given(st.from_regex(r"https://[a-z0-9-]{1,20}\.evil\.example/\?token=[a-z]{1,9}"))
def test_no_lookalike_host_passes(uri: str) -> None:
    """A host that only resembles Microsoft's would receive the credential."""
    assert channel_problem(uri) is not None
