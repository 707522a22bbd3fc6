"""pushstream's Kafka topics: what each holds and how it is configured.

:data:`TOPICS` is the one list of every topic pushstream reads or writes:
its name (before the configured prefix), what its key is, its partition
count, cleanup policy and retention, and the model of its values. From it:

- :func:`ensure_topics` creates the topics through Kafka's admin API and checks
  topics that already exist; a partition count or setting that differs from
  the spec is reported, never silently accepted.
- :func:`schema_files` renders ``topics/<name>.json``, the contract an upstream
  team validates against: ``{"topic", "key", "partitions", "config", "schema"}``
  with the JSON Schema generated from the value's pydantic model.

registrations, notifications, token-events and token-owners always have the
same partition count (``Settings.partitions``): the registry and the router
read the devices table for the user of the event in hand, and a table lookup
sees only the partition of that event (see docs on co-partitioning).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, TypeAdapter

from pushstream import events
from pushstream.config import Settings

DAY_MS = 24 * 3600 * 1000

REGISTRATIONS = "registrations"
NOTIFICATIONS = "notifications"
TOKEN_EVENTS = "token-events"
TOKEN_OWNERS = "token-owners"
SENDS_APNS = "sends.apns"
SENDS_FCM = "sends.fcm"
SENDS_WNS = "sends.wns"
DELIVERIES = "deliveries"
RETRIES = "retries"
DEAD_LETTERS = "dead-letters"

# Where the partition count comes from: a Settings field, or a fixed number.
PartitionSource = Literal["partitions", "send_partitions"] | int

# Kafka's error code for a topic created by someone else since we looked.
_TOPIC_ALREADY_EXISTS = 36


class TopicError(Exception):
    """The broker refused or could not answer an admin request."""


@dataclass(frozen=True)
class TopicSpec:
    """One topic: name before the prefix, key, partitions, settings, values."""

    name: str
    key: str
    partitions: PartitionSource
    retention_ms: int
    model: type[BaseModel] | TypeAdapter[Any]
    cleanup_policy: Literal["delete", "compact"] = "delete"
    extra_config: Mapping[str, str] = field(default_factory=dict)

    def partition_count(self, settings: Settings) -> int:
        if isinstance(self.partitions, int):
            return self.partitions
        count: int = getattr(settings, self.partitions)
        return count

    @property
    def config(self) -> dict[str, str]:
        """The topic-level Kafka settings it is created with (and checked for)."""
        return {
            "cleanup.policy": self.cleanup_policy,
            "retention.ms": str(self.retention_ms),
            **self.extra_config,
        }

    def json_schema(self) -> dict[str, Any]:
        """The JSON Schema of the topic's values, from the pydantic model."""
        if isinstance(self.model, TypeAdapter):
            schema: dict[str, Any] = self.model.json_schema()
        else:
            schema = self.model.model_json_schema()
        return schema


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(
        REGISTRATIONS, "user id", "partitions", 7 * DAY_MS, events.REGISTRATIONS_RECORD
    ),
    TopicSpec(NOTIFICATIONS, "user id", "partitions", 7 * DAY_MS, events.Notification),
    TopicSpec(TOKEN_EVENTS, "user id", "partitions", 7 * DAY_MS, events.TokenEvent),
    TopicSpec(
        TOKEN_OWNERS,
        "token fingerprint",
        "partitions",
        7 * DAY_MS,
        events.TOKEN_OWNERS_RECORD,
    ),
    TopicSpec(SENDS_APNS, "send id", "send_partitions", DAY_MS, events.Send),
    TopicSpec(SENDS_FCM, "send id", "send_partitions", DAY_MS, events.Send),
    TopicSpec(SENDS_WNS, "send id", "send_partitions", DAY_MS, events.Send),
    TopicSpec(
        DELIVERIES, "notification id", "send_partitions", 7 * DAY_MS, events.Delivery
    ),
    TopicSpec(RETRIES, "send id", "send_partitions", DAY_MS, events.RetryRequest),
    TopicSpec(DEAD_LETTERS, "original key", 1, 30 * DAY_MS, events.DeadLetter),
)
BY_NAME: dict[str, TopicSpec] = {spec.name: spec for spec in TOPICS}

# These share the devices table's partitioning (see the module docstring).
CO_PARTITIONED: tuple[str, ...] = (
    REGISTRATIONS,
    NOTIFICATIONS,
    TOKEN_EVENTS,
    TOKEN_OWNERS,
)


# --- schema files -----------------------------------------------------------


def schema_document(spec: TopicSpec) -> dict[str, Any]:
    """The content of ``topics/<name>.json`` (partitions: the default count)."""
    return {
        "topic": spec.name,
        "key": spec.key,
        "partitions": spec.partition_count(Settings.model_construct()),
        "config": spec.config,
        "schema": spec.json_schema(),
    }


def render_json(document: Mapping[str, Any]) -> str:
    """Deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def schema_files(specs: Iterable[TopicSpec] = TOPICS) -> dict[str, str]:
    """File name -> content of every schema file."""
    return {f"{spec.name}.json": render_json(schema_document(spec)) for spec in specs}


def schema_drift(folder: Path, specs: Iterable[TopicSpec] = TOPICS) -> list[str]:
    """What differs between ``folder`` and the models: one line per file."""
    wanted = schema_files(specs)
    problems = []
    for name, content in wanted.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_text() != content:
            problems.append(f"{path}: differs from the model")
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            if path.name not in wanted:
                problems.append(f"{path}: no such topic")
    return problems


def write_schemas(folder: Path, specs: Iterable[TopicSpec] = TOPICS) -> list[Path]:
    """Write every schema file that changed, remove files of unknown topics;
    returns the paths written or removed."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = schema_files(specs)
    changed = []
    for name, content in wanted.items():
        path = folder / name
        if not path.is_file() or path.read_text() != content:
            path.write_text(content)
            changed.append(path)
    for path in sorted(folder.glob("*.json")):
        if path.name not in wanted:
            path.unlink()
            changed.append(path)
    return changed


# --- creating and checking topics on a broker -------------------------------


@dataclass(frozen=True)
class TopicState:
    """What one topic looks like on the broker, or what is wrong with it."""

    name: str
    topic: str
    action: Literal["created", "exists", "mismatch"]
    partitions: int
    config: dict[str, str]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """The outcome of :func:`ensure_topics`, one entry per topic in spec order."""

    topics: tuple[TopicState, ...]

    @property
    def ok(self) -> bool:
        return all(state.action != "mismatch" for state in self.topics)

    @property
    def problems(self) -> list[str]:
        return [
            f"{state.topic}: {problem}"
            for state in self.topics
            for problem in state.problems
        ]


def admin_client(settings: Settings, **options: Any) -> Any:
    """An (unstarted) aiokafka admin client for the configured cluster."""
    from aiokafka.admin import AIOKafkaAdminClient

    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=f"{settings.app_id}-admin",
        **kafka_security(settings),
        **options,
    )


def kafka_security(settings: Settings) -> dict[str, Any]:
    """aiokafka's connection security options from the settings."""
    options: dict[str, Any] = {"security_protocol": settings.kafka_security_protocol}
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        def text(path: Path | None) -> str | None:
            return str(path) if path else None

        options["ssl_context"] = create_ssl_context(
            cafile=text(settings.kafka_ssl_cafile),
            certfile=text(settings.kafka_ssl_certfile),
            keyfile=text(settings.kafka_ssl_keyfile),
        )
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism or "PLAIN"
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = (
            password.get_secret_value() if password else None
        )
    return options


async def ensure_topics(
    settings: Settings, specs: Iterable[TopicSpec] = TOPICS
) -> Report:
    """Create the missing topics and check the existing ones against the spec.

    Existing topics are checked for partition count, replication factor and
    the configs the spec sets. Raises TopicError when the broker refuses a
    request; a mismatch is reported in the returned Report instead.
    """
    specs = tuple(specs)
    admin = admin_client(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if settings.topic(s.name) not in existing]
        created = await _create(admin, settings, missing)
        states = await _describe(admin, settings, specs)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return Report(
        tuple(
            _judge(spec, states[spec.name], spec.name in created, settings)
            for spec in specs
        )
    )


async def describe_topics(
    settings: Settings, specs: Iterable[TopicSpec] = TOPICS
) -> Report:
    """Check the topics without creating any; missing ones are mismatches."""
    specs = tuple(specs)
    admin = admin_client(settings)
    await admin.start()
    try:
        states = await _describe(admin, settings, specs)
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return Report(
        tuple(_judge(spec, states[spec.name], False, settings) for spec in specs)
    )


async def _create(admin: Any, settings: Settings, specs: list[TopicSpec]) -> set[str]:
    from aiokafka.admin import NewTopic

    if not specs:
        return set()
    new = [
        NewTopic(
            settings.topic(spec.name),
            spec.partition_count(settings),
            settings.replication_factor,
            topic_configs=spec.config,
        )
        for spec in specs
    ]
    response = await admin.create_topics(new)
    created = set()
    by_topic = {settings.topic(spec.name): spec.name for spec in specs}
    for error in response.to_object()["topic_errors"]:
        code = error["error_code"]
        if code == 0:
            created.add(by_topic[error["topic"]])
        elif code != _TOPIC_ALREADY_EXISTS:
            raise TopicError(
                f"creating {error['topic']} failed: "
                f"{error['error_message'] or f'error code {code}'}"
            )
    return created


@dataclass(frozen=True)
class _Found:
    exists: bool
    partitions: int = 0
    replicas: int = 0
    config: dict[str, str] = field(default_factory=dict)


async def _describe(
    admin: Any, settings: Settings, specs: tuple[TopicSpec, ...]
) -> dict[str, _Found]:
    """Partitions, replication and the spec's configs of each topic."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    names = {settings.topic(spec.name): spec for spec in specs}
    found: dict[str, _Found] = {spec.name: _Found(False) for spec in specs}
    # A topic just created can take a moment to show up in the metadata.
    for _ in range(20):
        described = await admin.describe_topics(list(names))
        if all(t["error_code"] == 0 and t["partitions"] for t in described):
            break
        await asyncio.sleep(0.25)
    present = [t for t in described if t["error_code"] == 0 and t["partitions"]]
    if not present:
        return found
    resources = [
        ConfigResource(
            ConfigResourceType.TOPIC,
            t["topic"],
            dict.fromkeys(names[t["topic"]].config),
        )
        for t in present
    ]
    configs: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.to_object()["resources"]:
            if resource["error_code"] != 0:
                raise TopicError(
                    f"reading the configs of {resource['resource_name']} failed: "
                    f"{resource['error_message'] or resource['error_code']}"
                )
            configs[resource["resource_name"]] = {
                entry["config_names"]: entry["config_value"]
                for entry in resource["config_entries"]
            }
    for topic in present:
        spec = names[topic["topic"]]
        found[spec.name] = _Found(
            True,
            partitions=len(topic["partitions"]),
            replicas=min(len(p["replicas"]) for p in topic["partitions"]),
            config=configs.get(topic["topic"], {}),
        )
    return found


def _judge(
    spec: TopicSpec, found: _Found, created: bool, settings: Settings
) -> TopicState:
    """Compare what the broker has with the spec."""
    topic = settings.topic(spec.name)
    if not found.exists:
        return TopicState(spec.name, topic, "mismatch", 0, {}, ("does not exist",))
    problems = []
    want = spec.partition_count(settings)
    if found.partitions != want:
        problems.append(f"has {found.partitions} partitions, the spec says {want}")
    if found.replicas != settings.replication_factor:
        problems.append(
            f"has replication factor {found.replicas}, "
            f"the settings say {settings.replication_factor}"
        )
    for key, value in spec.config.items():
        actual = found.config.get(key)
        if actual != value:
            problems.append(f"has {key}={actual}, the spec says {value}")
    action: Literal["created", "exists", "mismatch"]
    action = "mismatch" if problems else ("created" if created else "exists")
    return TopicState(
        spec.name, topic, action, found.partitions, found.config, tuple(problems)
    )
