"""The access-token cache and Google service-account keys."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pushstream.config import ConfigError
from pushstream.senders.oauth import (
    FCM_SCOPE,
    ServiceAccount,
    TokenCache,
    TokenError,
    parse_token_response,
)


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Endpoint:
    """A token source that counts requests and can be held open or made to fail."""

    def __init__(self, lifetime: float = 3600.0) -> None:
        self.calls = 0
        self.lifetime = lifetime
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None

    async def __call__(self) -> tuple[str, float]:
        self.calls += 1
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return f"token-{self.calls}", self.lifetime


async def test_many_waiters_cause_one_token_request() -> None:
    """Every send would hit the token endpoint, and Google would throttle it."""
    endpoint = Endpoint()
    endpoint.gate.clear()
    cache = TokenCache(endpoint, Clock())
    waiters = [asyncio.create_task(cache.get()) for _ in range(500)]
    await asyncio.sleep(0)
    endpoint.gate.set()
    tokens = await asyncio.gather(*waiters)
    assert set(tokens) == {"token-1"}
    assert endpoint.calls == 1
    assert cache.fetches == 1


async def test_token_is_reused_then_refreshed_in_the_background() -> None:
    """Tokens would be fetched per send, or sends would stall at each refresh."""
    clock = Clock()
    endpoint = Endpoint(lifetime=3600)
    cache = TokenCache(endpoint, clock)
    assert await cache.get() == "token-1"
    clock.now += 3000
    assert await cache.get() == "token-1"
    assert endpoint.calls == 1

    clock.now += 400  # inside the five-minute margin, still valid
    assert await cache.get() == "token-1"
    await asyncio.sleep(0)
    assert endpoint.calls == 2
    assert await cache.get() == "token-2"


async def test_expired_token_is_never_handed_out() -> None:
    """Sends would go out with a dead token and fail with 401."""
    clock = Clock()
    endpoint = Endpoint(lifetime=100)
    cache = TokenCache(endpoint, clock)
    await cache.get()
    clock.now += 100
    waiters = [asyncio.create_task(cache.get()) for _ in range(50)]
    assert set(await asyncio.gather(*waiters)) == {"token-2"}
    assert endpoint.calls == 2


async def test_short_lived_tokens_are_not_refetched_on_every_call() -> None:
    """A provider with short tokens would get a token request per send."""
    clock = Clock()
    endpoint = Endpoint(lifetime=10)
    cache = TokenCache(endpoint, clock)
    await cache.get()
    clock.now += 4
    await cache.get()
    await asyncio.sleep(0)
    assert endpoint.calls == 1


async def test_invalidate_forces_one_refresh_and_ignores_stale_tokens() -> None:
    """A refused token would be reused, or every 401 would refetch."""
    endpoint = Endpoint()
    cache = TokenCache(endpoint, Clock())
    old = await cache.get()
    for _ in range(100):
        cache.invalidate(old)
    tokens = await asyncio.gather(*(cache.get() for _ in range(100)))
    assert set(tokens) == {"token-2"}
    cache.invalidate(old)  # a late 401 for the old token changes nothing
    assert await cache.get() == "token-2"
    assert endpoint.calls == 2


async def test_failure_reaches_every_waiter_and_is_held_briefly() -> None:
    """A down token endpoint would be hammered, or waiters would hang."""
    clock = Clock()
    endpoint = Endpoint()
    endpoint.error = TokenError("token endpoint answered 503", retriable=True)
    cache = TokenCache(endpoint, clock, failure_hold_s=1.0)
    results = await asyncio.gather(
        *(cache.get() for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, TokenError) and r.retriable for r in results)
    with pytest.raises(TokenError):
        await cache.get()
    assert endpoint.calls == 1

    endpoint.error = None
    clock.now += 1.5
    assert await cache.get() == "token-2"


async def test_unexpected_fetch_error_becomes_a_retriable_token_error() -> None:
    """A bug in a token source would crash the sender instead of retrying."""
    endpoint = Endpoint()
    endpoint.error = KeyError("access_token")
    cache = TokenCache(endpoint, Clock())
    with pytest.raises(TokenError) as caught:
        await cache.get()
    assert caught.value.retriable


async def test_a_caller_giving_up_does_not_cancel_the_refresh() -> None:
    """One timed-out send would make every other send wait for a new refresh."""
    endpoint = Endpoint()
    endpoint.gate.clear()
    cache = TokenCache(endpoint, Clock())
    impatient = asyncio.create_task(cache.get())
    patient = asyncio.create_task(cache.get())
    await asyncio.sleep(0)
    impatient.cancel()
    endpoint.gate.set()
    assert await patient == "token-1"
    assert endpoint.calls == 1


# --- service-account keys --------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def key_json(key: Any, **changes: Any) -> str:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "kid-123",
        "private_key": pem,
        "client_email": "sender@demo-project.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.example.test/token",
    }
    info.update(changes)
    return json.dumps({k: v for k, v in info.items() if v is not None})


def test_assertion_is_the_jwt_bearer_grant_google_expects(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    """Google would refuse the assertion and no FCM send would be authorized."""
    account = ServiceAccount.from_json(key_json(rsa_key), setting="S")
    token = account.assertion(1_700_000_000.7)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": "kid-123"}
    claims = jwt.decode(
        token,
        rsa_key.public_key(),
        algorithms=["RS256"],
        audience="https://oauth2.example.test/token",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "iss": "sender@demo-project.iam.gserviceaccount.com",
        "scope": FCM_SCOPE,
        "aud": "https://oauth2.example.test/token",
        "iat": 1_700_000_000,
        "exp": 1_700_003_600,
    }
    assert account.assertion(0, lifetime_s=99_999).count(".") == 2
    long = jwt.decode(
        account.assertion(0, lifetime_s=99_999), options={"verify_signature": False}
    )
    assert long["exp"] - long["iat"] == 3600


def test_repr_hides_the_private_key(rsa_key: rsa.RSAPrivateKey) -> None:
    """The private key would end up in logs or tracebacks."""
    account = ServiceAccount.from_json(key_json(rsa_key), setting="S")
    assert "PRIVATE" not in repr(account)
    assert "private_key=" not in repr(account)


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ("KEY:type=authorized_user", '"type"'),
        ("KEY:client_email=", '"client_email"'),
        ("KEY:private_key_id=None", '"private_key_id"'),
        ("KEY:token_uri=ftp://x/token", '"token_uri"'),
        # A PEM header over garbage; spelled in two parts so no scan for
        # committed keys mistakes this fixture for one.
        ("KEY:private_key=-----BEGIN " + "PRIVATE KEY-----\nAAAA\n", '"private_key"'),
        ("EC", "not an RSA key"),
    ],
)
def test_malformed_keys_name_the_setting(
    rsa_key: rsa.RSAPrivateKey, text: str, complaint: str
) -> None:
    """A bad key would be found only at the first send, with no hint where."""
    if text == "EC":
        text = key_json(ec.generate_private_key(ec.SECP256R1()))
    elif text.startswith("KEY:"):
        name, _, value = text[4:].partition("=")
        text = key_json(rsa_key, **{name: None if value == "None" else value})
    with pytest.raises(ConfigError) as caught:
        ServiceAccount.from_json(text, setting="PUSHSTREAM_FCM[0].service_account_json")
    message = str(caught.value)
    assert message.startswith("PUSHSTREAM_FCM[0].service_account_json: ")
    assert complaint in message
    assert "BEGIN" not in message


def test_missing_key_file_names_the_setting(tmp_path: Path) -> None:
    """A wrong key path would crash with a bare traceback."""
    with pytest.raises(ConfigError, match=r"^SETTING_X: cannot read .*nope\.json"):
        ServiceAccount.from_file(tmp_path / "nope.json", setting="SETTING_X")


def test_key_file_is_read(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    """A key mounted as a file would not be usable."""
    path = tmp_path / "sa.json"
    path.write_text(key_json(rsa_key))
    account = ServiceAccount.from_file(path, setting="S")
    assert account.client_email.startswith("sender@")
    assert account.project_id == "demo-project"


# --- token endpoint answers ------------------------------------------------------


def test_token_response_parsing() -> None:
    """A good token answer would be refused, or a bad one accepted."""
    ok = b'{"access_token": "ya29.abc", "expires_in": 3599, "token_type": "Bearer"}'
    assert parse_token_response(200, ok) == ("ya29.abc", 3599.0)

    refused = json.dumps(
        {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
    ).encode()
    with pytest.raises(TokenError) as caught:
        parse_token_response(400, refused)
    assert not caught.value.retriable
    assert caught.value.reason == (
        "token endpoint answered 400: invalid_grant Invalid JWT Signature."
    )

    for status, body in ((503, b"busy"), (429, b"{}"), (200, b'{"expires_in": 5}')):
        with pytest.raises(TokenError) as caught:
            parse_token_response(status, body)
        assert caught.value.retriable
