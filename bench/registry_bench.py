"""Registry throughput, memory and recovery time, through a real worker.

Publishes ``--devices`` registrations (one device per user, half APNs, half
FCM) to fresh topics, then starts ``pushstream worker`` and measures:

- registrations applied per second: from the worker being ready until its
  group has committed every registration (each one read, validated, applied
  to the RocksDB table, written to the changelog, its token claimed), and
  until the owner agent has settled every claim;
- the worker's resident memory (VmRSS) with the whole table loaded;
- recovery: the time from start to ready after a clean stop with the data
  folder kept (RocksDB reopened, changelog tail only), and with the data
  folder deleted (the whole table rebuilt from the changelog), and the
  memory after the rebuild.

Usage (a broker must run: ``pushstream kafka up``)::

    python bench/registry_bench.py [--devices 20000] [--partitions 4] [--keep]

The bench's topics are deleted at the end unless ``--keep``. This is a
measurement, not a test: run it on a quiet machine; ``--devices 1000000``
gives the figure for a large deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from pushstream import localstack, topics
from pushstream.config import Settings

T0 = "2026-01-01T00:00:00+00:00"


def registration(i: int) -> bytes:
    if i % 2:
        platform, token = "apns", f"{i:064x}"
    else:
        platform, token = "fcm", f"bench-{i:012d}:APA91b" + "x" * 140
    return json.dumps(
        {
            "type": "register",
            "user_id": f"user-{i:09d}",
            "device_id": "d1",
            "platform": platform,
            "token": token,
            "app": "com.example.bench",
            "locale": "en_US",
            "timezone": "Europe/Paris",
            "app_version": "5.4.1",
            "event_time": T0,
        }
    ).encode()


async def publish(settings: Settings, count: int) -> float:
    """Publish the registrations; returns the seconds it took."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        linger_ms=20,
        max_batch_size=256 * 1024,
        compression_type=None,
        acks=1,
    )
    await producer.start()
    start = time.monotonic()
    try:
        topic = settings.topic(topics.REGISTRATIONS)
        pending = []
        for i in range(count):
            key = f"user-{i:09d}".encode()
            pending.append(await producer.send(topic, registration(i), key=key))
            if len(pending) >= 5000:
                await asyncio.gather(*pending)
                pending.clear()
            if i and i % 100_000 == 0:
                print(f"  published {i}", flush=True)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - start


async def lag(settings: Settings, names: list[str]) -> int:
    """Records of ``names`` the worker's group has not committed yet."""
    admin = topics.admin_client(settings)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    await consumer.start()
    try:
        described = await admin.describe_topics([settings.topic(n) for n in names])
        tps = [
            TopicPartition(t["topic"], p["partition"])
            for t in described
            for p in t["partitions"]
        ]
        committed = await admin.list_consumer_group_offsets(settings.app_id)
        ends = await consumer.end_offsets(tps)
        return sum(
            ends[tp] - max(committed[tp].offset if tp in committed else 0, 0)
            for tp in tps
        )
    finally:
        await consumer.stop()
        await admin.close()


async def wait_lag_zero(settings: Settings, names: list[str], total: int) -> float:
    """Seconds until the group has committed everything in ``names``."""
    start = time.monotonic()
    last_print = start
    while (left := await lag(settings, names)) > 0:
        now = time.monotonic()
        if now - last_print > 10:
            done = total - left
            print(f"  {names[0]}: {done}/{total} applied", flush=True)
            last_print = now
        await asyncio.sleep(0.5)
    return time.monotonic() - start


class Worker:
    """A ``pushstream worker`` subprocess with its output in a log file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.port = int(env["PUSHSTREAM_WEB_PORT"])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start and wait until /ready; returns the seconds it took."""
        start = time.monotonic()
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pushstream", "worker"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        while not self.ready():
            if self.process.poll() is not None:
                raise SystemExit(f"the worker died; see {self.log}")
            time.sleep(0.2)
        return time.monotonic() - start

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/ready"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def rss_mib(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(120)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep topics and data")
    args = parser.parse_args()

    name = f"bench-registry-{uuid.uuid4().hex[:8]}"
    folder = Path(tempfile.mkdtemp(prefix=name + "-"))
    bootstrap = os.environ.get("PUSHSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    settings = Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=name + ".",
        app_id=name,
        partitions=args.partitions,
        data_dir=folder / "data",
    )
    env = dict(os.environ)
    env.update(
        PUSHSTREAM_KAFKA_BOOTSTRAP=bootstrap,
        PUSHSTREAM_TOPIC_PREFIX=settings.topic_prefix,
        PUSHSTREAM_APP_ID=name,
        PUSHSTREAM_PARTITIONS=str(args.partitions),
        PUSHSTREAM_DATA_DIR=str(settings.data_dir),
        PUSHSTREAM_WEB_PORT=str(free_port()),
        PUSHSTREAM_LOG_LEVEL="WARNING",
    )
    worker = Worker(env, folder / "worker.log")
    n = args.devices
    results: dict[str, Any] = {"devices": n, "partitions": args.partitions}
    try:
        report = asyncio.run(topics.ensure_topics(settings))
        assert report.ok, report.problems
        print(f"publishing {n} registrations ...", flush=True)
        seconds = asyncio.run(publish(settings, n))
        results["publish_per_s"] = round(n / seconds)

        results["start_empty_s"] = round(worker.start(), 2)
        print("applying ...", flush=True)
        registry_s = asyncio.run(
            wait_lag_zero(settings, [topics.REGISTRATIONS, topics.TOKEN_EVENTS], n)
        )
        results["registry_applied_per_s"] = round(n / registry_s)
        owners_s = asyncio.run(wait_lag_zero(settings, [topics.TOKEN_OWNERS], n))
        results["claims_settled_per_s"] = round(n / (registry_s + owners_s))
        results["rss_loaded_mib"] = round(worker.rss_mib(), 1)
        assert worker.stop() == 0, "the worker did not stop cleanly"

        results["restart_kept_data_s"] = round(worker.start(), 2)
        results["rss_restarted_mib"] = round(worker.rss_mib(), 1)
        assert worker.stop() == 0

        shutil.rmtree(settings.data_dir)
        results["restart_rebuilt_s"] = round(worker.start(), 2)
        results["rss_rebuilt_mib"] = round(worker.rss_mib(), 1)
        assert worker.stop() == 0
    finally:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.kill()
        if not args.keep:
            asyncio.run(localstack.delete_topics(settings))
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
