"""``pushstream sandbox``: its env file, its admin API, and its lifecycle."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sandboxproc import SandboxProcess

from pushstream.config import load_settings
from pushstream.localstack import StackError
from pushstream.sandbox.main import format_env, parse_env

env_names = st.from_regex(r"PUSHSTREAM_[A-Z_]{1,20}", fullmatch=True)
env_values = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"),
    max_size=200,
)


@given(st.dictionaries(env_names, env_values, max_size=8))
def test_env_file_round_trip(values: dict[str, str]) -> None:
    """A setting with quotes, spaces or JSON would reach the worker garbled."""
    assert parse_env(format_env(values)) == values


def test_env_file_is_shell_syntax(tmp_path: Path) -> None:
    """`set -a; . sandbox.env` in a shell would fail or set the wrong values."""
    path = tmp_path / "sandbox.env"
    path.write_text(format_env({"PUSHSTREAM_FCM": '[{"project_id": "a b"}]'}))

    shown = subprocess.run(
        ["sh", "-c", f'set -a; . "{path}"; printf %s "$PUSHSTREAM_FCM"'],
        capture_output=True,
        text=True,
        check=True,
    )

    assert shown.stdout == '[{"project_id": "a b"}]'


def test_env_file_configures_every_provider(sandbox: SandboxProcess) -> None:
    """A worker given the env file would not find the sandbox or its credentials."""
    with mock.patch.dict(os.environ, sandbox.env):
        settings = load_settings()

    ports = sandbox.ports
    assert settings.endpoints.apns_production == f"https://127.0.0.1:{ports['apns']}"
    assert settings.endpoints.apns_development == settings.endpoints.apns_production
    assert settings.endpoints.fcm == f"https://127.0.0.1:{ports['fcm']}"
    assert str(ports["wns"]) in settings.endpoints.wns_live_token
    assert settings.endpoints.ca_file is not None
    assert settings.endpoints.ca_file.is_file()
    assert settings.wns_allowed_hosts == (f"127.0.0.1:{ports['wns']}",)
    assert settings.apns
    assert settings.fcm
    assert settings.wns
    for project in settings.fcm:
        assert project.service_account_file is not None
        assert project.service_account_file.is_file()


def test_admin_api_switches_an_outage(sandbox: SandboxProcess) -> None:
    """Outage tests could not take one provider down while the others stay up."""
    sandbox.outage("fcm", on=True, mode="no-answer")

    stats = sandbox.stats()

    assert (stats["fcm"]["outage"], stats["fcm"]["outage_mode"]) == (True, "hang")
    assert not stats["apns"]["outage"]
    assert not stats["wns"]["outage"]
    sandbox.reset()
    assert not sandbox.stats()["fcm"]["outage"]


def test_admin_api_refuses_unknown_changes(sandbox: SandboxProcess) -> None:
    """A typo in a test's scenario would be ignored and the test pass for nothing."""
    with pytest.raises(StackError, match="400"):
        sandbox.scenario(platform="fcm", settings={"no_such_knob": 1})
    with pytest.raises(StackError, match="400"):
        sandbox.scenario(platform="gcm", outage=True)


def test_wns_channels_point_at_the_sandbox(sandbox: SandboxProcess) -> None:
    """Tests could not make WNS channels the worker is allowed to send to."""
    uri = sandbox.wns_channel(scenario="expired")

    assert uri.startswith(f"https://127.0.0.1:{sandbox.ports['wns']}/?token=expired.")


def test_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    """Stopping the sandbox would leave it running or report a failure."""
    process = SandboxProcess(tmp_path)

    assert process.stop() == 0
    assert "sandbox ready:" in process.log_tail()
