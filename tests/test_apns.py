"""The APNs client against the APNs sandbox: real TLS, HTTP/2 and signed tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from pydantic import SecretStr

from pushstream.config import ApnsApp, ConfigError, Endpoints
from pushstream.events import Notification, Send
from pushstream.sandbox.apns import ApnsSandbox
from pushstream.sandbox.certs import SandboxCerts, ensure_certs
from pushstream.sandbox.server import SandboxServer
from pushstream.senders import apns, http2
from pushstream.senders.apns import ApnsClient
from pushstream.senders.apns_auth import TOKEN_GRID_S, sign_token
from pushstream.senders.result import Target

BUNDLE = "com.example.sandbox"


class Clock:
    """A settable clock: real time plus an offset in seconds."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Apns:
    """One running APNs sandbox and what a test needs to talk to it."""

    sandbox: ApnsSandbox
    server: SandboxServer
    certs: SandboxCerts
    folder: Path
    clock: Clock
    endpoints: Endpoints
    clients: list[ApnsClient] = field(default_factory=list)

    def apps(self, **options: Any) -> list[ApnsApp]:
        values = self.sandbox.make_credentials(self.folder, **options)
        return [ApnsApp(**app) for app in json.loads(values["PUSHSTREAM_APNS"])]

    async def client(self, apps: list[ApnsApp], **options: Any) -> ApnsClient:
        options.setdefault("request_timeout", 10.0)
        client = ApnsClient(apps, self.endpoints, **options)
        self.clients.append(client)
        await client.start()
        return client


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SandboxCerts:
    return ensure_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def env(certs: SandboxCerts, tmp_path: Path) -> AsyncIterator[Apns]:
    clock = Clock()
    sandbox = ApnsSandbox(certs=certs, clock=clock, slow_s=5.0)
    server = sandbox.server()
    await server.start()
    sandbox.base_url = f"https://127.0.0.1:{server.port}"
    endpoints = Endpoints(
        apns_production=sandbox.base_url,
        apns_development=sandbox.base_url,
        ca_file=certs.ca_cert,
    )
    state = Apns(sandbox, server, certs, tmp_path / "creds", clock, endpoints)
    try:
        yield state
    finally:
        for client in state.clients:
            await client.aclose()
        await server.aclose()


def device_token(prefix: str = "") -> str:
    token = prefix.ljust(8, "0") if prefix else "0123abcd"
    return token + uuid.uuid4().hex + uuid.uuid4().hex[:24]


def make_send(
    token: str,
    app: str = BUNDLE,
    *,
    environment: str = "production",
    headers: dict[str, str] | None = None,
    drop: tuple[str, ...] = (),
    raw_body: str | None = None,
    **fields: Any,
) -> Send:
    """A send as the router makes it (``fields`` of the notification, default a
    body), with headers replaced or dropped, or another body, to break it."""
    n = Notification(id=uuid.uuid4().hex, **(fields or {"body": "hello"}))
    target = Target("apns", token, app, "dev-1", environment)  # type: ignore[arg-type]
    rendered = apns.render(n, target, 0, None)
    sent = {k: v for k, v in rendered.headers.items() if k not in drop}
    sent.update(headers or {})
    return Send(
        send_id=f"{n.id}:dev-1",
        notification_id=n.id,
        device_id="dev-1",
        platform="apns",
        app=app,
        environment=environment,  # type: ignore[arg-type]
        token=token,
        accepted_at_ms=0,
        headers=sent,
        body=rendered.body if raw_body is None else raw_body,
    )


# --- delivery and scenario tokens --------------------------------------------------


async def test_push_is_delivered_with_its_apns_id(env: Apns) -> None:
    """A push to a live token arrives, and Apple's apns-id is what we sent."""
    client = await env.client(env.apps())
    token = device_token()
    send = make_send(token, title="Hi", body="hello")
    result = await client.send(send)
    assert result.outcome == "delivered"
    assert result.status == 200
    assert result.provider_id == send.headers["apns-id"]
    [record] = env.sandbox.accepted
    assert record["token"] == token
    assert record["app"] == BUNDLE
    assert record["auth"] == "token"
    assert json.loads(record["body"]) == {
        "aps": {"alert": {"title": "Hi", "body": "hello"}}
    }


@pytest.mark.parametrize(
    ("prefix", "outcome", "reason"),
    [
        ("dead", "invalid_token", "Unregistered"),
        ("faded", "invalid_token", "ExpiredToken"),
        ("bad", "invalid_token", "BadDeviceToken"),
        ("0dd", "invalid_token", "DeviceTokenNotForTopic"),
        ("f100d", "retry", "TooManyRequests"),
        ("fa11", "retry", "InternalServerError"),
        ("0ff11e", "retry", "ServiceUnavailable"),
        ("c105e", "retry", "connection_lost"),
    ],
)
async def test_scenario_tokens(
    env: Apns, prefix: str, outcome: str, reason: str
) -> None:
    """Dead, throttled and failing devices each end in the outcome a user expects."""
    client = await env.client(env.apps())
    result = await client.send(make_send(device_token(prefix)))
    assert (result.outcome, result.reason) == (outcome, reason)
    assert not env.sandbox.accepted


async def test_unregistered_carries_the_invalidation_time(env: Apns) -> None:
    """A 410 tells when Apple saw the token die, in milliseconds."""
    client = await env.client(env.apps())
    before = int(env.clock() * 1000)
    result = await client.send(make_send(device_token("dead")))
    assert result.status == 410
    assert result.invalidated_at_ms is not None
    assert before <= result.invalidated_at_ms <= int(env.clock() * 1000)


async def test_goaway_is_answered_by_sending_again(env: Apns) -> None:
    """A push cut off by a GOAWAY is sent once more on a new connection."""
    client = await env.client(env.apps())
    env.sandbox.goaway_next = 1
    result = await client.send(make_send(device_token()))
    assert result.outcome == "delivered"
    assert env.sandbox.stats["GOAWAY"] == 1
    assert len(env.sandbox.accepted) == 1


async def test_repeated_goaway_becomes_a_retry(env: Apns) -> None:
    """When the second connection is cut off too, the send is retried later."""
    client = await env.client(env.apps())
    result = await client.send(make_send(device_token("c105e")))
    assert (result.outcome, result.reason) == ("retry", "connection_lost")
    assert env.sandbox.stats["GOAWAY"] == 2


async def test_no_answer_in_time_is_a_timeout_retry(env: Apns) -> None:
    """A push APNs never answers becomes a retry instead of hanging the sender."""
    client = await env.client(env.apps(), request_timeout=0.5)
    result = await client.send(make_send(device_token("1a7e")))
    assert (result.outcome, result.reason) == ("retry", "timeout")


async def test_outage(env: Apns) -> None:
    """During an APNs outage sends are retried: 503, or a timeout when it hangs."""
    client = await env.client(env.apps(), request_timeout=0.5)
    env.sandbox.outage = True
    result = await client.send(make_send(device_token()))
    assert (result.outcome, result.reason) == ("retry", "ServiceUnavailable")
    env.sandbox.outage_mode = "hang"
    result = await client.send(make_send(device_token()))
    assert (result.outcome, result.reason) == ("retry", "timeout")
    env.sandbox.outage = False
    assert (await client.send(make_send(device_token()))).outcome == "delivered"


# --- request checks ------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, Callable[[str], Send], int, str, str]] = [
    (
        "collapse id",
        lambda t: make_send(t, headers={"apns-collapse-id": "x" * 65}),
        400,
        "BadCollapseId",
        "failed",
    ),
    (
        "expiration",
        lambda t: make_send(t, headers={"apns-expiration": "soon"}),
        400,
        "BadExpirationDate",
        "failed",
    ),
    (
        "message id",
        lambda t: make_send(t, headers={"apns-id": "not-a-uuid"}),
        400,
        "BadMessageId",
        "failed",
    ),
    (
        "priority",
        lambda t: make_send(t, headers={"apns-priority": "7"}),
        400,
        "BadPriority",
        "failed",
    ),
    (
        "background at priority 10",
        lambda t: make_send(t, content_available=True, headers={"apns-priority": "10"}),
        400,
        "BadPriority",
        "failed",
    ),
    (
        "push type",
        lambda t: make_send(t, headers={"apns-push-type": "fax"}),
        400,
        "InvalidPushType",
        "failed",
    ),
    (
        "voip without the .voip topic",
        lambda t: make_send(t, headers={"apns-push-type": "voip"}),
        400,
        "InvalidPushType",
        "failed",
    ),
    (
        "no topic",
        lambda t: make_send(t, drop=("apns-topic",)),
        400,
        "MissingTopic",
        "failed",
    ),
    (
        "malformed topic",
        lambda t: make_send(t, headers={"apns-topic": "bad topic!"}),
        400,
        "BadTopic",
        "failed",
    ),
    (
        "another team's app",
        lambda t: make_send(t, headers={"apns-topic": "com.other.app"}),
        400,
        "TopicDisallowed",
        "failed",
    ),
    ("empty body", lambda t: make_send(t, raw_body=""), 400, "PayloadEmpty", "failed"),
    (
        "over 4096 bytes",
        lambda t: make_send(t, raw_body=json.dumps({"aps": {}, "pad": "x" * 4100})),
        413,
        "PayloadTooLarge",
        "failed",
    ),
]


@pytest.mark.parametrize(
    ("name", "build", "status", "reason", "outcome"),
    BAD_REQUESTS,
    ids=[case[0] for case in BAD_REQUESTS],
)
async def test_bad_requests_are_refused_like_apns(
    env: Apns,
    name: str,
    build: Callable[[str], Send],
    status: int,
    reason: str,
    outcome: str,
) -> None:
    """Each malformed request gets APNs' status and reason, and no retry loop."""
    client = await env.client(env.apps())
    result = await client.send(build(device_token()))
    assert (result.status, result.reason, result.outcome) == (status, reason, outcome)
    assert not env.sandbox.accepted


async def test_voip_allows_5120_bytes(env: Apns) -> None:
    """A 5000-byte VoIP push is accepted where an alert of that size is not."""
    client = await env.client(env.apps())
    pad = "x" * 4950
    voip = make_send(device_token(), apns={"push_type": "voip"}, data={"pad": pad})
    assert (await client.send(voip)).outcome == "delivered"
    assert env.sandbox.accepted[0]["topic"] == BUNDLE + ".voip"


async def raw_connection(env: Apns) -> http2.H2Connection:
    context = env.certs.client_ssl_context()
    return await http2.H2Connection.connect("127.0.0.1", env.server.port, context)


def bearer(env: Apns, app: ApnsApp, iat: int | None = None) -> str:
    assert app.key_file is not None
    key = serialization.load_pem_private_key(app.key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert app.team_id is not None
    assert app.key_id is not None
    moment = int(env.clock()) if iat is None else iat
    return "bearer " + sign_token(key, app.team_id, app.key_id, moment)


async def test_protocol_level_refusals(env: Apns) -> None:
    """Method, path, duplicate headers and provider-token faults get APNs' reasons."""
    app = env.apps()[0]
    conn = await raw_connection(env)
    path = "/3/device/" + device_token()
    good = [("authorization", bearer(env, app)), ("apns-topic", BUNDLE)]
    body = b'{"aps":{}}'

    async def reason(method: str, target: str, headers: list[tuple[str, str]]) -> Any:
        response = await conn.request(method, target, headers, body)
        return response.status, json.loads(response.body)["reason"]

    try:
        assert await reason("GET", path, good) == (405, "MethodNotAllowed")
        assert await reason("POST", "/4/device/abc", good) == (404, "BadPath")
        assert await reason("POST", "/3/device/", good) == (400, "MissingDeviceToken")
        dup = [*good, ("apns-priority", "10"), ("apns-priority", "5")]
        assert await reason("POST", path, dup) == (400, "DuplicateHeaders")
        topic_only = [("apns-topic", BUNDLE)]
        assert await reason("POST", path, topic_only) == (403, "MissingProviderToken")
        forged = bearer(env, app)[:-4] + "AAAA"
        assert await reason("POST", path, [("authorization", forged), *topic_only]) == (
            403,
            "InvalidProviderToken",
        )
        assert await reason("POST", "/3/device/xyz", good) == (400, "BadDeviceToken")
    finally:
        await conn.aclose()


async def test_second_key_on_one_connection_is_refused(env: Apns) -> None:
    """APNs refuses a second signing key on a connection (UnrelatedKeyIdInToken)."""
    first = env.apps()[0]
    second = env.apps(team_id=first.team_id, bundle_ids=(BUNDLE + ".two",))[0]
    conn = await raw_connection(env)
    path = "/3/device/" + device_token()
    try:
        ok = await conn.request(
            "POST",
            path,
            [("authorization", bearer(env, first)), ("apns-topic", BUNDLE)],
            b'{"aps":{}}',
        )
        assert ok.status == 200
        refused = await conn.request(
            "POST",
            path,
            [("authorization", bearer(env, second)), ("apns-topic", BUNDLE)],
            b'{"aps":{}}',
        )
        assert json.loads(refused.body)["reason"] == "UnrelatedKeyIdInToken"
    finally:
        await conn.aclose()


async def test_http1_clients_are_refused(env: Apns) -> None:
    """Like APNs, the sandbox takes HTTP/2 only: an HTTP/1.1 client gets no answer."""
    context = env.certs.client_ssl_context(alpn=("http/1.1",))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", env.server.port, ssl=context
    )
    try:
        writer.write(
            b"POST /3/device/00 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    except (ConnectionError, ssl.SSLError):
        data = b""
    finally:
        writer.close()
    assert not data.startswith(b"HTTP/")


# --- streams -------------------------------------------------------------------------


async def test_stream_limit_follows_apns_settings_dance(env: Apns) -> None:
    """The sandbox allows 1 stream until authenticated, 1 after a refusal, 1000 after
    an accepted push, so a client that mishandles the drop is caught."""
    app = env.apps()[0]
    conn = await raw_connection(env)
    headers = [("authorization", bearer(env, app)), ("apns-topic", BUNDLE)]
    body = b'{"aps":{}}'
    try:
        assert conn.max_concurrent_streams == 1
        await conn.request("POST", "/3/device/" + device_token(), headers, body)
        assert conn.max_concurrent_streams == 1000
        await conn.request("POST", "/3/device/" + device_token("dead"), headers, body)
        assert conn.max_concurrent_streams == 1
        await conn.request("POST", "/3/device/" + device_token(), headers, body)
        assert conn.max_concurrent_streams == 1000
    finally:
        await conn.aclose()


async def test_many_sends_with_dead_tokens_all_complete(env: Apns) -> None:
    """200 concurrent sends, a fifth to dead tokens: each one gets its outcome and
    none hangs although APNs drops the stream limit to 1 after every refusal."""
    client = await env.client(env.apps(), connections=2)
    tokens = [device_token("dead" if i % 5 == 0 else "") for i in range(200)]
    sends = [client.send(make_send(token)) for token in tokens]
    results = await asyncio.wait_for(asyncio.gather(*sends), 60)
    outcomes = Counter(result.outcome for result in results)
    assert outcomes == {"delivered": 160, "invalid_token": 40}
    for token, result in zip(tokens, results, strict=True):
        expected = "invalid_token" if token.startswith("dead") else "delivered"
        assert result.outcome == expected
    assert len(env.sandbox.accepted) == 160


# --- provider tokens ---------------------------------------------------------------


async def test_many_connections_share_one_token(env: Apns) -> None:
    """Every connection of a process presents the same token: no
    TooManyProviderTokenUpdates however many connections come and go."""
    apps = env.apps()
    client = await env.client(apps, connections=4)
    for _ in range(5):
        env.sandbox.goaway_next = 1  # retire a connection every round
        tokens = [device_token("dead" if i % 4 == 0 else "") for i in range(60)]
        results = await asyncio.gather(*(client.send(make_send(t)) for t in tokens))
        assert Counter(r.outcome for r in results) == {
            "delivered": 45,
            "invalid_token": 15,
        }
    assert env.sandbox.stats["authenticated_connections"] >= 5
    assert env.sandbox.token_changes(str(apps[0].team_id)) == 1
    assert env.sandbox.stats["TooManyProviderTokenUpdates"] == 0


async def test_token_changing_too_soon_is_refused(env: Apns) -> None:
    """A second token of a team within 20 minutes draws TooManyProviderTokenUpdates,
    and the send is retried after a pause instead of minting yet another."""
    apps = env.apps()
    earlier = Clock()
    earlier.offset = -TOKEN_GRID_S  # a process whose token has an older iat
    first = await env.client(apps, clock=earlier)
    assert (await first.send(make_send(device_token()))).outcome == "delivered"
    second = await env.client(apps)
    result = await second.send(make_send(device_token()))
    assert (result.outcome, result.reason) == ("retry", "TooManyProviderTokenUpdates")
    assert result.retry_after is not None
    assert (
        second.provider_tokens[(str(apps[0].team_id), str(apps[0].key_id))].minted == 1
    )


async def test_expired_provider_token_is_renewed_and_sent_again(env: Apns) -> None:
    """When APNs calls a 20+ minute old token expired, a new one is made and the
    push still goes out in the same send."""
    apps = env.apps()
    client_clock = Clock()
    client = await env.client(apps, clock=client_clock)
    assert (await client.send(make_send(device_token()))).outcome == "delivered"
    client_clock.offset = 21 * 60  # the token is now 21 to 46 minutes old
    # APNs' clock 70 minutes ahead: the old token looks over an hour old, one
    # made now by the client 49 minutes old.
    env.clock.offset = 70 * 60
    result = await client.send(make_send(device_token()))
    assert result.outcome == "delivered"
    tokens = client.provider_tokens[(str(apps[0].team_id), str(apps[0].key_id))]
    assert tokens.minted == 2
    assert env.sandbox.stats["ExpiredProviderToken"] == 1


async def test_fresh_token_called_expired_is_not_replaced(env: Apns) -> None:
    """With a wrong clock a fresh token is refused: the send is retried later and no
    token storm follows."""
    apps = env.apps()
    client = await env.client(apps)
    env.clock.offset = 2 * 3600
    result = await client.send(make_send(device_token()))
    assert (result.outcome, result.reason) == ("retry", "ExpiredProviderToken")
    tokens = client.provider_tokens[(str(apps[0].team_id), str(apps[0].key_id))]
    assert tokens.minted == 1
    assert env.sandbox.stats["ExpiredProviderToken"] == 1


async def test_key_of_the_other_environment(env: Apns) -> None:
    """A key restricted to production is refused by the development host."""
    client = await env.client(env.apps(environments=("production",)))
    result = await client.send(make_send(device_token()))
    assert (result.outcome, result.reason) == ("failed", "BadEnvironmentKeyInToken")


# --- certificates, several apps, environments --------------------------------------


async def test_certificate_auth_with_pem(env: Apns) -> None:
    """An app with a PEM push certificate delivers without a provider token."""
    [app] = env.apps(bundle_ids=(), cert_bundle_ids=("com.example.certified",))
    client = await env.client([app])
    result = await client.send(make_send(device_token(), "com.example.certified"))
    assert result.outcome == "delivered"
    assert env.sandbox.accepted[0]["auth"] == "certificate"
    assert "authorization" not in env.sandbox.accepted[0]["headers"]


async def test_certificate_auth_with_pkcs12(env: Apns) -> None:
    """An app with a password-protected .p12 push certificate delivers."""
    [app] = env.apps(bundle_ids=(), cert_bundle_ids=("com.example.p12",))
    assert app.cert_file is not None
    pem = app.cert_file.read_bytes()
    key = serialization.load_pem_private_key(pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(pem)
    p12 = env.folder / "push.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"push",
            key,
            cert,
            None,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    p12_app = ApnsApp(
        bundle_id="com.example.p12",
        auth="certificate",
        cert_file=p12,
        cert_password=SecretStr("pw"),
    )
    client = await env.client([p12_app])
    result = await client.send(make_send(device_token(), "com.example.p12"))
    assert result.outcome == "delivered"
    assert env.sandbox.accepted[0]["auth"] == "certificate"


async def test_certificate_for_another_app_is_refused(env: Apns) -> None:
    """A push certificate only covers its own bundle id (BadTopic otherwise)."""
    [app] = env.apps(bundle_ids=(), cert_bundle_ids=("com.example.one",))
    client = await env.client([app])
    send = make_send(device_token(), "com.example.one", headers={"apns-topic": BUNDLE})
    result = await client.send(send)
    assert (result.outcome, result.reason) == ("failed", "BadTopic")


async def test_several_apps_at_once(env: Apns) -> None:
    """Apps of two teams, two apps sharing a key, and a certificate app all deliver
    at the same time, each over its own credential's connections."""
    team_a = env.apps(bundle_ids=("com.a.one", "com.a.two"))
    team_b = env.apps(bundle_ids=("com.b.app",))
    cert = env.apps(bundle_ids=(), cert_bundle_ids=("com.c.app",))
    client = await env.client([*team_a, *team_b, *cert])
    bundles = ["com.a.one", "com.a.two", "com.b.app", "com.c.app"] * 10
    results = await asyncio.gather(
        *(client.send(make_send(device_token(), b)) for b in bundles)
    )
    assert {r.outcome for r in results} == {"delivered"}
    by_app = {r["app"]: (r["auth"], r["team_id"]) for r in env.sandbox.accepted}
    assert by_app == {
        "com.a.one": ("token", team_a[0].team_id),
        "com.a.two": ("token", team_a[0].team_id),
        "com.b.app": ("token", team_b[0].team_id),
        "com.c.app": ("certificate", None),
    }
    assert len(client.stats()) == 3
    assert len(client.provider_tokens) == 2


async def test_environment_picks_the_host(env: Apns) -> None:
    """Development tokens go to the development host, production ones to production."""
    production = env.sandbox.server(environment="production")
    await production.start()
    try:
        endpoints = Endpoints(
            apns_production=f"https://127.0.0.1:{production.port}",
            apns_development=env.sandbox.base_url,
            ca_file=env.certs.ca_cert,
        )
        client = ApnsClient(env.apps(), endpoints)
        env.clients.append(client)
        await client.start()
        for environment in ("production", "development"):
            send = make_send(device_token(), environment=environment)
            assert (await client.send(send)).outcome == "delivered"
        records = {r["environment"]: r for r in env.sandbox.accepted}
        assert set(records) == {"production", "development"}
        assert records["development"]["unique_id"]
        assert records["production"]["unique_id"] is None
    finally:
        await production.aclose()


# --- configuration and secrets ------------------------------------------------------


async def test_start_refuses_a_missing_key(env: Apns) -> None:
    """A worker with an unreadable .p8 stops at start, naming the setting."""
    app = env.apps()[0].model_copy(update={"key_file": Path("/nonexistent.p8")})
    client = ApnsClient([app], env.endpoints)
    with pytest.raises(ConfigError, match="PUSHSTREAM_APNS__0__KEY_FILE"):
        await client.start()


async def test_start_refuses_a_plain_http_endpoint(env: Apns) -> None:
    """An endpoint that is not https:// is refused at start, naming the setting."""
    endpoints = env.endpoints.model_copy(update={"apns_production": "http://x:80"})
    client = ApnsClient(env.apps(), endpoints)
    with pytest.raises(ConfigError, match="PUSHSTREAM_ENDPOINTS__APNS_PRODUCTION"):
        await client.start()


async def test_logs_hold_no_token_and_no_jwt(
    env: Apns, caplog: pytest.LogCaptureFixture
) -> None:
    """Even at DEBUG, logs never show a full device token or a provider token.

    (h2's and hpack's own loggers print headers; the worker keeps them quiet.)
    """
    caplog.set_level(logging.DEBUG, logger="pushstream")
    client = await env.client(env.apps())
    tokens = [device_token(), device_token("dead"), device_token("c105e")]
    for token in tokens:
        await client.send(make_send(token))
    await client.send(make_send(device_token(), headers={"apns-topic": "com.x"}))
    text = caplog.text
    assert "APNs" in text
    for token in tokens:
        assert token not in text
    assert "eyJ" not in text  # every JWT starts with this


async def test_unknown_app_and_malformed_token_make_no_request(env: Apns) -> None:
    """A send for an app without credentials fails, and one whose token could
    break the request path invalidates the token, both without calling APNs."""
    client = await env.client(env.apps())
    unknown = await client.send(make_send(device_token(), "com.unknown.app"))
    assert (unknown.outcome, unknown.reason) == ("failed", "not_configured")
    broken = make_send(device_token()).model_copy(update={"token": "ab/../x?y"})
    result = await client.send(broken)
    assert (result.outcome, result.reason) == ("invalid_token", "malformed_token")
    assert sum(env.sandbox.stats.values()) == 0
