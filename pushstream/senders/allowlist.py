"""Which hosts a WNS channel URI may point at.

A WNS "token" is a URL the client got from Windows, and the sender posts the
app's bearer token to it. A channel URI that points anywhere else than
Microsoft's notification hosts would hand that credential to whoever runs the
host, so the registry refuses such a channel when a device registers, and the
WNS sender checks again before each send.

Trusted: ``https`` URLs on ``notify.windows.com`` or any of its subdomains
(Microsoft documents channels as ``https://<region>.notify.windows.com/...``
and asks senders not to pin the subdomain), on the default port, plus the
hosts an operator lists in ``Settings.wns_allowed_hosts`` (the sandbox): an
entry ``host:port`` trusts that port only, an entry ``host`` trusts the host
on any port.

The checks are stricter than a URL parser needs, because the parser that
checks and the HTTP client that sends must agree on the host: user info,
backslashes, percent signs and whitespace in the authority are refused, as
they are where parsers disagree. A host name DNS cannot carry (an empty
label, a label over 63 characters, a name over 253) is refused too, listed
or not: no connection to it can ever open, so the registry dead-letters it
rather than every send failing on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit

WNS_DOMAIN = "notify.windows.com"
CHANNEL_MAX_LENGTH = 2048
HOST_MAX_LENGTH = 253
LABEL_MAX_LENGTH = 63

_HOST_RE = re.compile(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$")
_UNSAFE_RE = re.compile(r"[\x00-\x20\x7f\\]")


def channel_problem(uri: str, allowed_hosts: Iterable[str] = ()) -> str | None:
    """Say why a WNS channel URI must not receive a credential, or None if it may.

    The reason names the host at most, never the URI (which is the token).
    """
    if len(uri) > CHANNEL_MAX_LENGTH:
        return f"a WNS channel URI is at most {CHANNEL_MAX_LENGTH} characters"
    if _UNSAFE_RE.search(uri):
        return "a WNS channel URI has no whitespace, control characters or backslashes"
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return "a WNS channel URI is a valid https URL"
    if parts.scheme != "https":
        return "a WNS channel URI is an https URL"
    if "@" in parts.netloc:
        return "a WNS channel URI carries no user name or password"
    host = (parts.hostname or "").lower()
    if not host:
        return "a WNS channel URI names a host"
    if not _is_dns_name(host):
        return (
            f"a WNS channel URI host has labels of 1 to {LABEL_MAX_LENGTH} "
            f"characters and at most {HOST_MAX_LENGTH} in all"
        )
    if _allowed(host, port, allowed_hosts):
        return None
    if not _HOST_RE.match(host):
        return "a WNS channel URI names its host in plain letters, digits, - and ."
    if host != WNS_DOMAIN and not host.endswith("." + WNS_DOMAIN):
        return f"{host[:100]} is not a WNS host (*.{WNS_DOMAIN})"
    if port not in (None, 443):
        return f"WNS channels are on port 443, not {port}"
    return None


def _is_dns_name(host: str) -> bool:
    """Whether DNS can carry this name; an IPv6 literal is not a name and passes.

    One trailing dot (the root) is how DNS writes a full name, so it is not
    an empty label here.
    """
    if ":" in host:
        return True
    name = host[:-1] if host.endswith(".") else host
    return len(name) <= HOST_MAX_LENGTH and all(
        0 < len(label) <= LABEL_MAX_LENGTH for label in name.split(".")
    )


def _allowed(host: str, port: int | None, allowed_hosts: Iterable[str]) -> bool:
    """Whether an operator listed this host (and port) as trusted."""
    for entry in allowed_hosts:
        try:
            listed = urlsplit("//" + entry.strip())
            listed_port = listed.port
        except ValueError:
            continue
        if (listed.hostname or "").lower() != host:
            continue
        if listed_port is None or listed_port == (port or 443):
            return True
    return False
