"""FCM sends per second: FcmClient against the FCM sandbox, and h2load beside it.

The sandbox (:class:`~pushstream.sandbox.fcm.FcmSandbox`, every check on,
records off) runs in its own process; each client process runs one
:class:`~pushstream.senders.fcm.FcmClient` with its own event loop, which
gets its access token from the sandbox's token endpoint like any worker.
Then h2load (Debian's ``nghttp2-client``) posts the same message with a
valid access token to the same endpoint, which shows how much of the figure
is the sandbox's own ceiling. Usage::

    python bench/fcm_bench.py [--sends 5000] [--clients 1] [--concurrency 200]
        [--connections 1] [--rate 1000000000] [--h2load-clients 1] [--no-h2load]

``--rate`` is the client's per-project limit in sends a minute; the default
lifts it, pushstream's default (500,000 a minute) would cap a run at 8,333
sends/s. Both figures count requests answered 200. Loopback, no network
latency: this measures the CPU cost per send, not what Google allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import httpx
from client_send import (
    add_client_options,
    describe,
    run_clients,
    sandbox_process,
    time_sends,
    typical_send,
)
from h2load_run import add_h2load_options, print_h2load, run_h2load

from pushstream.config import FcmProject
from pushstream.events import Send
from pushstream.sandbox.certs import ensure_certs
from pushstream.sandbox.fcm import FcmSandbox
from pushstream.senders import fcm
from pushstream.senders.oauth import GoogleTokenSource

PROJECT = "bench-project"
TOKEN = "bench-device-" + "aB3_x-Yz9:" * 15


def serve(folder: str, queue: Any) -> None:
    """The sandbox process: serve FCM, hand the port and settings back."""

    async def run() -> None:
        certs = ensure_certs(folder)
        sandbox = FcmSandbox(record=False)
        server = sandbox.server(certs)
        await server.start()
        sandbox.base_url = f"https://127.0.0.1:{server.port}"
        values = sandbox.make_credentials(Path(folder) / "creds", projects=[PROJECT])
        queue.put((server.port, values["PUSHSTREAM_FCM"]))
        await asyncio.Event().wait()

    asyncio.run(run())


def request() -> Send:
    return typical_send("fcm", TOKEN, PROJECT, data={"k": "v"})


def credentials(projects_json: str) -> list[fcm.FcmCredentials]:
    projects = [FcmProject(**entry) for entry in json.loads(projects_json)]
    return [fcm.FcmCredentials.from_settings(p, i) for i, p in enumerate(projects)]


def send_many(
    port: int, projects_json: str, folder: str, args: argparse.Namespace, out: Any
) -> None:
    """One client process: ``args.sends`` sends, ``args.concurrency`` at a time."""

    async def run() -> None:
        projects = [
            fcm.FcmCredentials(c.project_id, c.account, args.rate)
            for c in credentials(projects_json)
        ]
        send = request()
        async with fcm.FcmClient(
            projects,
            endpoint=f"https://127.0.0.1:{port}",
            ca_file=Path(folder) / "ca.pem",
            max_connections=args.connections,
        ) as client:
            await client.send(send)  # connect and fetch the access token first
            timing = await time_sends(client, [send], args.sends, args.concurrency)
        out.put(timing)

    asyncio.run(run())


def h2load(port: int, projects_json: str, folder: str, args: argparse.Namespace) -> str:
    """Run h2load with the same request and a valid access token."""
    account = credentials(projects_json)[0].account

    async def access_token() -> str:
        context = ssl.create_default_context(cafile=str(Path(folder) / "ca.pem"))
        async with httpx.AsyncClient(verify=context) as http:
            token, _ = await GoogleTokenSource(account, http)()
        return token

    token = asyncio.run(access_token())
    send = request()
    return run_h2load(
        f"https://127.0.0.1:{port}/v1/projects/{PROJECT}/messages:send",
        send,
        f"Bearer {token}",
        args,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_client_options(parser)
    parser.add_argument("--rate", type=int, default=10**9, help="sends a minute")
    add_h2load_options(parser)
    args = parser.parse_args()
    with sandbox_process("fcm", serve) as (ctx, folder, (port, projects_json)):
        client_args = (port, projects_json, folder, args)
        timing = run_clients(ctx, send_many, client_args, args.clients)
        how = (
            f"{args.connections} connection(s), {args.concurrency} in flight each, "
            f"limit {args.rate:,} a minute"
        )
        print(describe("FcmClient", timing, args, how))
        print_h2load(args, lambda: h2load(port, projects_json, folder, args))


if __name__ == "__main__":
    main()
