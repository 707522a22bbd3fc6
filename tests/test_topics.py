"""Topic specs, their schema files in topics/, and creating them on the broker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
import pytest
from click.testing import CliRunner

from pushstream import topics
from pushstream.cli import cli
from pushstream.config import Settings

if TYPE_CHECKING:
    from conftest import Kafka, TestNames

TOPICS_DIR = Path(__file__).resolve().parent.parent / "topics"


def _file(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((TOPICS_DIR / f"{name}.json").read_text())
    return document


@pytest.mark.parametrize("spec", topics.TOPICS, ids=lambda spec: spec.name)
def test_schema_file_matches_its_model(spec: topics.TopicSpec) -> None:
    """Upstream teams would validate against a contract the worker no longer has.

    Fix: `pushstream topics schemas --write`, review the diff, commit topics/.
    """
    path = TOPICS_DIR / f"{spec.name}.json"

    assert path.is_file(), f"{path} is missing"
    assert path.read_text() == topics.render_json(topics.schema_document(spec))


def test_no_schema_file_without_a_topic() -> None:
    """A removed or renamed topic would leave a stale contract in topics/."""
    assert topics.schema_drift(TOPICS_DIR) == []


def test_drift_is_detected_and_rewritten(tmp_path: Path) -> None:
    """`topics schemas` would pass while a file and its model disagree."""
    assert topics.write_schemas(tmp_path)
    assert topics.schema_drift(tmp_path) == []

    path = tmp_path / "notifications.json"
    document = json.loads(path.read_text())
    del document["schema"]["properties"]["title"]
    path.write_text(json.dumps(document))
    (tmp_path / "gone.json").write_text("{}")

    assert sorted(topics.schema_drift(tmp_path)) == [
        f"{tmp_path / 'gone.json'}: no such topic",
        f"{path}: differs from the model",
    ]
    result = CliRunner().invoke(cli, ["topics", "schemas", "--dir", str(tmp_path)])
    assert result.exit_code == 1

    topics.write_schemas(tmp_path)
    assert topics.schema_drift(tmp_path) == []
    assert not (tmp_path / "gone.json").exists()


def test_schema_files_are_deterministic() -> None:
    """Regenerating the files would produce noisy diffs."""
    once = topics.schema_files()
    assert once == topics.schema_files()
    assert all(text.endswith("}\n") for text in once.values())


def test_registration_schema_accepts_what_the_model_accepts() -> None:
    """An upstream team's validator and the worker would disagree on an event."""
    schema = _file("registrations")["schema"]
    register = {
        "type": "register",
        "user_id": "u1",
        "platform": "fcm",
        "token": "f" * 40,
        "app": "com.example",
        "event_time": "2025-01-01T00:00:00Z",
    }

    jsonschema.validate(register, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**register, "colour": "blue"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**register, "platform": "mms"}, schema)


def test_co_partitioned_topics_share_the_partition_count() -> None:
    """A device lookup would silently miss devices stored in another partition."""
    settings = Settings.model_construct(partitions=6, send_partitions=3)

    counts = {
        name: topics.BY_NAME[name].partition_count(settings)
        for name in topics.CO_PARTITIONED
    }

    assert set(counts.values()) == {6}
    assert topics.BY_NAME["sends.apns"].partition_count(settings) == 3
    assert topics.BY_NAME["dead-letters"].partition_count(settings) == 1


async def _read_back(kafka: Kafka, settings: Settings) -> dict[str, dict[str, Any]]:
    """Partitions and configs of the test's topics, straight from the admin API."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        names = [settings.topic(spec.name) for spec in topics.TOPICS]
        described = await admin.describe_topics(names)
        resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
        responses = await admin.describe_configs(resources)
    finally:
        await admin.close()
    found: dict[str, dict[str, Any]] = {
        t["topic"]: {"partitions": len(t["partitions"])} for t in described
    }
    for response in responses:
        for resource in response.to_object()["resources"]:
            entries = {
                e["config_names"]: e["config_value"] for e in resource["config_entries"]
            }
            found[resource["resource_name"]]["config"] = entries
    return found


async def test_create_matches_the_schema_files(
    kafka: Kafka, settings: Settings
) -> None:
    """Topics would be created with other partition counts or retention than
    the contract in topics/ promises."""
    report = await topics.ensure_topics(settings)

    assert report.ok, report.problems
    assert {state.action for state in report.topics} == {"created"}
    found = await _read_back(kafka, settings)
    for spec in topics.TOPICS:
        document = _file(spec.name)
        topic = found[settings.topic(spec.name)]
        assert topic["partitions"] == document["partitions"], spec.name
        for key, value in document["config"].items():
            assert topic["config"][key] == value, (spec.name, key)


async def test_second_create_is_idempotent(settings: Settings) -> None:
    """Running `topics create` twice (every deploy does) would fail or change
    topics."""
    await topics.ensure_topics(settings)

    again = await topics.ensure_topics(settings)

    assert again.ok, again.problems
    assert {state.action for state in again.topics} == {"exists"}


async def test_a_mismatched_existing_topic_is_reported(
    kafka: Kafka, settings: Settings
) -> None:
    """A topic with the wrong partition count would break co-partitioning silently."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(settings.topic("notifications"), 2, 1),
                NewTopic(
                    settings.topic("dead-letters"),
                    1,
                    1,
                    topic_configs={"cleanup.policy": "compact"},
                ),
            ]
        )
    finally:
        await admin.close()

    report = await topics.ensure_topics(settings)

    assert not report.ok
    problems = "\n".join(report.problems)
    assert f"{settings.topic('notifications')}: has 2 partitions" in problems
    assert "has cleanup.policy=compact, the spec says delete" in problems
    states = {state.name: state.action for state in report.topics}
    assert states["notifications"] == "mismatch"
    assert states["registrations"] == "created"


def test_cli_create_exits_non_zero_on_mismatch(kafka: Kafka, names: TestNames) -> None:
    """A deploy script would carry on with topics that do not fit the spec."""
    runner = CliRunner()
    args = ["topics", "--bootstrap", kafka.bootstrap, "--prefix", names.topic_prefix]

    created = runner.invoke(cli, [*args, "create"])
    assert created.exit_code == 0, created.output
    assert "created" in created.output

    described = runner.invoke(cli, [*args, "describe"])
    assert described.exit_code == 0, described.output

    grown = runner.invoke(cli, [*args, "create"], env={"PUSHSTREAM_PARTITIONS": "8"})
    assert grown.exit_code == 1
    assert "the spec says 8" in grown.output
