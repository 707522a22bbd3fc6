"""FcmClient against the FCM sandbox: real TLS, HTTP/2, signed OAuth grants."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import SecretStr

from pushstream.config import ConfigError, Endpoints, FcmProject, Settings
from pushstream.events import Notification, Send
from pushstream.sandbox.certs import SandboxCerts, ensure_certs
from pushstream.sandbox.fcm import FcmSandbox
from pushstream.sandbox.server import SandboxServer
from pushstream.senders.fcm import FcmClient, FcmCredentials, render
from pushstream.senders.oauth import FCM_SCOPE, GoogleTokenSource, ServiceAccount
from pushstream.senders.result import Target

PROJECTS = ("proj-a", "proj-b")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SandboxCerts:
    return ensure_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def key_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Service-account keys, made once for the module and reused by each sandbox."""
    folder = tmp_path_factory.mktemp("fcm-keys")
    FcmSandbox("https://127.0.0.1:1").make_credentials(folder, projects=PROJECTS)
    return folder


@pytest.fixture(scope="module")
def accounts(key_folder: Path) -> dict[str, ServiceAccount]:
    """The keys, loaded once (checking an RSA key takes a while)."""
    return {
        project: ServiceAccount.from_file(
            key_folder / f"fcm-{project}.json", setting=project
        )
        for project in PROJECTS
    }


@dataclass
class Env:
    sandbox: FcmSandbox
    server: SandboxServer
    settings: Settings
    certs: SandboxCerts

    accounts: dict[str, ServiceAccount]

    def credentials(self, project: str) -> FcmCredentials:
        """The project's key, as FcmClient.from_settings would load it."""
        token_uri = self.sandbox.base_url + "/token"
        account = replace(self.accounts[project], token_uri=token_uri)
        return FcmCredentials(project, account)

    def client(self, **options: Any) -> FcmClient:
        options.setdefault("endpoint", self.sandbox.base_url)
        options.setdefault("ca_file", self.certs.ca_cert)
        projects = options.pop("projects", None) or [
            self.credentials(p) for p in PROJECTS
        ]
        return FcmClient(projects, **options)


@pytest.fixture
async def env(
    certs: SandboxCerts, key_folder: Path, accounts: dict[str, ServiceAccount]
) -> AsyncIterator[Env]:
    sandbox = FcmSandbox()
    server = sandbox.server(certs)
    await server.start()
    sandbox.base_url = f"https://127.0.0.1:{server.port}"
    values = sandbox.make_credentials(key_folder, projects=PROJECTS)
    settings = Settings(
        fcm=tuple(
            FcmProject(**entry) for entry in json.loads(values["PUSHSTREAM_FCM"])
        ),
        endpoints=Endpoints(
            fcm=values["PUSHSTREAM_ENDPOINTS__FCM"], ca_file=certs.ca_cert
        ),
    )
    try:
        yield Env(sandbox, server, settings, certs, accounts)
    finally:
        await server.aclose()


def device(kind: str = "device") -> str:
    return f"{kind}-{secrets.token_urlsafe(24)}"


def make_send(
    token: str,
    project: str = "proj-a",
    *,
    n: Notification | None = None,
    body: str | None = None,
    attempt: int = 1,
) -> Send:
    n = n or Notification(id="n-1", title="Hi", body="There")
    now = time.time_ns() // 1_000_000
    rendered = render(n, Target("fcm", token, project, "dev-1"), now, None)
    assert rendered.too_large is None
    return Send(
        send_id=f"{n.id}:dev-1",
        notification_id=n.id,
        device_id="dev-1",
        platform="fcm",
        app=project,
        token=token,
        attempt=attempt,
        accepted_at_ms=now,
        headers=rendered.headers,
        body=body if body is not None else rendered.body,
    )


def bad_body(token: str, **message: Any) -> str:
    return json.dumps({"message": {"token": token, **message}})


async def test_delivers_over_http2_with_a_bearer_token(env: Env) -> None:
    """Nothing would reach Android devices."""
    token = device()
    async with FcmClient.from_settings(env.settings) as client:
        result = await client.send(make_send(token))
    assert result.outcome == "delivered"
    assert result.provider_id is not None
    assert result.provider_id.startswith("projects/proj-a/messages/0:")
    [record] = env.sandbox.accepted
    assert record["token"] == token
    assert record["app"] == "proj-a"
    assert record["http_version"] == "2"
    assert record["message"]["notification"] == {"title": "Hi", "body": "There"}
    assert "authorization" not in record["headers"]
    assert env.sandbox.token_requests == 1


async def test_each_project_uses_its_own_service_account(env: Env) -> None:
    """With several Firebase apps, pushes for all but one would fail."""
    async with env.client() as client:
        results = await asyncio.gather(
            *(client.send(make_send(device(), p)) for p in PROJECTS * 3)
        )
    assert [r.outcome for r in results] == ["delivered"] * 6
    assert sorted(r["app"] for r in env.sandbox.accepted) == sorted(PROJECTS * 3)
    assert env.sandbox.token_requests == 2


@pytest.mark.parametrize(
    ("kind", "outcome", "reason", "status", "retry_after"),
    [
        ("unregistered", "invalid_token", "UNREGISTERED", 404, None),
        ("invalid-token", "invalid_token", "INVALID_ARGUMENT message.token", 400, None),
        ("sender-id-mismatch", "invalid_token", "SENDER_ID_MISMATCH", 403, None),
        (
            "third-party-auth",
            "failed",
            "THIRD_PARTY_AUTH_ERROR (APNs 403 InvalidProviderToken)",
            401,
            None,
        ),
        ("internal", "retry", "INTERNAL", 500, None),
        ("unavailable", "retry", "UNAVAILABLE", 503, 1.0),
        ("quota", "retry", "QUOTA_EXCEEDED", 429, 1.0),
        ("quota-plain", "retry", "RESOURCE_EXHAUSTED RATE_LIMIT_EXCEEDED", 429, 1.0),
    ],
)
async def test_each_fcm_error_becomes_its_outcome(
    env: Env,
    kind: str,
    outcome: str,
    reason: str,
    status: int,
    retry_after: float | None,
) -> None:
    """Dead tokens would be kept, good ones deleted, or retries mistimed."""
    async with env.client() as client:
        result = await client.send(make_send(device(kind)))
    assert (result.outcome, result.reason, result.status) == (outcome, reason, status)
    assert result.retry_after == retry_after
    assert env.sandbox.accepted == []


async def test_quota_burst_ends_delivered_after_retry_after(env: Env) -> None:
    """A throttled notification would never arrive once the quota refills."""
    env.sandbox.quota_failures = 2
    send = make_send(device("quota"))
    async with env.client() as client:
        first = await client.send(send)
        second = await client.send(send.model_copy(update={"attempt": 2}))
        third = await client.send(send.model_copy(update={"attempt": 3}))
    assert (first.outcome, first.retry_after) == ("retry", 1.0)
    assert (second.outcome, second.retry_after) == ("retry", 1.0)
    assert third.outcome == "delivered"
    assert len(env.sandbox.accepted) == 1


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"data": {"count": 3}}, "message.data[0].value"),
        ({"data": {"from": "me"}}, "message.data"),
        ({"data": {"google.x": "1"}}, "message.data"),
        ({"android": {"ttl": "10 minutes"}}, "message.android.ttl"),
        ({"android": {"ttl": "2419201s"}}, "message.android.ttl"),
        ({"android": {"priority": "URGENT"}}, "message.android.priority"),
        ({"android": {"notifcation": {"title": "typo"}}}, "message.android"),
        ({"topic": "news"}, "message"),
        ({"data": {"blob": "x" * 5000}}, "Message is too big"),
    ],
)
async def test_bad_payload_fails_and_keeps_the_token(
    env: Env, message: dict[str, Any], field: str
) -> None:
    """A malformed notification would delete the device's good token."""
    token = device()
    async with env.client() as client:
        result = await client.send(make_send(token, body=bad_body(token, **message)))
    assert result.outcome == "failed"
    assert result.status == 400
    assert result.reason.startswith("INVALID_ARGUMENT ")
    assert field in result.reason


async def test_lowercase_priority_and_fractional_ttl_are_accepted(env: Env) -> None:
    """Messages FCM accepts would be refused by the sandbox and tests would lie."""
    token = device()
    body = bad_body(token, android={"priority": "high", "ttl": "3.5s"})
    async with env.client() as client:
        result = await client.send(make_send(token, body=body))
    assert result.outcome == "delivered"


async def test_expired_access_token_is_refreshed_once_for_500_waiting_sends(
    env: Env,
) -> None:
    """A token expiry would send hundreds of token requests to Google at once."""
    clock = FakeClock()
    async with env.client(clock=clock) as client:
        assert (await client.send(make_send(device()))).outcome == "delivered"
        assert env.sandbox.token_requests == 1
        clock.now += 3600
        results = await asyncio.gather(
            *(client.send(make_send(device())) for _ in range(500))
        )
    assert {r.outcome for r in results} == {"delivered"}
    assert env.sandbox.token_requests == 2
    assert len(env.sandbox.accepted) == 501


async def test_refused_access_token_is_refreshed_once_and_the_send_retried(
    env: Env,
) -> None:
    """An access token revoked early would fail sends until the next restart."""
    async with env.client() as client:
        await client.send(make_send(device()))
        assert env.sandbox.expire_tokens() == 1
        results = await asyncio.gather(
            *(client.send(make_send(device())) for _ in range(50))
        )
    assert {r.outcome for r in results} == {"delivered"}
    assert env.sandbox.token_requests == 2
    assert env.sandbox.stats["send 401"] >= 1
    assert len(env.sandbox.accepted) == 51


async def test_unknown_and_unauthorized_projects_fail_without_touching_tokens(
    env: Env,
) -> None:
    """A config mistake would delete every device token of a project."""
    a, b = env.credentials("proj-a"), env.credentials("proj-b")
    unknown = FcmCredentials("proj-nobody", a.account)
    borrowed = FcmCredentials("proj-b", a.account)  # proj-a's key for proj-b
    async with env.client(projects=[unknown]) as client:
        missing = await client.send(make_send(device(), "proj-nobody"))
        unconfigured = await client.send(make_send(device(), "proj-a"))
    async with env.client(projects=[borrowed]) as client:
        denied = await client.send(make_send(device(), "proj-b"))
    assert (missing.outcome, missing.reason, missing.status) == (
        "failed",
        "NOT_FOUND",
        404,
    )
    assert unconfigured.outcome == "failed"
    assert unconfigured.status is None
    assert (denied.outcome, denied.reason, denied.status) == (
        "failed",
        "PERMISSION_DENIED IAM_PERMISSION_DENIED",
        403,
    )
    assert b.account.client_email != a.account.client_email


async def test_key_unknown_to_google_fails_with_its_reason(env: Env) -> None:
    """A rotated or deleted key would look like an FCM outage."""
    real = env.credentials("proj-a").account
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = ServiceAccount(
        real.client_email, real.private_key_id, real.token_uri, "proj-a", other
    )
    async with env.client(projects=[FcmCredentials("proj-a", forged)]) as client:
        result = await client.send(make_send(device()))
    assert result.outcome == "failed"
    assert result.reason == (
        "oauth: token endpoint answered 400: invalid_grant Invalid JWT Signature."
    )
    assert env.sandbox.accepted == []


async def test_token_endpoint_down_is_a_retry(env: Env) -> None:
    """A token endpoint outage would fail notifications instead of delaying them."""
    account = env.credentials("proj-a").account
    gone = ServiceAccount(
        account.client_email,
        account.private_key_id,
        "https://127.0.0.1:1/token",
        "proj-a",
        account.private_key,
    )
    async with env.client(projects=[FcmCredentials("proj-a", gone)]) as client:
        result = await client.send(make_send(device()))
    assert result.outcome == "retry"
    assert result.reason.startswith("oauth: token endpoint unreachable")


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"aud": "https://oauth2.googleapis.com/token"}, "Failed audience check"),
        ({"exp_offset": 3601}, "short-lived token"),
        ({"iat_offset": 3600, "exp_offset": 4000}, "short-lived token"),
        ({"iat_offset": -7200, "exp_offset": -3600}, "short-lived token"),
        ({"iss": "someone@else.iam.gserviceaccount.com"}, "account not found"),
        ({"kid": "0" * 40}, "Invalid JWT Signature."),
        ({"scope": None}, "Invalid oauth scope"),
    ],
)
async def test_token_endpoint_checks_the_assertion_as_google_does(
    env: Env, change: dict[str, Any], error: str
) -> None:
    """Tests would pass with assertions Google refuses."""
    account = env.credentials("proj-a").account
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": change.get("iss", account.client_email),
        "scope": change.get("scope", FCM_SCOPE),
        "aud": change.get("aud", account.token_uri),
        "iat": now + change.get("iat_offset", 0),
        "exp": now + change.get("exp_offset", 3600),
    }
    claims = {k: v for k, v in claims.items() if v is not None}
    headers = {"kid": change.get("kid", account.private_key_id)}
    assertion = jwt.encode(claims, account.private_key, "RS256", headers=headers)
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}
    async with httpx.AsyncClient(
        verify=env.certs.client_ssl_context(alpn=("http/1.1",))
    ) as http:
        response = await http.post(
            account.token_uri, data={**form, "assertion": assertion}
        )
    assert response.status_code == 400
    assert error in response.json()["error_description"]


async def test_sandbox_serves_http11_too(env: Env) -> None:
    """Clients that speak HTTP/1.1 to FCM could not be tested."""
    account = env.credentials("proj-b").account
    context = env.certs.client_ssl_context(alpn=("http/1.1",))
    token = device()
    async with httpx.AsyncClient(verify=context) as http:
        access, _ = await GoogleTokenSource(account, http)()
        response = await http.post(
            f"{env.sandbox.base_url}/v1/projects/proj-b/messages:send",
            headers={"authorization": f"Bearer {access}"},
            content=make_send(token, "proj-b").body,
        )
    assert response.status_code == 200
    assert response.json()["name"].startswith("projects/proj-b/messages/")
    assert env.sandbox.accepted[0]["http_version"] == "1.1"


async def test_no_answer_becomes_a_retry(env: Env) -> None:
    """A hung or dead FCM would block the sender or lose notifications."""
    env.sandbox.slow_s = 30
    async with env.client(request_timeout_s=0.3) as client:
        slow = await client.send(make_send(device("slow")))
        env.sandbox.outage = True
        outage = await client.send(make_send(device()))
        env.sandbox.outage_mode = "hang"
        hung = await client.send(make_send(device()))
        await env.server.aclose()
        lost = await client.send(make_send(device()))
    assert (slow.outcome, slow.reason) == ("retry", "timeout")
    assert (outage.outcome, outage.reason, outage.status) == (
        "retry",
        "UNAVAILABLE",
        503,
    )
    assert (hung.outcome, hung.reason) == ("retry", "timeout")
    assert (lost.outcome, lost.reason) == ("retry", "connection_lost")


class FakeClock:
    """Monotonic seconds that move when the test or a sleeper says so."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(self.now)
        self.now += seconds
        await asyncio.sleep(0)


async def test_rate_limit_bounds_requests_per_project(env: Env) -> None:
    """A burst would exceed the project's FCM quota and be throttled."""
    clock = FakeClock()
    a, b = env.credentials("proj-a"), env.credentials("proj-b")
    slow_a = FcmCredentials("proj-a", a.account, rate_per_minute=60)
    seen: list[tuple[float, int]] = []

    async def sleep(seconds: float) -> None:
        reached = sum(r["app"] == "proj-a" for r in env.sandbox.accepted)
        seen.append((clock.now, reached))
        await clock.sleep(seconds)

    async with env.client(projects=[slow_a, b], clock=clock, sleep=sleep) as client:
        results = await asyncio.gather(
            *(client.send(make_send(device(), "proj-a")) for _ in range(10)),
            *(client.send(make_send(device(), "proj-b")) for _ in range(50)),
        )
    assert {r.outcome for r in results} == {"delivered"}
    assert sum(r["app"] == "proj-a" for r in env.sandbox.accepted) == 10
    # 60 a minute with a burst of one: the tenth request waits nine seconds,
    # and no moment saw more requests than the bucket allowed.
    assert clock.now - 100.0 >= 9.0
    for at, reached in seen:
        assert reached <= 1 + (at - 100.0)
    assert len(seen) >= 9


def test_credentials_problems_name_the_setting(tmp_path: Path) -> None:
    """A worker with a bad FCM key would start and fail every send."""
    missing = Settings(
        fcm=(FcmProject(project_id="p", service_account_file=tmp_path / "no.json"),)
    )
    with pytest.raises(
        ConfigError,
        match=r"^PUSHSTREAM_FCM__0__SERVICE_ACCOUNT_FILE \(project 'p'\): ",
    ):
        FcmClient.from_settings(missing)
    neither = Settings(fcm=(FcmProject(project_id="p"),))
    with pytest.raises(ConfigError, match=r"^PUSHSTREAM_FCM__0 \(project 'p'\)"):
        FcmClient.from_settings(neither)
    bad_json = Settings(
        fcm=(FcmProject(project_id="p", service_account_json=SecretStr("{}")),)
    )
    with pytest.raises(ConfigError, match="PUSHSTREAM_FCM__0__SERVICE_ACCOUNT_JSON"):
        FcmClient.from_settings(bad_json)
    both = Settings(
        fcm=(
            FcmProject(
                project_id="p",
                service_account_file=tmp_path / "sa.json",
                service_account_json=SecretStr("{}"),
            ),
        )
    )
    with pytest.raises(ConfigError, match="not both"):
        FcmClient.from_settings(both)
    with pytest.raises(ConfigError, match="PUSHSTREAM_FCM"):
        FcmClient.from_settings(Settings())


async def test_unreadable_ca_file_names_the_setting(env: Env, tmp_path: Path) -> None:
    """A wrong CA path would surface as TLS errors on every send."""
    client = env.client(ca_file=tmp_path / "missing-ca.pem")
    with pytest.raises(ConfigError, match=r"^PUSHSTREAM_ENDPOINTS__CA_FILE: "):
        await client.start()
    await client.aclose()


def test_sandbox_keeps_its_keys_across_restarts(key_folder: Path) -> None:
    """A restarted sandbox would refuse the worker configured before it."""
    before = json.loads((key_folder / "fcm-proj-a.json").read_text())
    FcmSandbox("https://127.0.0.1:2").make_credentials(key_folder, projects=PROJECTS)
    after = json.loads((key_folder / "fcm-proj-a.json").read_text())
    assert after["private_key_id"] == before["private_key_id"]
    assert after["token_uri"] == "https://127.0.0.1:2/token"
    assert (key_folder / "fcm-proj-a.json").stat().st_mode & 0o077 == 0
    pem = after["private_key"].encode()
    assert isinstance(serialization.load_pem_private_key(pem, None), rsa.RSAPrivateKey)


async def test_token_outside_fcm_alphabet_is_an_invalid_token(env: Env) -> None:
    """A garbled token would stay in the table and fail every push."""
    token = "not a token!"
    async with env.client() as client:
        result = await client.send(make_send(device(), body=bad_body(token)))
    assert (result.outcome, result.status) == ("invalid_token", 400)
