"""Configuration: the documented settings, fail-fast credentials, Kafka security."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import faust
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import BaseModel
from pydantic_core import PydanticUndefined
from workerproc import free_port

from pushstream import topics
from pushstream.app import Pipeline, kafka_credentials
from pushstream.config import ApnsApp, Endpoints, FcmProject, Settings, WnsApp
from pushstream.sandbox.certs import ensure_certs

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "configuration.md"
ROW = re.compile(r"^\| `(PUSHSTREAM_[A-Z0-9_]+)` \| ([^|]+) \|", re.MULTILINE)
LISTS: dict[str, type[BaseModel]] = {"apns": ApnsApp, "fcm": FcmProject, "wns": WnsApp}
WORKER_TIMEOUT_S = 60


def _render(default: Any) -> str:
    """A default as configuration.md writes it."""
    if default is PydanticUndefined:
        return "required"
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple):
        return json.dumps(list(default))
    return str(default)


def _expected_rows() -> dict[str, str]:
    """Every setting's variable name and its default, from the code."""
    rows = {}
    for name, field in Settings.model_fields.items():
        if name in LISTS or name == "endpoints":
            continue
        rows[f"PUSHSTREAM_{name.upper()}"] = _render(field.default)
    for name, model in LISTS.items():
        for sub, field in model.model_fields.items():
            rows[f"PUSHSTREAM_{name.upper()}__N__{sub.upper()}"] = _render(
                field.default
            )
    for sub, field in Endpoints.model_fields.items():
        rows[f"PUSHSTREAM_ENDPOINTS__{sub.upper()}"] = _render(field.default)
    return rows


def _documented_rows() -> dict[str, str]:
    text = DOC.read_text()
    return {name: cell.strip().strip("`") for name, cell in ROW.findall(text)}


def test_every_setting_is_documented_with_its_default() -> None:
    """An operator reading docs/configuration.md would miss or mistrust a setting."""
    expected = _expected_rows()
    documented = _documented_rows()
    missing = sorted(set(expected) - set(documented))
    assert not missing, f"settings missing from {DOC.name}: {missing}"
    stale = sorted(set(documented) - set(expected))
    assert not stale, f"{DOC.name} documents settings that do not exist: {stale}"
    wrong = {
        name: (documented[name], default)
        for name, default in expected.items()
        if documented[name] != default
    }
    assert not wrong, f"documented default != code default: {wrong}"
    text = DOC.read_text()
    for name in (*LISTS, "endpoints"):
        assert f"PUSHSTREAM_{name.upper()}" in text


def test_secret_settings_are_secret_types() -> None:
    """A password or key kept as a plain string would show in reprs and logs."""
    for model in (Settings, *LISTS.values()):
        for name, field in model.model_fields.items():
            if re.search(
                r"password|^client_secret$|^service_account_json$|^key$", name
            ):
                assert "SecretStr" in str(field.annotation), f"{model.__name__}.{name}"


# --- Kafka security passes through -------------------------------------------------


def test_sasl_ssl_credentials_reach_faust_and_the_admin_client(
    tmp_path: Path,
) -> None:
    """A broker that requires SASL over TLS would refuse every connection."""
    certs = ensure_certs(tmp_path / "certs", ip_addresses=["127.0.0.1"])
    settings = Settings(
        kafka_bootstrap="kafka-1.example:9093",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="pushstream",
        kafka_sasl_password="s3cret-password",
        kafka_ssl_cafile=certs.ca_cert,
    )
    credentials = kafka_credentials(settings)
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.username == "pushstream"
    assert credentials.password == "s3cret-password"
    assert str(credentials.mechanism.value) == "SCRAM-SHA-512"
    context = credentials.ssl_context
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1  # exactly the configured CA

    given = Pipeline(settings).app.conf.broker_credentials
    assert isinstance(given, faust.SASLCredentials)
    assert (given.username, given.mechanism) == ("pushstream", credentials.mechanism)
    assert given.ssl_context is not None

    options = topics.kafka_security(settings)
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "pushstream"
    assert options["sasl_plain_password"] == "s3cret-password"
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    assert "s3cret-password" not in repr(settings)


def test_ssl_client_certificate_credentials(tmp_path: Path) -> None:
    """Mutual TLS to the brokers needs the client certificate in the context."""
    certs = ensure_certs(tmp_path / "certs", ip_addresses=["127.0.0.1"])
    settings = Settings(
        kafka_security_protocol="SSL",
        kafka_ssl_cafile=certs.ca_cert,
        kafka_ssl_certfile=certs.server_cert,
        kafka_ssl_keyfile=certs.server_key,
    )
    credentials = kafka_credentials(settings)
    assert isinstance(credentials, faust.SSLCredentials)
    assert isinstance(credentials.context, ssl.SSLContext)
    assert kafka_credentials(Settings()) is None


# --- a worker with a broken credential ---------------------------------------------


def _ec_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _rsa_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _run_worker(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``pushstream worker`` pointed at a port where no broker listens."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSTREAM_")}
    full.update(
        PUSHSTREAM_KAFKA_BOOTSTRAP="127.0.0.1:1",
        PUSHSTREAM_DATA_DIR=str(tmp_path / "worker"),
        PUSHSTREAM_WEB_PORT=str(free_port()),
    )
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pushstream", "worker"],
        env=full,
        capture_output=True,
        text=True,
        timeout=WORKER_TIMEOUT_S,
        check=False,
    )


def _apns(**fields: str) -> str:
    app = {"bundle_id": "com.example.app", "key_id": "ABCDE12345"}
    app |= {"team_id": "TEAM123456"} | fields
    return json.dumps([app])


def _broken(case: str, tmp_path: Path) -> tuple[dict[str, str], str]:
    """The environment of a case, and the setting its message must name."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    not_ec = tmp_path / "rsa.p8"
    not_ec.write_bytes(_rsa_key_pem())
    good = tmp_path / "AuthKey.p8"
    good.write_bytes(_ec_key_pem())
    unreadable = tmp_path / "secret"
    unreadable.write_text("")
    account = {
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": "k1",
        "private_key": "not a key",
        "client_email": "sa@proj.iam.gserviceaccount.com",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    account_file = tmp_path / "sa.json"
    account_file.write_text(json.dumps(account))
    wns = {"package": "Example.App", "client_id": "ms-app://s-1-15-2-1"}
    cases = [
        (
            "apns key file missing",
            {"PUSHSTREAM_APNS": _apns(key_file=str(tmp_path / "nope.p8"))},
            "PUSHSTREAM_APNS__0__KEY_FILE",
        ),
        (
            "apns key is not EC P-256",
            {"PUSHSTREAM_APNS": _apns(key_file=str(not_ec))},
            "PUSHSTREAM_APNS__0__KEY_FILE",
        ),
        (
            "apns team id malformed",
            {"PUSHSTREAM_APNS": _apns(key_file=str(good), team_id="team")},
            "PUSHSTREAM_APNS__0__TEAM_ID",
        ),
        (
            "fcm service account json is not json",
            {
                "PUSHSTREAM_FCM": json.dumps(
                    [{"project_id": "p", "service_account_json": "{"}]
                )
            },
            "PUSHSTREAM_FCM__0__SERVICE_ACCOUNT_JSON",
        ),
        (
            "fcm service account key is not a key",
            {
                "PUSHSTREAM_FCM": json.dumps(
                    [{"project_id": "p", "service_account_file": str(account_file)}]
                )
            },
            "PUSHSTREAM_FCM__0__SERVICE_ACCOUNT_FILE",
        ),
        (
            "wns secret file missing",
            {
                "PUSHSTREAM_WNS": json.dumps(
                    [wns | {"client_secret_file": str(tmp_path / "nope")}]
                )
            },
            "PUSHSTREAM_WNS__0__CLIENT_SECRET_FILE",
        ),
        (
            "wns secret file empty",
            {
                "PUSHSTREAM_WNS": json.dumps(
                    [wns | {"client_secret_file": str(unreadable)}]
                )
            },
            "PUSHSTREAM_WNS__0__CLIENT_SECRET_FILE",
        ),
        (
            "a setting out of range",
            {"PUSHSTREAM_PARTITIONS": "0"},
            "PUSHSTREAM_PARTITIONS",
        ),
    ]
    return next((env, setting) for name, env, setting in cases if name == case)


BROKEN = (
    "apns key file missing",
    "apns key is not EC P-256",
    "apns team id malformed",
    "fcm service account json is not json",
    "fcm service account key is not a key",
    "wns secret file missing",
    "wns secret file empty",
    "a setting out of range",
)


@pytest.mark.parametrize("case", BROKEN)
def test_worker_refuses_to_start_naming_the_broken_setting(
    tmp_path: Path, case: str
) -> None:
    """A worker with a bad key would join the group and then fail every send."""
    env, setting = _broken(case, tmp_path / "creds")
    result = _run_worker(tmp_path, **env)
    assert result.returncode == 1, result.stderr
    assert "Error: " in result.stderr, result.stderr
    message = result.stderr[result.stderr.index("Error: ") :]
    assert setting in message, result.stderr
    # No broker listens on port 1: had the worker got as far as Kafka, the
    # message would be about the connection instead.
    assert "Traceback" not in result.stderr
    assert "kafka" not in message.lower()


def test_topics_doc_lists_every_topic_and_delivery_field() -> None:
    """An analytics team reading docs/topics.md would miss a topic or a field."""
    from pushstream.events import Delivery

    text = (ROOT / "docs" / "topics.md").read_text()
    for spec in topics.TOPICS:
        assert f"| `{spec.name}` | {spec.key}" in text, spec.name
        assert f"`topics/{spec.name}.json`" in text, spec.name
        assert (ROOT / "topics" / f"{spec.name}.json").is_file()
    for name in Delivery.model_fields:
        assert f"| `{name}` |" in text, f"deliveries field {name}"


START_UP_PROBLEMS = {
    "a list that is not JSON": ({"PUSHSTREAM_APNS": "[{bundle"}, "PUSHSTREAM_APNS"),
    "no broker answers": ({}, "PUSHSTREAM_KAFKA_BOOTSTRAP"),
    "a bootstrap that is not host:port": (
        {"PUSHSTREAM_KAFKA_BOOTSTRAP": "localhost:kafka"},
        "PUSHSTREAM_KAFKA_BOOTSTRAP",
    ),
    "a config file that is not TOML": (
        {"PUSHSTREAM_CONFIG_FILE": "not-toml"},
        "PUSHSTREAM_CONFIG_FILE",
    ),
    "the web port in use": ({}, "PUSHSTREAM_WEB_PORT"),
}


@pytest.mark.parametrize("case", START_UP_PROBLEMS)
def test_worker_start_up_problem_is_one_line_naming_the_setting(
    tmp_path: Path, case: str
) -> None:
    """An operator would get a traceback to decipher instead of the setting to fix."""
    env, setting = START_UP_PROBLEMS[case]
    env = dict(env)
    if "PUSHSTREAM_CONFIG_FILE" in env:
        config = tmp_path / "pushstream.toml"
        config.write_text("partitions = [\n")
        env["PUSHSTREAM_CONFIG_FILE"] = str(config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if setting == "PUSHSTREAM_WEB_PORT":
            env["PUSHSTREAM_WEB_PORT"] = str(taken.getsockname()[1])
        result = _run_worker(tmp_path, **env)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "Error: " in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"Error: {setting}: "), result.stderr
    assert result.stderr.rstrip().endswith(errors[0])
