"""The WNS client against the WNS sandbox: real TLS, HTTP/1.1, both token flows."""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from pushstream.config import ConfigError, Settings, load_settings
from pushstream.events import Notification, Send
from pushstream.sandbox.certs import SandboxCerts, ensure_certs
from pushstream.sandbox.server import (
    ConnectionContext,
    Request,
    Response,
    SandboxServer,
)
from pushstream.sandbox.wns import WnsSandbox
from pushstream.senders import wns, wns_auth
from pushstream.senders.result import SendResult, Target

LIVE_APP = "Contoso.Sandbox"
ENTRA_APP = "Contoso.SandboxDesktop"
NOW_MS = 1_700_000_000_000


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SandboxCerts:
    return ensure_certs(tmp_path_factory.mktemp("certs"))


@dataclass
class Rig:
    sandbox: WnsSandbox
    server: SandboxServer
    settings: Settings
    client: wns.WnsClient
    env: dict[str, str] = field(default_factory=dict)


async def start_sandbox(certs: SandboxCerts, **options: Any) -> SandboxServer:
    sandbox = WnsSandbox(**options)
    server = sandbox.server(certs)
    await server.start()
    sandbox.base_url = f"https://127.0.0.1:{server.port}"
    return server


def settings_for(
    sandbox: WnsSandbox,
    certs: SandboxCerts,
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    **extra: str,
) -> tuple[Settings, dict[str, str]]:
    """Settings read from the environment, as a worker reads them."""
    env = sandbox.make_credentials(folder)
    env["PUSHSTREAM_ENDPOINTS__CA_FILE"] = str(certs.ca_cert)
    env |= extra
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(), env


@pytest.fixture
def sandbox_options() -> dict[str, Any]:
    return {}


@pytest.fixture
async def rig(
    certs: SandboxCerts,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    sandbox_options: dict[str, Any],
) -> AsyncIterator[Rig]:
    server = await start_sandbox(certs, **sandbox_options)
    sandbox = handler_of(server)
    settings, env = settings_for(sandbox, certs, tmp_path / "creds", monkeypatch)
    client = wns.WnsClient.from_settings(settings)
    try:
        async with client:
            yield Rig(sandbox, server, settings, client, env)
    finally:
        await server.aclose()


def handler_of(server: SandboxServer) -> WnsSandbox:
    owner = getattr(server.handler, "__self__", None)
    assert isinstance(owner, WnsSandbox)
    return owner


def make_send(channel: str, app: str = LIVE_APP, **content: Any) -> Send:
    content = content or {"title": "Hello", "body": "World"}
    n = Notification.model_validate({"id": "n1", **content})
    target = Target(platform="wns", token=channel, app=app, device_id="d1")
    rendered = wns.render(n, target, NOW_MS, None)
    return Send(
        send_id="n1:d1",
        notification_id="n1",
        device_id="d1",
        platform="wns",
        app=app,
        token=channel,
        accepted_at_ms=NOW_MS,
        headers=rendered.headers,
        body=rendered.body,
    )


# --- answers -----------------------------------------------------------------------


async def test_toast_is_delivered(rig: Rig) -> None:
    """A toast to a live channel would not arrive, or arrive unreadable."""
    channel = rig.sandbox.channel_uri(LIVE_APP)

    result = await rig.client.send(make_send(channel, title="Tom & Jerry <3"))

    assert result.outcome == "delivered"
    assert result.reason == "received"
    [record] = rig.sandbox.accepted
    assert record["provider_id"] == result.provider_id
    assert record["token"] == channel
    assert record["app"] == LIVE_APP
    assert record["xml_ok"] is True
    assert "Tom &amp; Jerry &lt;3" in record["body"]
    assert record["headers"]["x-wns-type"] == "wns/toast"
    assert record["headers"]["ms-cv"]


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        ("expired", SendResult("invalid_token", "channel_expired", 410)),
        ("unknown", SendResult("invalid_token", "channel_not_found", 404)),
        ("throttled", SendResult("retry", "throttled", 406, retry_after=30.0)),
        ("dropped", SendResult("dropped", "dropped", 200)),
        ("channelthrottled", SendResult("retry", "channel_throttled", 200)),
        ("unavailable", SendResult("retry", "unavailable", 503, retry_after=30.0)),
        ("failing", SendResult("retry", "internal_error", 500)),
    ],
)
async def test_scenario_channels(rig: Rig, scenario: str, expected: SendResult) -> None:
    """A dead channel would be kept, or a throttled send dropped instead of retried."""
    channel = rig.sandbox.channel_uri(LIVE_APP, scenario)

    result = await rig.client.send(make_send(channel))

    assert result.provider_id  # X-WNS-Msg-ID comes with every answer
    assert (result.outcome, result.reason, result.status, result.retry_after) == (
        expected.outcome,
        expected.reason,
        expected.status,
        expected.retry_after,
    )
    assert rig.sandbox.accepted == []


async def test_oversized_body_fails_with_413(rig: Rig) -> None:
    """A body over 5000 bytes would be retried forever."""
    send = make_send(rig.sandbox.channel_uri(LIVE_APP), wns={"type": "raw", "raw": "x"})
    send = send.model_copy(update={"body": "x" * 5001})

    result = await rig.client.send(send)

    assert (result.outcome, result.status) == ("failed", 413)
    assert result.reason.startswith("payload_too_large")


async def test_wrong_content_type_fails_with_the_description(rig: Rig) -> None:
    """An operator would not learn which header WNS refused."""
    send = make_send(rig.sandbox.channel_uri(LIVE_APP))
    headers = send.headers | {"Content-Type": "application/octet-stream"}

    result = await rig.client.send(send.model_copy(update={"headers": headers}))

    assert (result.outcome, result.status) == ("failed", 400)
    assert result.reason == "bad_request: The Content-Type does not match wns/toast."


async def test_channel_of_another_app_is_forbidden(rig: Rig) -> None:
    """A channel registered under the wrong app would be reported as delivered."""
    channel = rig.sandbox.channel_uri(ENTRA_APP)

    result = await rig.client.send(make_send(channel, app=LIVE_APP))

    assert (result.outcome, result.status) == ("failed", 403)
    assert result.reason.startswith("forbidden")


async def test_outage_is_retried(rig: Rig) -> None:
    """A WNS outage would fail sends for good instead of retrying them."""
    rig.sandbox.outage = True

    result = await rig.client.send(make_send(rig.sandbox.channel_uri(LIVE_APP)))

    assert (result.outcome, result.reason, result.status) == (
        "retry",
        "unavailable",
        503,
    )


async def test_unknown_app_fails_without_a_request(rig: Rig) -> None:
    """A send for an app without credentials would reach WNS or crash the sender."""
    channel = rig.sandbox.channel_uri("Fabrikam.Other")

    result = await rig.client.send(make_send(channel, app="Fabrikam.Other"))

    assert (result.outcome, result.reason) == ("failed", "unknown_app")
    assert sum(rig.sandbox.stats.values()) == 0


# --- access tokens -----------------------------------------------------------------


async def test_one_token_serves_many_sends_of_two_apps(rig: Rig) -> None:
    """Each send would fetch its own token, or use another app's token."""
    sends = [
        make_send(rig.sandbox.channel_uri(app), app=app)
        for app in [LIVE_APP, ENTRA_APP] * 10
    ]

    results = await asyncio.gather(*(rig.client.send(s) for s in sends))

    assert [r.outcome for r in results] == ["delivered"] * 20
    assert rig.sandbox.token_requests == {"live": 1, "entra": 1}
    apps = {r["token"]: r["app"] for r in rig.sandbox.accepted}
    assert apps == {s.token: s.app for s in sends}


async def test_expired_token_is_refreshed_once(rig: Rig) -> None:
    """Sends would fail for a day after WNS ended the access token."""
    channel = rig.sandbox.channel_uri(LIVE_APP)
    assert (await rig.client.send(make_send(channel))).outcome == "delivered"

    assert rig.sandbox.expire_tokens(LIVE_APP) == 1
    result = await rig.client.send(make_send(channel))

    assert result.outcome == "delivered"
    assert rig.sandbox.token_requests["live"] == 2
    assert rig.sandbox.stats["401"] == 1


@pytest.mark.parametrize(
    "sandbox_options",
    # Every clock reading is a day and a bit later than the last: every token
    # has expired by the time it is used.
    [{"clock": itertools.count(0, 100_000).__next__}],
)
async def test_token_refused_after_refresh_fails(rig: Rig) -> None:
    """A token WNS keeps refusing would be refreshed in a loop."""
    result = await rig.client.send(make_send(rig.sandbox.channel_uri(LIVE_APP)))

    assert (result.outcome, result.status) == ("failed", 401)
    assert result.reason == "token_expired: Token expired."
    assert rig.sandbox.token_requests["live"] == 2
    assert rig.sandbox.stats["401"] == 2


@pytest.mark.parametrize(
    "sandbox_options",
    [{"entra_string_numbers": False}, {"entra_string_numbers": True}],
)
async def test_entra_id_flow(rig: Rig) -> None:
    """A Windows App SDK app would get no token (numbers as strings included)."""
    result = await rig.client.send(
        make_send(rig.sandbox.channel_uri(ENTRA_APP), app=ENTRA_APP)
    )

    assert result.outcome == "delivered"
    assert rig.sandbox.token_requests == {"entra": 1}


async def test_wrong_secret_fails_without_reaching_the_channel(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong client secret would be retried forever, or hidden from the operator."""
    apps = json.loads(rig.env["PUSHSTREAM_WNS"])
    secret_file = Path(apps[0]["client_secret_file"])
    await asyncio.to_thread(secret_file.write_text, "not-the-secret\n")
    client = wns.WnsClient.from_settings(load_settings())

    async with client:
        result = await client.send(make_send(rig.sandbox.channel_uri(LIVE_APP)))

    assert result.outcome == "failed"
    assert result.reason.startswith("access_token: token endpoint answered 400")
    assert "invalid_client" in result.reason
    assert "not-the-secret" not in result.reason
    assert sum(rig.sandbox.stats.values()) == 0


@pytest.mark.parametrize("auth", ["live", "entra"])
async def test_wrong_entra_or_live_secret_is_refused_by_the_sandbox(
    rig: Rig, auth: str
) -> None:
    """The sandbox would hand out tokens for any secret, hiding credential bugs."""
    app = next(a for a in json.loads(rig.env["PUSHSTREAM_WNS"]) if a["auth"] == auth)
    url = (
        rig.sandbox.base_url + "/accesstoken.srf"
        if auth == "live"
        else f"{rig.sandbox.base_url}/{app['tenant_id']}/oauth2/v2.0/token"
    )
    scope = wns_auth.LIVE_SCOPE if auth == "live" else wns_auth.ENTRA_SCOPE
    form = {
        "grant_type": "client_credentials",
        "client_id": app["client_id"],
        "client_secret": "wrong",
        "scope": scope,
    }
    async with raw_client(rig) as http:
        response = await http.post(url, data=form)

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_client"


async def test_unreadable_secret_file_names_the_setting(rig: Rig) -> None:
    """A missing secret file would surface at the first send, not at start-up."""
    apps = json.loads(rig.env["PUSHSTREAM_WNS"])
    await asyncio.to_thread(Path(apps[1]["client_secret_file"]).unlink)
    client = wns.WnsClient.from_settings(load_settings())

    with pytest.raises(ConfigError, match="PUSHSTREAM_WNS__1__CLIENT_SECRET_FILE"):
        await client.start()
    await client.aclose()


# --- the allow-list ----------------------------------------------------------------


@dataclass
class Listener:
    """A plain TCP listener that counts the connections it gets."""

    connections: int = 0
    server: asyncio.Server | None = None

    async def accept(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self.connections += 1
        writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    spy = Listener()
    spy.server = await asyncio.start_server(spy.accept, "127.0.0.1", 0)
    try:
        yield spy
    finally:
        spy.server.close()
        await spy.server.wait_closed()


@pytest.mark.parametrize("scheme", ["https", "http"])
async def test_untrusted_channel_gets_no_request(
    rig: Rig, listener: Listener, scheme: str
) -> None:
    """The app's bearer token would be sent to a host that is not WNS."""
    allowed = [*rig.settings.wns_allowed_hosts]
    if scheme == "http":
        allowed.append(f"127.0.0.1:{listener.port}")  # only the scheme is wrong
    settings = rig.settings.model_copy(update={"wns_allowed_hosts": tuple(allowed)})
    channel = f"{scheme}://127.0.0.1:{listener.port}/?token=AwYAAAB.stolen"

    async with wns.WnsClient.from_settings(settings) as client:
        result = await client.send(make_send(channel))

    assert (result.outcome, result.reason) == ("failed", "untrusted_channel")
    assert listener.connections == 0
    assert rig.sandbox.token_requests == {}


@pytest.mark.parametrize(
    "host", ["a..notify.windows.com", "a" * 64 + ".notify.windows.com"]
)
async def test_channel_host_dns_cannot_carry_is_untrusted(rig: Rig, host: str) -> None:
    """No connection to it can open: every send would be retried five times
    and end retries_exhausted, and the channel would never be dropped."""
    async with wns.WnsClient.from_settings(rig.settings) as client:
        result = await client.send(make_send(f"https://{host}/?token=AwYAAAB"))

    assert (result.outcome, result.reason) == ("failed", "untrusted_channel")
    assert rig.sandbox.token_requests == {}


# --- no answer ---------------------------------------------------------------------


@pytest.mark.parametrize("sandbox_options", [{"slow_s": 60.0}])
async def test_timeout_is_retried(rig: Rig) -> None:
    """A WNS host that never answers would hold the send forever."""
    settings = rig.settings.model_copy(update={"request_timeout_s": 0.5})
    channel = rig.sandbox.channel_uri(LIVE_APP, "slow")

    async with wns.WnsClient.from_settings(settings) as client:
        result = await client.send(make_send(channel))

    assert (result.outcome, result.reason) == ("retry", "timeout")


async def test_lost_connection_is_retried(rig: Rig) -> None:
    """A WNS host that went away would fail the send for good."""
    channel = rig.sandbox.channel_uri(LIVE_APP)
    assert (await rig.client.send(make_send(channel))).outcome == "delivered"

    await rig.server.aclose()
    result = await rig.client.send(make_send(channel))

    assert (result.outcome, result.reason) == ("retry", "connection_lost")


# --- connections -------------------------------------------------------------------


async def test_sends_share_a_bounded_set_of_kept_alive_connections(
    certs: SandboxCerts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each send would open a TLS connection of its own, or a burst one per send."""
    sandbox = WnsSandbox()
    connections: set[ConnectionContext] = set()

    async def handle(req: Request) -> Response:
        if "token=" in req.path:
            connections.add(req.conn)
        return await sandbox.handle(req)

    server = sandbox.server(certs, handler=handle)
    await server.start()
    sandbox.base_url = f"https://127.0.0.1:{server.port}"
    settings, _ = settings_for(
        sandbox, certs, tmp_path, monkeypatch, PUSHSTREAM_MAX_IN_FLIGHT="4"
    )
    sends = [make_send(sandbox.channel_uri(LIVE_APP)) for _ in range(40)]
    try:
        async with wns.WnsClient.from_settings(settings) as client:
            burst = await asyncio.gather(*(client.send(s) for s in sends))
            one_by_one = [await client.send(s) for s in sends[:10]]
    finally:
        await server.aclose()

    assert [r.outcome for r in burst + one_by_one] == ["delivered"] * 50
    assert 1 <= len(connections) <= 4


async def test_header_that_cannot_be_written_fails_without_a_request(rig: Rig) -> None:
    """A header with a line break would be retried forever, or reach WNS."""
    send = make_send(rig.sandbox.channel_uri(LIVE_APP))
    headers = send.headers | {"X-WNS-Tag": "a\r\nX-Injected: 1"}

    result = await rig.client.send(send.model_copy(update={"headers": headers}))

    assert (result.outcome, result.reason) == ("failed", "invalid_header")
    assert sum(rig.sandbox.stats.values()) == 0


# --- what the sandbox checks -------------------------------------------------------


def raw_client(rig: Rig) -> httpx.AsyncClient:
    context = ssl.create_default_context(cafile=str(rig.settings.endpoints.ca_file))
    return httpx.AsyncClient(verify=context)


async def live_token(rig: Rig) -> str:
    app = json.loads(rig.env["PUSHSTREAM_WNS"])[0]
    secret_file = Path(app["client_secret_file"])
    secret = (await asyncio.to_thread(secret_file.read_text)).strip()
    form = {
        "grant_type": "client_credentials",
        "client_id": app["client_id"],
        "client_secret": secret,
        "scope": "notify.windows.com",
    }
    async with raw_client(rig) as http:
        response = await http.post(rig.sandbox.base_url + "/accesstoken.srf", data=form)
    assert response.status_code == 200
    assert response.json()["expires_in"] == 86400
    token: str = response.json()["access_token"]
    return token


async def raw_request(rig: Rig, head: str, body: bytes = b"") -> tuple[str, str]:
    """Send bytes as written (no client fixes them up); (status line, headers)."""
    context = ssl.create_default_context(cafile=str(rig.settings.endpoints.ca_file))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", rig.server.port, ssl=context
    )
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
        await writer.drain()
        answer = (await reader.readuntil(b"\r\n\r\n")).decode()
    finally:
        writer.close()
    status, _, headers = answer.partition("\r\n")
    return status, headers.lower()


async def test_sandbox_refuses_missing_content_length_and_chunked(rig: Rig) -> None:
    """The sandbox would accept requests real WNS refuses."""
    token = await live_token(rig)
    path = rig.sandbox.channel_uri(LIVE_APP).removeprefix(rig.sandbox.base_url)
    head = (
        f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nAuthorization: Bearer {token}\n"
        "X-WNS-Type: wns/raw\nContent-Type: application/octet-stream\n"
    )

    no_length, headers = await raw_request(rig, head)
    chunked, _ = await raw_request(
        rig, head + "Transfer-Encoding: chunked\n", b"2\r\nhi\r\n0\r\n\r\n"
    )

    assert no_length.startswith("HTTP/1.1 400")
    assert "x-wns-error-description: the content-length header is required" in headers
    assert chunked.startswith("HTTP/1.1 400")


@pytest.mark.parametrize("ask", [True, False])
async def test_sandbox_answers_with_wns_headers(rig: Rig, ask: bool) -> None:
    """Device status would be sent unasked, or WNS's tracing headers be missing."""
    token = await live_token(rig)
    headers = {
        "Authorization": f"Bearer {token}",
        "X-WNS-Type": "wns/raw",
        "Content-Type": "application/octet-stream",
        "X-WNS-RequestForStatus": "true" if ask else "false",
        "MS-CV": "abc.0",
    }
    async with raw_client(rig) as http:
        channel = rig.sandbox.channel_uri(LIVE_APP)
        response = await http.post(channel, content=b"ping", headers=headers)
        wrong_method = await http.get(channel, headers=headers)

    assert response.status_code == 200
    assert response.headers["x-wns-status"] == "received"
    assert len(response.headers["x-wns-msg-id"]) == 16
    assert response.headers["x-wns-debug-trace"]
    assert response.headers["ms-cv"] == "abc.0"
    assert ("x-wns-deviceconnectionstatus" in response.headers) is ask
    assert wrong_method.status_code == 405


async def test_expired_token_answer_says_so(rig: Rig) -> None:
    """A client could not tell an expired token from a wrong one."""
    token = await live_token(rig)
    rig.sandbox.expire_tokens()
    headers = {
        "Authorization": f"Bearer {token}",
        "X-WNS-Type": "wns/raw",
        "Content-Type": "application/octet-stream",
    }
    async with raw_client(rig) as http:
        channel = rig.sandbox.channel_uri(LIVE_APP)
        expired = await http.post(channel, content=b"x", headers=headers)
        headers["Authorization"] = "Bearer made-up"
        unknown = await http.post(channel, content=b"x", headers=headers)

    assert expired.status_code == 401
    assert "Token expired" in expired.headers["www-authenticate"]
    assert unknown.status_code == 401
    assert "Token expired" not in unknown.headers["www-authenticate"]


def test_make_credentials_points_settings_at_the_sandbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pushstream sandbox` would write settings a worker cannot use."""
    sandbox = WnsSandbox("https://127.0.0.1:8443")
    env = sandbox.make_credentials(tmp_path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    settings = load_settings()

    assert {a.package for a in settings.wns} == {LIVE_APP, ENTRA_APP}
    assert settings.wns_allowed_hosts == ("127.0.0.1:8443",)
    assert settings.endpoints.wns_live_token == "https://127.0.0.1:8443/accesstoken.srf"
    for app in settings.wns:
        assert app.client_secret_file is not None
        assert app.client_secret_file.stat().st_mode & 0o077 == 0


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PUSHSTREAM_CONFIG_FILE", "PUSHSTREAM_WNS"):
        monkeypatch.delenv(name, raising=False)
