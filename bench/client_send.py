"""What the client benchmarks share: the sandbox process, the send they repeat,
the timed send loop and the client processes that run it.

``apns_bench.py``, ``fcm_bench.py`` and ``wns_bench.py`` each time one
provider client making the same request again and again against a sandbox
stand-in running in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from pushstream.events import Notification, Platform, Send
from pushstream.router import default_renderers
from pushstream.sandbox.certs import ensure_certs
from pushstream.senders.result import Target
from pushstream.senders.runner import SenderClient


class Timing(NamedTuple):
    """What a timed run measured: wall and CPU seconds, and each outcome's count."""

    elapsed_s: float
    cpu_s: float
    outcomes: dict[str, int]


def typical_send(
    platform: Platform, token: str, app: str, data: dict[str, str] | None = None
) -> Send:
    """A short notification (with ``data`` if given) for one device of ``app``."""
    extra = {"data": data} if data is not None else {}
    n = Notification(id="bench", title="Benchmark", body="x" * 100, **extra)
    render = default_renderers((platform,))[platform]
    rendered = render(n, Target(platform, token, app, "d"), 0, None)
    return Send(
        send_id="bench:d",
        notification_id="bench",
        device_id="d",
        platform=platform,
        app=app,
        token=token,
        accepted_at_ms=0,
        headers=rendered.headers,
        body=rendered.body,
    )


@contextmanager
def sandbox_process(
    name: str, serve: Callable[[str, Any], None]
) -> Iterator[tuple[Any, str, Any]]:
    """Run ``serve(folder, queue)`` in a spawned process until the block ends.

    Yields the multiprocessing context, the certificates folder and what
    ``serve`` put on the queue once listening (its port and credentials).
    """
    folder = str(Path(tempfile.gettempdir()) / f"pushstream-{name}-bench")
    ensure_certs(folder)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Queue()
    sandbox = ctx.Process(target=serve, args=(folder, ready), daemon=True)
    sandbox.start()
    try:
        yield ctx, folder, ready.get(timeout=60)
    finally:
        sandbox.terminate()


async def time_sends(
    client: SenderClient, sends: Sequence[Send], count: int, concurrency: int
) -> Timing:
    """Send ``count`` times through ``client``, ``concurrency`` at a time.

    The sends cycle through ``sends``. The CPU time is this process's, so
    the client should be the only thing it runs.
    """
    outcomes: dict[str, int] = {}
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            result = await client.send(sends[remaining % len(sends)])
            outcomes[result.outcome] = outcomes.get(result.outcome, 0) + 1

    started, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Timing(time.perf_counter() - started, time.process_time() - cpu, outcomes)


def run_clients(
    ctx: Any, target: Callable[..., None], args: tuple[Any, ...], clients: int
) -> Timing:
    """Run ``target(*args, queue)`` in ``clients`` processes at once.

    Each process puts one :class:`Timing` on the queue. The result adds
    their outcomes and CPU seconds; its wall time is the slowest process's.
    """
    results = ctx.Queue()
    processes = [
        ctx.Process(target=target, args=(*args, results)) for _ in range(clients)
    ]
    for process in processes:
        process.start()
    runs: list[Timing] = [results.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    total: dict[str, int] = {}
    for run in runs:
        for outcome, count in run.outcomes.items():
            total[outcome] = total.get(outcome, 0) + count
    slowest = max(run.elapsed_s for run in runs)
    return Timing(slowest, sum(run.cpu_s for run in runs), total)


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """Add the options of a bench running several client processes."""
    parser.add_argument("--sends", type=int, default=5000, help="per client process")
    parser.add_argument("--clients", type=int, default=1, help="client processes")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--connections", type=int, default=1)


def describe(client: str, timing: Timing, args: argparse.Namespace, how: str) -> str:
    """One line on what ``run_clients`` measured: sends/s and client CPU per send.

    ``args`` holds the options :func:`add_client_options` added; ``how``
    describes the client's settings.
    """
    sends = args.sends * args.clients
    delivered = timing.outcomes.get("delivered", 0)
    return (
        f"{client}: {delivered / timing.elapsed_s:,.0f} sends/s "
        f"({args.clients} process(es) x {args.sends} sends, "
        f"outcomes {timing.outcomes}; {how}); "
        f"client CPU {timing.cpu_s / sends * 1e6:,.0f} us per send"
    )
