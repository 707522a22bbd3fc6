"""A provider outage against a running worker: requests to the dead provider,
the other platforms' latency meanwhile, and the time to drain after recovery.

Starts ``pushstream sandbox`` and ``pushstream worker`` (subprocesses, fresh
topics on the broker at PUSHSTREAM_KAFKA_BOOTSTRAP, default 127.0.0.1:9092),
publishes APNs and FCM sends at a steady rate, takes APNs down for
``--outage`` seconds (``503`` answers or ``no-answer``), brings it back, and
waits until every send has its delivery. Usage::

    python bench/outage_bench.py [--outage 120] [--rate 20] [--mode 503]

Reported: APNs requests during the outage (a closed breaker would send one
per send and retry; an open one sends a probe per interval), FCM latency
while APNs was down, how long the APNs backlog took to drain, and whether
every send ended delivered exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from pushstream.events import Notification, Send
from pushstream.sandbox.main import ENV_FILE, PORTS_FILE, parse_env
from pushstream.senders import apns, fcm
from pushstream.senders.result import Target

BOOTSTRAP = os.environ.get("PUSHSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
APPS = {"apns": "com.example.sandbox", "fcm": "sandbox-project"}
RENDER = {"apns": apns.render, "fcm": fcm.render}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_send(platform: str, index: int) -> Send:
    token = uuid.uuid4().hex * 2 if platform == "apns" else f"ok-{uuid.uuid4().hex}"
    nid, did = f"n-{uuid.uuid4().hex[:12]}", f"d-{index}"
    target = Target(platform=platform, token=token, app=APPS[platform], device_id=did)  # type: ignore[arg-type]
    rendered = RENDER[platform](
        Notification(id=nid, title="Hi"), target, now_ms(), None
    )
    return Send(
        send_id=f"{nid}:{did}",
        notification_id=nid,
        device_id=did,
        platform=platform,  # type: ignore[arg-type]
        app=APPS[platform],
        token=token,
        accepted_at_ms=now_ms(),
        headers=rendered.headers,
        body=rendered.body,
    )


class Admin:
    """The sandbox's admin API."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def start_sandbox(
    folder: Path,
) -> tuple[subprocess.Popen[bytes], Admin, dict[str, str]]:
    ports = folder / PORTS_FILE
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "sandbox.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pushstream", "sandbox", "--folder", str(folder)]
        + [f"--{name}-port=0" for name in ("apns", "fcm", "wns", "admin")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    while not ports.exists():
        if process.poll() is not None:
            raise SystemExit(f"the sandbox exited; see {folder / 'sandbox.log'}")
        time.sleep(0.1)
    admin = Admin(json.loads(ports.read_text())["admin"])
    return process, admin, parse_env((folder / ENV_FILE).read_text())


def start_worker(env: dict[str, str], folder: Path) -> subprocess.Popen[bytes]:
    subprocess.run(
        [sys.executable, "-m", "pushstream", "topics", "create"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    log = (folder / "worker.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "pushstream", "worker"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    port = env["PUSHSTREAM_WEB_PORT"]
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the worker exited; see {folder / 'worker.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)


async def publish_steadily(
    producer: AIOKafkaProducer, prefix: str, rate: float, seconds: float
) -> list[Send]:
    sends: list[Send] = []
    started = time.monotonic()
    index = 0
    while time.monotonic() - started < seconds:
        for platform in ("apns", "fcm"):
            send = make_send(platform, index)
            sends.append(send)
            await producer.send(
                f"{prefix}sends.{platform}",
                send.model_dump_json().encode(),
                key=send.send_id.encode(),
            )
        index += 1
        await asyncio.sleep(max(0.0, started + index / rate - time.monotonic()))
    await producer.flush()
    return sends


async def collect(
    prefix: str, wanted: set[str], seen: dict[str, list[dict[str, Any]]]
) -> None:
    consumer = AIOKafkaConsumer(
        f"{prefix}deliveries", bootstrap_servers=BOOTSTRAP, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        while not wanted.issubset(seen):
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    value = json.loads(record.value)
                    value["seen_at_ms"] = now_ms()
                    seen.setdefault(value.get("send_id", ""), []).append(value)
    finally:
        await consumer.stop()


async def delete_topics(prefix: str) -> None:
    """Remove the run's topics (and Faust's, named after the app id)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        names = [n for n in await admin.list_topics() if n.startswith(prefix[:-1])]
        if names:
            await admin.delete_topics(names)
    finally:
        await admin.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="outage-bench-"))
    sandbox, admin, sandbox_env = start_sandbox(folder / "sandbox")
    prefix = f"bench-outage-{uuid.uuid4().hex[:8]}."
    env = {
        **os.environ,
        **sandbox_env,
        "PUSHSTREAM_KAFKA_BOOTSTRAP": BOOTSTRAP,
        "PUSHSTREAM_TOPIC_PREFIX": prefix,
        "PUSHSTREAM_APP_ID": prefix.rstrip("."),
        "PUSHSTREAM_DATA_DIR": str(folder / "worker"),
        "PUSHSTREAM_WEB_PORT": str(args.web_port),
    }
    worker = start_worker(env, folder)
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP)
    await producer.start()
    seen: dict[str, list[dict[str, Any]]] = {}
    try:
        warmup = await publish_steadily(producer, prefix, args.rate, 5)
        admin.call("/scenario", {"platform": "apns", "outage": True, "mode": args.mode})
        before = admin.call("/stats")["apns"]["requests"]
        down_at = now_ms()
        during = await publish_steadily(producer, prefix, args.rate, args.outage)
        requests = admin.call("/stats")["apns"]["requests"] - before
        admin.call("/scenario", {"platform": "apns", "outage": False})
        up_at = now_ms()
        sends = warmup + during
        await collect(prefix, {s.send_id for s in sends}, seen)
    finally:
        await producer.stop()
        worker.terminate()
        worker_status = worker.wait(60)
        sandbox.terminate()
        sandbox.wait(30)
        await delete_topics(prefix)

    fcm_latency = [
        seen[s.send_id][0]["completed_at_ms"] - s.accepted_at_ms
        for s in during
        if s.platform == "fcm"
    ]
    apns_done = [
        seen[s.send_id][0]["seen_at_ms"] for s in during if s.platform == "apns"
    ]
    outcomes: dict[str, int] = {}
    for s in sends:
        for delivery in seen[s.send_id]:
            outcomes[delivery["outcome"]] = outcomes.get(delivery["outcome"], 0) + 1
    return {
        "outage_s": args.outage,
        "mode": args.mode,
        "apns_sends_during_outage": sum(1 for s in during if s.platform == "apns"),
        "apns_requests_during_outage": requests,
        "fcm_latency_ms_p50": statistics.median(fcm_latency),
        "fcm_latency_ms_max": max(fcm_latency),
        "apns_drain_s_after_recovery": round((max(apns_done) - up_at) / 1000, 1),
        "outcomes": outcomes,
        "sends_with_two_deliveries": sum(1 for s in sends if len(seen[s.send_id]) > 1),
        "outage_started_ms": down_at,
        "worker_exit_status": worker_status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=120.0, help="seconds down")
    parser.add_argument("--rate", type=float, default=20.0, help="sends/s each")
    parser.add_argument("--mode", choices=("503", "no-answer"), default="503")
    parser.add_argument("--web-port", type=int, default=16166)
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
