"""What the client benchmarks share: the sandbox process, and the send they repeat.

``apns_bench.py``, ``fcm_bench.py`` and ``wns_bench.py`` each time one
provider client making the same request again and again against a sandbox
stand-in running in its own process.
"""

from __future__ import annotations

import multiprocessing
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pushstream.events import Notification, Platform, Send
from pushstream.router import default_renderers
from pushstream.sandbox.certs import ensure_certs
from pushstream.senders.result import Target


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
