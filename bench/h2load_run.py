"""h2load against a sandbox endpoint, with one request repeated: the raw limit
the provider benches put beside their client's figure."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from pushstream.events import Send


def run_h2load(
    url: str, send: Send, authorization: str, args: argparse.Namespace
) -> str:
    """Send ``send`` to ``url`` with h2load and describe the rate it reached.

    ``args`` carries the bench's options: sends, clients, h2load_clients and
    concurrency (streams per connection).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as body:
        body.write(send.body)
    command = [
        "h2load",
        f"-n{args.sends * args.clients}",
        f"-c{args.h2load_clients}",
        f"-m{args.concurrency}",
        f"-d{body.name}",
        "-H",
        f"authorization: {authorization}",
        *(arg for k, v in send.headers.items() for arg in ("-H", f"{k}: {v}")),
        url,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    finally:
        Path(body.name).unlink()
    rate = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", done.stdout)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx", done.stdout)
    if not rate or not codes:
        return f"h2load failed:\n{done.stdout}\n{done.stderr}"
    return (
        f"h2load: {float(rate.group(1)):,.0f} requests/s "
        f"({codes.group(1)} answered 2xx, {codes.group(3)} 4xx; "
        f"{args.h2load_clients} connection(s), {args.concurrency} streams each)"
    )


def add_h2load_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--h2load-clients`` (connections) and ``--no-h2load`` to a bench."""
    parser.add_argument("--h2load-clients", type=int, default=1)
    parser.add_argument("--no-h2load", action="store_true")


def print_h2load(args: argparse.Namespace, run: Callable[[], str]) -> None:
    """Print what ``run`` says, unless ``--no-h2load`` or h2load is not installed."""
    if args.no_h2load:
        return
    if shutil.which("h2load") is None:
        print("h2load: not installed (apt-get install nghttp2-client)")
    else:
        print(run())
