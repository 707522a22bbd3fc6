"""Requests per second of H2Pool against SandboxServer on loopback.

The server runs in a child process with a trivial handler, the client in this
one, so each side has a core. Usage::

    python bench/http2_loop.py [--requests 20000] [--concurrency 200]
        [--connections 1] [--max-streams 1000] [--body 256] [--profile client]

``--serve PORT`` runs only the server (for h2load: ``h2load -n 100000 -c 1
-m 100 https://127.0.0.1:PORT/``); ``--profile client`` prints the client's
hottest functions (cProfile) to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import multiprocessing
import pstats
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pushstream.sandbox.certs import ensure_certs
from pushstream.sandbox.server import Request, Response, SandboxServer
from pushstream.senders.http2 import H2Options, H2Pool

REPLY = Response(200, [("apns-id", "00000000-0000-0000-0000-000000000000")])


async def trivial(req: Request) -> Response:
    if req.path == "/cpu":  # the server's CPU seconds, for per-request cost
        return Response(200, body=str(time.process_time()).encode())
    return REPLY


def serve(
    folder: str,
    port: int,
    max_streams: int,
    ready: multiprocessing.Queue[int] | None = None,
) -> None:
    async def run() -> None:
        certs = ensure_certs(folder)
        context = certs.server_ssl_context()
        server = SandboxServer(
            "127.0.0.1", port, context, trivial, initial_max_streams=max_streams
        )
        await server.start()
        if ready is not None:
            ready.put(server.port)
        else:
            print(f"serving on 127.0.0.1:{server.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


async def load(port: int, folder: str, args: argparse.Namespace) -> Result:
    certs = ensure_certs(folder)
    options = H2Options(max_connections=args.connections)
    pool = H2Pool("127.0.0.1", port, certs.client_ssl_context(), options=options)
    body = b"x" * args.body
    # Like APNs token auth: a new device token in every path, a long-lived JWT.
    paths = [f"/3/device/{secrets.token_hex(32)}" for _ in range(1000)]
    headers = {
        "authorization": "bearer " + secrets.token_urlsafe(150),
        "apns-topic": "com.example.app",
        "apns-push-type": "alert",
        "apns-priority": "10",
    }
    remaining = 0

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            path = paths[remaining % 1000]
            await pool.request("POST", path, headers, body)

    async with pool:
        remaining = 200 * args.connections  # warm up: open every connection
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        remaining = args.requests
        server_cpu = float((await pool.request("GET", "/cpu")).body)
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        server_cpu = float((await pool.request("GET", "/cpu")).body) - server_cpu
    n = args.requests
    return Result(n / elapsed, cpu / n * 1e6, server_cpu / n * 1e6)


@dataclass(frozen=True)
class Result:
    rate: float
    client_us: float
    server_us: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--max-streams", type=int, default=1000)
    parser.add_argument("--body", type=int, default=256, help="request body bytes")
    parser.add_argument("--serve", type=int, metavar="PORT", help="only serve")
    parser.add_argument("--profile", choices=["client"])
    args = parser.parse_args()
    folder = str(Path(tempfile.gettempdir()) / "pushstream-bench-certs")

    if args.serve is not None:
        serve(folder, args.serve, args.max_streams)
        return
    ensure_certs(folder)
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    child = multiprocessing.Process(
        target=serve, args=(folder, 0, args.max_streams, queue), daemon=True
    )
    child.start()
    port = queue.get(timeout=30)
    try:
        if args.profile:
            with cProfile.Profile() as profiler:
                rate = asyncio.run(load(port, folder, args))
            stats = pstats.Stats(profiler, stream=sys.stderr)
            stats.sort_stats("tottime").print_stats(25)
        else:
            rate = asyncio.run(load(port, folder, args))
    finally:
        child.terminate()
    print(
        f"{args.requests} requests, concurrency {args.concurrency}, "
        f"{args.connections} connection(s): {rate.rate:,.0f} requests/s; "
        f"CPU per request: client {rate.client_us:.0f} us, "
        f"server {rate.server_us:.0f} us"
    )


if __name__ == "__main__":
    main()
