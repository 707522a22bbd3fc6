"""The local Kafka broker: configuration, lifecycle, and a real round trip."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner

from pushstream import localkafka
from pushstream.cli import cli

if TYPE_CHECKING:
    from conftest import Kafka, TestNames


def test_server_properties_stay_on_loopback_and_create_no_topics() -> None:
    """The dev broker would be reachable from the network, or invent topics."""
    local = localkafka.LocalKafka(port=19092, data_dir=Path("/tmp/k"))
    props = localkafka.server_properties(local, controller_port=19093)

    listeners = props["listeners"] + "," + props["advertised.listeners"]
    assert all("127.0.0.1" in part for part in listeners.split(","))
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.num.partitions"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"


def test_pom_names_kafka_and_a_logging_binding() -> None:
    """Without a binding the broker writes no log; without kafka_2.13, no broker."""
    pom = localkafka.pom_xml("4.1.1")

    assert "<artifactId>kafka_2.13</artifactId><version>4.1.1</version>" in pom
    assert "log4j-slf4j-impl" in pom
    assert "log4j-core" in pom


def test_settings_come_from_env_and_options(tmp_path: Path) -> None:
    """PUSHSTREAM_KAFKA_* would be ignored, or override explicit options."""
    env = {
        localkafka.ENV_PORT: "19999",
        localkafka.ENV_DATA: str(tmp_path / "d"),
        localkafka.ENV_VERSION: "4.2.0",
    }
    local = localkafka.LocalKafka.from_env(env)
    assert (local.port, local.data_dir, local.version) == (
        19999,
        tmp_path / "d",
        "4.2.0",
    )
    assert localkafka.LocalKafka.from_env(env, port=18888, version=None).port == 18888

    with pytest.raises(localkafka.LocalKafkaError, match="PUSHSTREAM_KAFKA_PORT"):
        localkafka.LocalKafka.from_env({localkafka.ENV_PORT: "ninety"})


def test_stale_pid_file_reads_as_stopped(tmp_path: Path) -> None:
    """After a crash or reboot, `status` would claim a dead broker runs."""
    local = localkafka.LocalKafka(data_dir=tmp_path)
    state = {"pid": os.getpid(), "port": 9092, "version": "4.1.1"}
    local.state_file.write_text(json.dumps(state))

    # Our own pid is alive but is not a Kafka JVM for this folder.
    assert not localkafka.status(local).running

    local.state_file.write_text("{not json")
    assert not localkafka.status(local).running


def test_up_refuses_a_port_another_program_holds(tmp_path: Path) -> None:
    """`kafka up` would start a JVM that dies on bind, with a confusing error."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        local = localkafka.LocalKafka.from_env(port=port, data_dir=tmp_path / "k")

        with pytest.raises(localkafka.LocalKafkaError, match=f"{port} is in use"):
            localkafka.up(local)


def test_up_uses_a_broker_that_already_answers_on_the_port(
    kafka: Kafka, tmp_path: Path
) -> None:
    """A second checkout's `make test` would fail while the dev broker runs."""
    port = int(kafka.bootstrap.rpartition(":")[2])
    local = localkafka.LocalKafka.from_env(port=port, data_dir=tmp_path / "k")

    started = localkafka.up(local)

    assert (started.started, started.foreign) == (False, True)
    assert not localkafka.status(local).running
    assert not localkafka.down(local).running


def test_in_use_tells_make_test_whether_to_start_a_broker(
    kafka: Kafka, tmp_path: Path
) -> None:
    """`make test` would start a second broker, or stop one it did not start."""
    port = int(kafka.bootstrap.rpartition(":")[2])
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        free = spare.getsockname()[1]

    def in_use(port: int) -> int:
        args = ["kafka", "--port", str(port), "--data", str(tmp_path), "in-use"]
        return CliRunner().invoke(cli, args).exit_code

    assert (in_use(port), in_use(free)) == (0, 1)


def test_status_reports_the_running_broker(kafka: Kafka) -> None:
    """`pushstream kafka status` would not tell a developer the broker runs."""
    port = int(kafka.bootstrap.rpartition(":")[2])
    local = kafka.local or localkafka.LocalKafka.from_env(port=port)
    if not localkafka.status(local).running:
        pytest.skip(reason=f"the broker at {kafka.bootstrap} is not a local one")

    result = CliRunner().invoke(
        cli, ["kafka", "--port", str(port), "--data", str(local.data_dir), "status"]
    )

    assert result.exit_code == 0, result.output
    assert "running" in result.output
    assert f"127.0.0.1:{port}" in result.output
    assert local.version in result.output


async def test_a_produced_message_is_consumed_back(
    kafka: Kafka, names: TestNames
) -> None:
    """Nothing built on Kafka works if a record does not come back from the broker."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = names.topic("roundtrip")
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 2, 1)])
    finally:
        await admin.close()

    sent = await kafka.produce(topic, [("user-1", {"hello": "world", "n": 1})])
    records = await kafka.consume(topic, 1)

    assert [(r.key, r.value) for r in records] == [
        ("user-1", {"hello": "world", "n": 1})
    ]
    assert (records[0].partition, records[0].offset) == sent[0]


@pytest.mark.timeout(240)
def test_lifecycle_survives_kill_minus_nine(kafka: Kafka, tmp_path: Path) -> None:
    """A broker killed with -9 would leave a folder that no longer starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    local = localkafka.LocalKafka.from_env(port=port, data_dir=tmp_path / "kafka")

    first = localkafka.up(local)
    try:
        assert first.started
        assert localkafka.status(local).running
        meta = (local.log_dirs / "meta.properties").read_text()

        again = localkafka.up(local)
        assert not again.started
        assert again.status.pid == first.status.pid

        assert first.status.pid is not None
        os.kill(first.status.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while localkafka.status(local).running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not localkafka.status(local).running

        restarted = localkafka.up(local)
        assert restarted.started
        assert restarted.status.pid != first.status.pid
        assert (local.log_dirs / "meta.properties").read_text() == meta
        assert localkafka.broker_answers(local.bootstrap)
    finally:
        stopped = localkafka.down(local)

    assert stopped.running
    assert not localkafka.status(local).running
    assert not localkafka.broker_answers(local.bootstrap)
    assert local.server_log.stat().st_size > 0


def test_a_cluster_id_starting_with_a_dash_formats(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One random id in 64 begins with "-": it must not read as an option."""
    local = localkafka.LocalKafka.from_env(port=0, data_dir=tmp_path / "kafka")
    cluster_id = "-" + "A" * 21
    monkeypatch.setattr(localkafka, "_cluster_id", lambda: cluster_id)
    localkafka._write_config(local, 0)

    localkafka._format(local)

    meta = (local.log_dirs / "meta.properties").read_text()
    assert f"cluster.id={cluster_id}" in meta
