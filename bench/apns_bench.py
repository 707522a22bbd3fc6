"""APNs sends per second: ApnsClient against the APNs sandbox, and h2load beside it.

The sandbox (:class:`~pushstream.sandbox.apns.ApnsSandbox`, every check on,
records off) runs in its own process; each client process runs one
:class:`~pushstream.senders.apns.ApnsClient` with its own event loop. Then
h2load (Debian's ``nghttp2-client``) sends the same request, with a valid
provider token, to the same endpoint, which shows how much of the figure is
the sandbox's own ceiling. Usage::

    python bench/apns_bench.py [--sends 5000] [--clients 1] [--concurrency 200]
        [--connections 1] [--h2load-clients 1] [--no-h2load]

Both figures count requests answered 200. Loopback, no network latency:
this measures the CPU cost per send, not what Apple allows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from client_send import (
    add_client_options,
    describe,
    run_clients,
    sandbox_process,
    time_sends,
    typical_send,
)
from h2load_run import add_h2load_options, print_h2load, run_h2load

from pushstream.config import ApnsApp, Endpoints
from pushstream.events import Send
from pushstream.sandbox.apns import ApnsSandbox
from pushstream.sandbox.certs import ensure_certs
from pushstream.senders import apns
from pushstream.senders.apns_auth import ProviderToken, load_signing_key

TOKEN = "ab" * 32


def serve(folder: str, queue: Any) -> None:
    """The sandbox process: serve APNs, hand the port and settings back."""

    async def run() -> None:
        certs = ensure_certs(folder)
        # Token rules stay on, but a run crossing a 25-minute token boundary
        # should not fail on TooManyProviderTokenUpdates.
        sandbox = ApnsSandbox(certs=certs, record=False, token_update_window_s=0)
        server = sandbox.server()
        await server.start()
        values = sandbox.make_credentials(Path(folder) / "creds")
        queue.put((server.port, values["PUSHSTREAM_APNS"]))
        await asyncio.Event().wait()

    asyncio.run(run())


def request(app: str) -> Send:
    return typical_send("apns", TOKEN, app)


def send_many(
    port: int, apps_json: str, folder: str, args: argparse.Namespace, out: Any
) -> None:
    """One client process: ``args.sends`` sends, ``args.concurrency`` at a time."""

    async def run() -> None:
        apps = [ApnsApp(**app) for app in json.loads(apps_json)]
        url = f"https://127.0.0.1:{port}"
        endpoints = Endpoints(
            apns_production=url,
            apns_development=url,
            ca_file=Path(folder) / "ca.pem",
        )
        send = request(apps[0].bundle_id)
        async with apns.ApnsClient(
            apps, endpoints, connections=args.connections
        ) as client:
            await client.send(send)  # connect and authenticate first
            timing = await time_sends(client, [send], args.sends, args.concurrency)
        out.put(timing)

    asyncio.run(run())


def h2load(port: int, apps_json: str, args: argparse.Namespace) -> str:
    """Run h2load with the same request and a valid provider token."""
    app = ApnsApp(**json.loads(apps_json)[0])
    key = load_signing_key(app, 0)
    assert app.team_id is not None
    assert app.key_id is not None
    jwt = ProviderToken(app.team_id, app.key_id, key).current()
    send = request(app.bundle_id)
    return run_h2load(
        f"https://127.0.0.1:{port}/3/device/{TOKEN}", send, f"bearer {jwt}", args
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_client_options(parser)
    add_h2load_options(parser)
    args = parser.parse_args()
    with sandbox_process("apns", serve) as (ctx, folder, (port, apps_json)):
        client_args = (port, apps_json, folder, args)
        timing = run_clients(ctx, send_many, client_args, args.clients)
        how = f"{args.connections} connection(s), {args.concurrency} in flight each"
        print(describe("ApnsClient", timing, args, how))
        print_h2load(args, lambda: h2load(port, apps_json, args))


if __name__ == "__main__":
    main()
