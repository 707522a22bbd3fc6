"""``pushstream demo`` end to end: a real broker, sandbox and worker, a small sample.

The demo runs as a subprocess with the test's own topic prefix, app id and
folder. The test rebuilds the run's sample from its tag (printed by the demo)
and works out, from the devices and notifications in it, which outcomes the
pipeline must report; it then holds the demo's JSON line to them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from pushstream.demo_sample import DEAD, MIN_USERS, Apps, Sample, build_sample

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(400)]

USERS = MIN_USERS
SEED = 11
APPS = Apps(("com.example.sandbox",), ("project-a",), ("Contoso.Sandbox",))


def demo_command(names: Any, folder: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pushstream",
        "demo",
        *("--users", str(USERS), "--seed", str(SEED)),
        *("--prefix", names.topic_prefix, "--app-id", names.app_id),
        *("--folder", str(folder), "--deadline", "120"),
        *extra,
    ]


def demo_env(kafka: Any) -> dict[str, str]:
    return {**os.environ, "PUSHSTREAM_KAFKA_BOOTSTRAP": kafka.bootstrap}


def rebuilt(output: str) -> Sample:
    """The sample the demo published, rebuilt from the tag it printed."""
    found = re.search(r"^sample (\w+): ", output, re.MULTILINE)
    assert found, output
    return build_sample(
        USERS, apps=APPS, channel=lambda app, scenario: "", seed=SEED, tag=found[1]
    )


def must_follow(sample: Sample) -> Counter[str]:
    """The outcomes the published notifications must end in, by the table rules:
    one per device of the user (invalid_token for a dead token), one dropped
    for a user without devices, one expired, one duplicate per device."""
    live = {user: sample.devices.get(user, []) for user in sample.users}

    def for_user(user: str) -> Counter[str]:
        if not live[user]:
            return Counter(dropped=1)
        return Counter(
            "delivered" if d.scenario == "ok" else "invalid_token" for d in live[user]
        )

    expected: Counter[str] = Counter()
    for record in sample.notifications:
        value = json.loads(record.value)
        if record.what == "user":
            expected += for_user(record.key.decode() if record.key else "")
        elif record.what == "audience":
            for user in value["audience"]:
                expected += for_user(user)
        elif record.what == "raw tokens":
            expected["delivered"] += len(value["tokens"])
        elif record.what == "ttl passed":
            expected["expired"] += 1
        elif record.what == "duplicate id":
            user = record.key.decode() if record.key else ""
            expected["duplicate"] += len(live[user])
    return expected


def our_processes(names: Any, folder: Path) -> list[int]:
    """Pids of processes started for this test's demo (worker or sandbox)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        worker = f"PUSHSTREAM_APP_ID={names.app_id}".encode() in environ.split(b"\0")
        sandbox = str(folder).encode() in cmdline and b"sandbox" in cmdline
        if worker or sandbox:
            found.append(int(proc.name))
    return found


def test_every_notification_is_accounted_for(
    kafka: Any, names: Any, tmp_path: Path
) -> None:
    """The demo reports every notification it published, with the outcomes its
    scenarios call for, and leaves no process behind; otherwise `make demo`
    hides a lost or miscounted notification."""
    folder = tmp_path / "demo"
    done = subprocess.run(
        demo_command(names, folder),
        env=demo_env(kafka),
        capture_output=True,
        text=True,
        timeout=360,
    )
    output = done.stdout
    assert done.returncode == 0, output + done.stderr
    result = json.loads(output.strip().splitlines()[-1])
    sample = rebuilt(output)
    expected = must_follow(sample)

    assert result["notifications"] == USERS + 4  # + audience, raw, expired, repeat
    assert sum(result["outcomes"].values()) == sum(expected.values())
    assert {k: v for k, v in result["outcomes"].items() if v} == dict(+expected)
    for platform in ("apns", "fcm", "wns"):
        dead = sum(1 for p, _ in DEAD if p == platform)
        assert result["platforms"][platform]["invalid_token"] == dead
    assert result["invalidated_tokens"] == len(DEAD)
    assert result["dead_letters"] == 4
    assert result["sends"] == expected["delivered"] + expected["invalid_token"]
    assert our_processes(names, folder) == []


def test_sigterm_stops_what_the_demo_started(
    kafka: Any, names: Any, tmp_path: Path
) -> None:
    """SIGTERM in the middle of the demo stops its worker and sandbox; otherwise
    an interrupted demo leaves processes holding ports and the consumer group."""
    folder = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with log.open("w") as out:
        demo = subprocess.Popen(
            demo_command(names, folder),
            env=demo_env(kafka),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 180
        while "worker: ready" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert our_processes(names, folder), "the worker and sandbox should run now"
        demo.send_signal(signal.SIGTERM)
        status = demo.wait(timeout=120)

    assert status == 130, log.read_text()
    assert our_processes(names, folder) == []
