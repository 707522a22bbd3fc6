"""``make bench``: pushstream's speed end to end, beside this machine's raw limits.

One run, on fresh topics (``bench-<tag>.``, deleted at the end):

1. the broker (started if none answers; stopped at the end only then), the
   sandbox and ``--workers`` workers (one by default), as ``pushstream
   demo`` runs them; several workers share the partitions as a consumer
   group, as they would on several machines;
2. ``--users`` users with ``--devices`` devices each, APNs, FCM and WNS in
   the ``--mix`` shares, registered and applied;
3. burst: ``--notifications`` notifications published as fast as the
   producer takes them; notifications per second from the first publish to
   the last final outcome on deliveries (``--profile`` records the worker
   with py-spy meanwhile and prints where its time goes);
4. steady: ``--rate`` notifications per second for ``--seconds``; the
   latency of every final outcome (publish to this process's consumer);
5. the raw limits, with the worker stopped: h2load against the sandbox's
   APNs endpoint with a valid provider token (our own HTTP/2 loop when
   h2load is missing, said so in the output), then an aiokafka
   consume-and-produce pass-through that does no work, and the same two hops
   in a Faust worker built like pushstream's whose agents do no work
   (``passthrough.py``).

It prints a table, then one JSON line: ``{"notifications_per_s", "p50_ms",
"p99_ms", "kafka_passthrough_per_s", "sandbox_http2_per_s",
"ratio_to_limit"}``; the latencies are the steady phase's, and
``ratio_to_limit`` is ours over the smaller of the two limits (the HTTP/2
one divided by the devices per notification); ``faust_noop_per_s``, the
no-op Faust worker's rate, and ``workers`` are added after them.

``--memory`` measures something else instead: the worker's resident memory
with ``--memory-devices`` devices (default 1,000,000) in the table.

These are measurements, not tests: run them on a quiet machine (the load
average is printed with the figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import e2e
import passthrough

from pushstream import localstack, topics
from pushstream.config import ApnsApp, Endpoints, Settings, load_settings
from pushstream.demo_sample import Apps
from pushstream.events import Notification, Send
from pushstream.senders import apns
from pushstream.senders.apns_auth import ProviderToken, load_signing_key
from pushstream.senders.result import Target

FOLDER = Path(".cache/bench")
TOKEN = "e" + "0123456789abcdef" * 3 + "012345678901234"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--devices", type=int, default=1, help="per user")
    parser.add_argument("--notifications", type=int, default=20_000, help="burst")
    parser.add_argument("--rate", type=float, default=1000.0, help="0: no steady run")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--mix", default="apns=0.5,fcm=0.35,wns=0.15")
    parser.add_argument("--passthrough", type=int, default=20_000, help="0: skip")
    parser.add_argument("--h2load", type=int, default=20_000, help="0: skip")
    # 10 x 10 in flight: APNs (and the sandbox) open a connection at one
    # stream and refuse the streams over it until the first request is
    # answered; h2load gives up a connection that opened 100 at once.
    parser.add_argument("--h2load-connections", type=int, default=10)
    parser.add_argument("--h2load-streams", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the (first) worker"
    )
    parser.add_argument("--memory", action="store_true", help="the memory run only")
    parser.add_argument("--memory-devices", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep topics and data")
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra variable for the worker (PUSHSTREAM_*, Faust's own)",
    )
    return parser.parse_args()


# --- the raw HTTP/2 limit ---------------------------------------------------------


def apns_request(env: dict[str, str], issued_at: float) -> tuple[ApnsApp, str, Send]:
    """The sandbox's APNs app, a provider token for it, and a typical send.

    The token is made for the same 25-minute slot as the worker's (its
    ``iat`` is ``issued_at``'s slot), so the sandbox does not count it as a
    token update (TooManyProviderTokenUpdates).
    """
    app = ApnsApp(**json.loads(env["PUSHSTREAM_APNS"])[0])
    key = load_signing_key(app, 0)
    assert app.team_id
    assert app.key_id
    jwt = ProviderToken(app.team_id, app.key_id, key, clock=lambda: issued_at)
    body = e2e.notification("h2", 1)
    n = Notification.model_validate_json(body)
    rendered = apns.render(n, Target("apns", TOKEN, app.bundle_id, "d"), 0, None)
    send = Send(
        send_id="h2:d",
        notification_id="h2",
        device_id="d",
        platform="apns",
        app=app.bundle_id,
        token=TOKEN,
        accepted_at_ms=0,
        headers=rendered.headers,
        body=rendered.body,
    )
    return app, jwt.current(), send


def h2load(
    sandbox: localstack.SandboxChild, args: argparse.Namespace, issued_at: float
) -> tuple[float, str] | None:
    """h2load against the sandbox's APNs endpoint: (requests/s, description).

    APNs, and the sandbox, open a connection at one concurrent stream and
    refuse the streams over it until the first request is answered; h2load
    sends its first streams before it reads that setting and sometimes gives
    the connection up. So a run where fewer than 90 % of the requests were
    answered 200 is made again, three times at most; None after that.
    """
    _, jwt, send = apns_request(sandbox.worker_env, issued_at)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body:
        body.write(send.body)
    command = [
        "h2load",
        f"-n{args.h2load}",
        f"-c{args.h2load_connections}",
        f"-m{args.h2load_streams}",
        f"-d{body.name}",
        *("-H", f"authorization: bearer {jwt}"),
        *(arg for k, v in send.headers.items() for arg in ("-H", f"{k}: {v}")),
        f"https://127.0.0.1:{sandbox.ports['apns']}/3/device/{TOKEN}",
    ]
    try:
        for _ in range(3):
            done = subprocess.run(command, capture_output=True, text=True, timeout=600)
            took = re.search(r"finished in ([\d.]+)(m?s),", done.stdout)
            codes = re.search(r"status codes: (\d+) 2xx", done.stdout)
            ok = int(codes.group(1)) if codes else 0
            if took and ok >= 0.9 * args.h2load:
                seconds = float(took.group(1)) / (1000 if took.group(2) == "ms" else 1)
                what = (
                    f"h2load, {args.h2load_connections} connection(s) x "
                    f"{args.h2load_streams} streams, {ok} of {args.h2load} answered 200"
                )
                return ok / seconds, what
    finally:
        Path(body.name).unlink()
    return None


async def own_h2_loop(
    sandbox: localstack.SandboxChild, args: argparse.Namespace, issued_at: float
) -> tuple[float, str]:
    """Without h2load: pushstream's APNs client, as many in flight as h2load's."""
    app, _, send = apns_request(sandbox.worker_env, issued_at)
    url = f"https://127.0.0.1:{sandbox.ports['apns']}"
    ca_file = sandbox.worker_env["PUSHSTREAM_ENDPOINTS__CA_FILE"]
    endpoints = Endpoints(
        apns_production=url, apns_development=url, ca_file=Path(ca_file)
    )
    in_flight = args.h2load_connections * args.h2load_streams
    outcomes: Counter[str] = Counter()
    remaining = args.h2load
    async with apns.ApnsClient(
        [app], endpoints, connections=args.h2load_connections
    ) as client:
        await client.send(send)

        async def loop() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                outcomes[(await client.send(send)).outcome] += 1

        began = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(in_flight)))
        elapsed = time.perf_counter() - began
    what = (
        f"pushstream's own APNs client, {in_flight} in flight, {dict(outcomes)}; a "
        "lower bound of the sandbox's limit, since the client's CPU counts too"
    )
    return outcomes["delivered"] / elapsed, what


# --- profiling -----------------------------------------------------------------------


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start_profile(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    tool = py_spy()
    if tool is None:
        print("profile: py-spy is not installed (pip install py-spy); no profile")
        return None
    command = [tool, "record", "--pid", str(pid), "--rate", "200", "--format"]
    command += ["raw", "--output", str(out), "--nonblocking"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profile(profiler: subprocess.Popen[bytes] | None, out: Path) -> list[str]:
    """Stop py-spy and summarise its stacks: where the worker spends its time."""
    if profiler is None:
        return []
    profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(60)
    except subprocess.TimeoutExpired:
        profiler.kill()
    if not out.exists():
        error = profiler.stderr.read().decode() if profiler.stderr else ""
        return [f"profile: py-spy wrote nothing: {error.strip()[-300:]}"]
    return profile_summary(out.read_text())


# Frames whose total time says which part of the worker is busy.
PARTS = (
    ("Router.handle", "router: one notification"),
    ("Registry.handle", "registry: one registration or token event"),
    ("PlatformSender.handle", "senders: one send, its outcome published"),
    ("PlatformSender._publish", "  publishing outcomes"),
    ("PlatformSender._attempt", "  the request"),
    ("ApnsClient.send", "    APNs client"),
    ("FcmClient.send", "    FCM client"),
    ("WnsClient.send", "    WNS client"),
    ("H2Connection.data_received", "  HTTP/2 responses read (APNs, FCM)"),
    ("Consumer._drain_messages", "Faust: handing fetched records to agents"),
    ("Sender._send_produce_req", "aiokafka: produce requests"),
    ("Fetcher._fetch_requests_routine", "aiokafka: fetch requests"),
    ("Store._set", "RocksDB writes"),
)


def profile_summary(raw: str, top: int = 15) -> list[str]:
    """Where the worker's time goes, from py-spy's raw stacks.

    The share of samples in each part of the pipeline (:data:`PARTS`, with
    what it calls), then the functions with the most time of their own.
    """
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";") if f]
        samples += count
        if frames:
            own[frames[-1]] += count
        for name in {f.partition(" (")[0] for f in frames}:
            total[name] += count
    if not samples:
        return ["profile: no samples"]
    lines = [f"profile of the worker during the burst ({samples} samples)"]
    lines.append("  by part (with what it calls):")
    for frame, what in PARTS:
        lines.append(f"  {100 * total[frame] / samples:5.1f}%  {what} ({frame})")
    lines.append("  functions by own time:")
    for frame, count in own.most_common(top):
        lines.append(f"  {100 * count / samples:5.1f}%  {frame}")
    return lines


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``, packages shortened."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0]
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    path = path.removeprefix(str(Path.cwd()) + "/")
    return f"{name} ({path})"


# --- CPU use -----------------------------------------------------------------------


class Cpu:
    """CPU seconds used by the processes of a run, from /proc."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = {name: pid for name, pid in pids.items() if pid}
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._began = (time.monotonic(), self._read())

    def _read(self) -> dict[str, float]:
        used = {}
        for name, pid in self.pids.items():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2]
            except OSError:
                continue
            utime, stime = fields.split()[11:13]
            used[name] = (int(utime) + int(stime)) / self._ticks
        return used

    def line(self, what: str) -> str:
        """Each process's share of one core since this meter was made."""
        began, before = self._began
        seconds = time.monotonic() - began
        after = self._read()
        shares = ", ".join(
            f"{name} {100 * (after[name] - before[name]) / seconds:.0f}%"
            for name in after
            if name in before
        )
        return f"  cpu during {what} (100% = one core): {shares}"


def worker_pids(workers: list[localstack.WorkerChild]) -> dict[str, int | None]:
    """The workers' pids for :class:`Cpu`: "worker", or "worker1", "worker2"..."""
    if len(workers) == 1:
        return {"worker": workers[0].pid}
    return {f"worker{n}": w.pid for n, w in enumerate(workers, start=1)}


def broker_pid() -> int | None:
    from pushstream import localkafka

    return localkafka.status(localkafka.LocalKafka.from_env()).pid


# --- the runs ------------------------------------------------------------------------


def bench_settings(tag: str) -> Settings:
    app_id = f"bench-{tag}"
    return load_settings(
        topic_prefix=f"{app_id}.", app_id=app_id, data_dir=FOLDER / tag / "worker"
    )


async def full_run(
    settings: Settings, args: argparse.Namespace, children: list[localstack.Child]
) -> dict[str, Any]:
    folder = FOLDER / settings.app_id.removeprefix("bench-")
    report = await topics.ensure_topics(settings)
    assert report.ok, report.problems
    sandbox = await localstack.start_sandbox(folder / "sandbox")
    children.append(sandbox)
    workers = []
    for number in range(1, args.workers + 1):
        env = localstack.worker_env(
            settings,
            sandbox.worker_env,
            PUSHSTREAM_DATA_DIR=str(settings.data_dir / str(number)),
            **extra_env(args),
        )
        worker = localstack.WorkerChild(env, folder / f"worker{number}.log")
        children.append(worker)
        workers.append(worker)
        await worker.start()
    for worker in workers:
        await worker.wait_ready(localstack.READY_TIMEOUT_S)
        print(f"worker ready (pid {worker.pid}, log {worker.log_path})")

    apps = Apps.from_env(sandbox.worker_env)
    mix = e2e.Mix(
        e2e.parse_mix(args.mix),
        {"apns": apps.apns, "fcm": apps.fcm, "wns": apps.wns},
    )
    records = await asyncio.to_thread(
        lambda: list(
            e2e.registrations(args.users, args.devices, mix, sandbox.wns_channel)
        )
    )
    count, seconds = await e2e.register(settings, iter(records))
    print(
        f"registrations: {count} devices of {args.users} users applied in "
        f"{seconds:.1f}s ({count / seconds:,.0f}/s)"
    )

    reader = e2e.Deliveries(settings)
    await reader.start()
    issued_at = time.time()  # the worker's first APNs token is made now
    runs = []
    profile_lines: list[str] = []
    try:
        warm = await e2e.burst(
            settings, reader, "warm-up", 1000, args.users, args.devices
        )
        print(f"warm-up: {warm.received}/{warm.expected} outcomes")
        load = os.getloadavg()[0]
        profile_out = folder / "profile.txt"
        first = workers[0].pid or 0
        profiler = start_profile(first, profile_out) if args.profile else None
        pids = worker_pids(workers) | {"sandbox": sandbox.pid, "broker": broker_pid()}
        cpu = Cpu(pids | {"bench": os.getpid()})
        runs.append(
            await e2e.burst(
                settings, reader, "burst", args.notifications, args.users, args.devices
            )
        )
        cpu_lines = [cpu.line("the burst")]
        profile_lines = stop_profile(profiler, profile_out)
        if args.rate > 0:
            cpu = Cpu(pids | {"bench": os.getpid()})
            runs.append(
                await e2e.steady(
                    settings,
                    reader,
                    f"steady {args.rate:,.0f}/s",
                    args.rate,
                    args.seconds,
                    args.users,
                    args.devices,
                )
            )
            cpu_lines.append(cpu.line("the steady run"))
    finally:
        await reader.aclose()
    worker_rss = [rss_mib(worker.pid) for worker in workers]
    for worker in workers:
        await worker.stop()

    h2_rate, h2_what = 0.0, "skipped"
    if args.h2load:
        measured = None
        why = "h2load is not installed (apt-get install nghttp2-client)"
        if shutil.which("h2load"):
            measured = await asyncio.to_thread(h2load, sandbox, args, issued_at)
            why = "h2load failed three times"
        if measured is None:
            h2_rate, h2_what = await own_h2_loop(sandbox, args, issued_at)
            h2_what = f"{why}: {h2_what}"
        else:
            h2_rate, h2_what = measured
    await sandbox.stop()

    pt_rate = noop_rate = 0.0
    if args.passthrough:
        values = [
            (e2e.user_id(i % args.users).encode(), e2e.notification(f"pt-{i}", i))
            for i in range(args.passthrough)
        ]
        pt_rate = await passthrough.run(settings, values, fanout=args.devices)
        if args.devices == 1:
            noop_rate = await passthrough.run_faust(settings, values, folder)

    burst = runs[0]
    latency = runs[-1]
    limits = [r for r in (pt_rate, h2_rate / args.devices) if r > 0]
    limit = min(limits) if limits else 0.0
    lines = ["", f"load average before the burst: {load:.2f}", *e2e.summary(runs)]
    lines += cpu_lines
    lines += [
        "  worker RSS after the runs: "
        + ", ".join(f"{rss:.0f} MiB" for rss in worker_rss),
        f"  raw limit, sandbox APNs over HTTP/2: {h2_rate:,.0f} requests/s ({h2_what})",
        f"  raw limit, Kafka pass-through: {pt_rate:,.0f} notifications/s "
        f"(aiokafka, 2 hops x {args.devices} device(s), no work)",
        f"  the same two hops in a Faust worker built like ours, agents doing "
        f"nothing: {noop_rate:,.0f} notifications/s",
        f"  ours / smaller limit: {burst.notifications_per_s / limit:.2f}"
        if limit
        else "  no limit measured",
    ]
    print("\n".join(lines + (["", *profile_lines] if profile_lines else [])))
    return {
        "notifications_per_s": round(burst.notifications_per_s, 1),
        "p50_ms": round(latency.percentile(0.5), 1),
        "p99_ms": round(latency.percentile(0.99), 1),
        "kafka_passthrough_per_s": round(pt_rate, 1),
        "sandbox_http2_per_s": round(h2_rate, 1),
        "ratio_to_limit": round(burst.notifications_per_s / limit, 3)
        if limit
        else None,
        "faust_noop_per_s": round(noop_rate, 1),
        "workers": args.workers,
    }


async def memory_run(
    settings: Settings, args: argparse.Namespace, children: list[localstack.Child]
) -> dict[str, Any]:
    """The worker's RSS with ``--memory-devices`` devices in its table."""
    folder = FOLDER / settings.app_id.removeprefix("bench-")
    report = await topics.ensure_topics(settings)
    assert report.ok, report.problems
    host = "wns.bench.invalid"
    mix = e2e.Mix(
        e2e.parse_mix(args.mix),
        {
            "apns": ("com.example.sandbox",),
            "fcm": ("sandbox-project",),
            "wns": ("Contoso.Sandbox",),
        },
    )
    counter = iter(range(10**12))

    def channel(app: str, scenario: str) -> str:
        return f"https://{host}/?token={scenario}.{app}.{next(counter):012d}"

    devices = args.memory_devices
    users = devices // args.devices
    began = time.monotonic()
    count = await e2e.bulk_produce(
        settings,
        settings.topic(topics.REGISTRATIONS),
        e2e.registrations(users, args.devices, mix, channel),
    )
    print(f"produced {count} registrations in {time.monotonic() - began:.0f}s")

    env = localstack.worker_env(
        settings, extra_env(args), PUSHSTREAM_WNS_ALLOWED_HOSTS=json.dumps([host])
    )
    worker = localstack.WorkerChild(env, folder / "worker.log")
    children.append(worker)
    began = time.monotonic()
    await worker.start()
    await worker.wait_ready(localstack.READY_TIMEOUT_S)
    idle = rss_mib(worker.pid)
    await localstack.wait_consumed(
        settings,
        (topics.REGISTRATIONS, topics.TOKEN_OWNERS, topics.TOKEN_EVENTS),
        within=e2e.REGISTERED_WITHIN_S * 2,
    )
    applied_s = time.monotonic() - began
    rss, peak = rss_mib(worker.pid), rss_mib(worker.pid, "VmHWM")
    await worker.stop()
    print(
        f"\nload average: {os.getloadavg()[0]:.2f}\n"
        f"  {count:,} devices of {users:,} users applied in {applied_s:.0f}s "
        f"({count / applied_s:,.0f}/s)\n"
        f"  worker RSS: {idle:.0f} MiB ready and empty, {rss:.0f} MiB with the table, "
        f"peak {peak:.0f} MiB"
    )
    return {
        "devices": count,
        "worker_rss_mib": round(rss, 1),
        "worker_peak_rss_mib": round(peak, 1),
        "apply_per_s": round(count / applied_s, 1),
    }


def extra_env(args: argparse.Namespace) -> dict[str, str]:
    """``--worker-env NAME=VALUE`` options as a dict."""
    pairs = (item.partition("=") for item in args.worker_env)
    return {name: value for name, _, value in pairs}


def rss_mib(pid: int | None, field: str = "VmRSS") -> float:
    """A process's resident memory (or peak, VmHWM) from /proc, in MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(x for x in status.splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


async def main_async(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    children: list[localstack.Child] = []
    try:
        if args.memory:
            return await memory_run(settings, args, children)
        return await full_run(settings, args, children)
    finally:
        for child in reversed(children):
            await child.stop()
        if not args.keep:
            await localstack.delete_topics(settings)


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)  # aiokafka's retries are not news
    tag = secrets.token_hex(3)
    settings = bench_settings(tag)
    print(
        f"bench {tag}: load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        f" on {os.cpu_count()} CPUs"
    )
    broker = localstack.ensure_broker(settings.kafka_bootstrap)
    try:
        result = asyncio.run(main_async(settings, args))
    finally:
        if not args.keep:
            shutil.rmtree(FOLDER / tag / "worker", ignore_errors=True)
        broker.stop()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
