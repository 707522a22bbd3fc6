"""Settings: one typed, frozen object, read once at start-up.

Every setting can come from an environment variable ``PUSHSTREAM_<NAME>``
(nested fields with ``__``, lists of apps as JSON), or from a TOML file named by
``PUSHSTREAM_CONFIG_FILE``; the environment wins. Credentials are read from
files or from variables, so Kubernetes secrets can be mounted either way.
A missing, unreadable or malformed setting stops start-up with a message that
names it (:class:`ConfigError`).

``docs/configuration.md`` lists every setting.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_PREFIX = "pushstream."
DEFAULT_PARTITIONS = 4
DEFAULT_TOKEN_MAX_AGE_DAYS = 270  # FCM expires Android tokens idle for 270 days.
APNS_PRODUCTION_HOST = "api.push.apple.com"
APNS_DEVELOPMENT_HOST = "api.sandbox.push.apple.com"
FCM_ENDPOINT = "https://fcm.googleapis.com"
WNS_LIVE_TOKEN_URL = "https://login.live.com/accesstoken.srf"
WNS_ENTRA_TOKEN_URL = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"
WNS_DOMAIN = "notify.windows.com"


class ConfigError(Exception):
    """A setting is missing, unreadable or malformed; the message names it."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ApnsApp(_Frozen):
    """Credentials for one iOS/macOS app (one bundle id).

    Token auth: ``key_file`` (or ``key``, the .p8 PEM text), ``key_id``,
    ``team_id`` (Apple's 10-character ids); apps of one (team, key) share one
    provider token and its connections. Certificate auth: ``cert_file``
    holding a PEM certificate and key (the key optionally encrypted with
    ``cert_password``), or a PKCS#12 bundle with ``cert_password``. The APNs
    client checks all of it when it starts.
    """

    bundle_id: str
    auth: Literal["token", "certificate"] = "token"
    key_id: str | None = None
    team_id: str | None = None
    key_file: Path | None = None
    key: SecretStr | None = None
    cert_file: Path | None = None
    cert_password: SecretStr | None = None


class FcmProject(_Frozen):
    """A Firebase project and its service-account key (file or JSON text)."""

    project_id: str
    service_account_file: Path | None = None
    service_account_json: SecretStr | None = None
    rate_per_minute: int = Field(default=500_000, gt=0)


class WnsApp(_Frozen):
    """A Windows app: ``live`` (package SID + secret) or ``entra`` (Entra ID)."""

    package: str = Field(description="The app name registrations carry.")
    auth: Literal["live", "entra"] = "live"
    client_id: str
    client_secret: SecretStr | None = None
    client_secret_file: Path | None = None
    tenant_id: str | None = None


class Endpoints(_Frozen):
    """Where the providers are; the sandbox overrides all of these."""

    apns_production: str = f"https://{APNS_PRODUCTION_HOST}:443"
    apns_development: str = f"https://{APNS_DEVELOPMENT_HOST}:443"
    fcm: str = FCM_ENDPOINT
    wns_live_token: str = WNS_LIVE_TOKEN_URL
    wns_entra_token: str = WNS_ENTRA_TOKEN_URL
    ca_file: Path | None = Field(
        default=None, description="Extra CA to trust (the sandbox's)."
    )


class Settings(BaseSettings):
    """Everything a pushstream process can be told."""

    model_config = SettingsConfigDict(
        env_prefix="PUSHSTREAM_",
        env_nested_delimiter="__",
        frozen=True,
        extra="ignore",
    )

    # Kafka
    kafka_bootstrap: str = DEFAULT_BOOTSTRAP
    kafka_security_protocol: Literal[
        "PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"
    ] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    topic_prefix: str = DEFAULT_PREFIX
    partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1)
    send_partitions: int = Field(default=DEFAULT_PARTITIONS, ge=1)
    replication_factor: int = Field(default=1, ge=1)

    # The worker
    app_id: str = "pushstream"
    data_dir: Path = Path(".cache/worker")
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)
    log_level: str = "INFO"
    log_json: bool = False
    shutdown_timeout_s: float = Field(default=20.0, gt=0)

    # Device registry
    max_devices_per_user: int = Field(default=20, ge=1)
    token_max_age_days: int = Field(default=DEFAULT_TOKEN_MAX_AGE_DAYS, ge=1)
    sweep_interval_s: float = Field(default=3600.0, gt=0)

    # Routing
    dedup_window_s: int = Field(default=86_400, ge=60)

    # Sending
    send_batch_size: int = Field(default=500, ge=1)
    send_batch_within_s: float = Field(default=0.02, gt=0)
    max_in_flight: int = Field(default=1000, ge=1)
    request_timeout_s: float = Field(default=10.0, gt=0)
    connections_per_host: int = Field(default=2, ge=1)
    retry_max_attempts: int = Field(default=5, ge=1)
    retry_base_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=300.0, gt=0)
    breaker_failures: int = Field(default=20, ge=1)
    breaker_open_s: float = Field(default=5.0, gt=0)
    breaker_max_open_s: float = Field(default=60.0, gt=0)

    # Providers
    endpoints: Endpoints = Endpoints()
    apns: tuple[ApnsApp, ...] = ()
    fcm: tuple[FcmProject, ...] = ()
    wns: tuple[WnsApp, ...] = ()
    wns_allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="Extra channel hosts (host or host:port) trusted besides "
        "*.notify.windows.com; only for the sandbox.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("PUSHSTREAM_CONFIG_FILE")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, Path(config_file)))
        return tuple(sources)

    @field_validator("kafka_bootstrap")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        for server in value.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"{server.strip()!r} is not host:port; give one or more "
                    "host:port separated by commas, e.g. 127.0.0.1:9092"
                )
        return value

    def topic(self, name: str) -> str:
        """The full Kafka name of one of pushstream's topics."""
        return self.topic_prefix + name


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, or raise ConfigError naming what is wrong."""
    config_file = os.environ.get("PUSHSTREAM_CONFIG_FILE")
    if config_file and not Path(config_file).is_file():
        raise ConfigError(f"PUSHSTREAM_CONFIG_FILE: no such file: {config_file}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None
    except SettingsError as exc:
        raise ConfigError(_describe_unparsed(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"PUSHSTREAM_CONFIG_FILE: {config_file} is not valid TOML: {exc}"
        ) from None


def _describe(exc: ValidationError) -> str:
    """One line per refused setting, named as its environment variable."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        name = "PUSHSTREAM_" + "__".join(str(p) for p in error["loc"]).upper()
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {message}")
    if len(lines) == 1:
        return lines[0]
    return "invalid settings:\n  " + "\n  ".join(lines)


def _describe_unparsed(exc: SettingsError) -> str:
    """A value pydantic-settings could not parse (a list that is not JSON).

    Its message names the field only ('error parsing value for field "apns"
    from source ...'); the cause (a JSONDecodeError) says where it broke and
    never repeats the value, which may hold a secret.
    """
    field = re.search(r'field "([^"]+)"', str(exc))
    name = "PUSHSTREAM_" + field[1].upper() if field else "a PUSHSTREAM_ variable"
    cause = exc.__cause__
    why = f" ({cause})" if cause is not None else ""
    return f"{name}: not valid JSON{why}; lists and nested settings are JSON"
