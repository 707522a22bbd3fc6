"""WNS sends per second and client CPU per send: WnsClient against the WNS sandbox.

The sandbox (:class:`~pushstream.sandbox.wns.WnsSandbox`) runs in its own
process over TLS and HTTP/1.1; the client process runs one
:class:`~pushstream.senders.wns.WnsClient`, configured from the sandbox's
settings as a worker is, which fetches its access token from the sandbox's
token endpoint. The sends go to ``--channels`` channels, ``--concurrency`` at
a time. Usage::

    python bench/wns_bench.py [--sends 5000] [--concurrency 200] [--channels 100]

Loopback, no network latency: the figure that matters is the client's CPU
per send (``time.process_time()`` of the client process), not what
Microsoft allows.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from client_send import run_clients, sandbox_process, time_sends, typical_send

from pushstream.config import load_settings
from pushstream.events import Send
from pushstream.sandbox.certs import ensure_certs
from pushstream.sandbox.wns import WnsSandbox
from pushstream.senders import wns

APP = "Contoso.Sandbox"


def serve(folder: str, queue: Any) -> None:
    """The sandbox process: serve WNS, hand its settings back."""

    async def run() -> None:
        certs = ensure_certs(folder)
        sandbox = WnsSandbox()
        server = sandbox.server(certs)
        await server.start()
        sandbox.base_url = f"https://127.0.0.1:{server.port}"
        env = sandbox.make_credentials(Path(folder) / "creds")
        env["PUSHSTREAM_ENDPOINTS__CA_FILE"] = str(certs.ca_cert)
        queue.put((sandbox.base_url, env))
        while True:
            await asyncio.sleep(1)
            sandbox.accepted.clear()  # the records are not what is measured

    asyncio.run(run())


def request(channel: str) -> Send:
    return typical_send("wns", channel, APP, data={"k": "v"})


def send_many(
    base_url: str, env: dict[str, str], args: argparse.Namespace, out: Any
) -> None:
    """The client process: ``args.sends`` sends, ``args.concurrency`` at a time."""
    os.environ.update(env)
    sandbox = WnsSandbox(base_url)
    sends = [request(sandbox.channel_uri(APP)) for _ in range(args.channels)]

    async def run() -> None:
        async with wns.WnsClient.from_settings(load_settings()) as client:
            await client.send(sends[0])  # connect and fetch the access token first
            timing = await time_sends(client, sends, args.sends, args.concurrency)
        out.put(timing)

    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sends", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--channels", type=int, default=100)
    args = parser.parse_args()
    with sandbox_process("wns", serve) as (ctx, _, (base_url, env)):
        elapsed, cpu, outcomes = run_clients(ctx, send_many, (base_url, env, args), 1)
        print(
            f"WnsClient: {outcomes.get('delivered', 0) / elapsed:,.0f} sends/s "
            f"({args.sends} sends to {args.channels} channels, outcomes {outcomes}; "
            f"{args.concurrency} in flight); client CPU "
            f"{cpu / args.sends * 1e6:,.0f} us per send"
        )


if __name__ == "__main__":
    main()
