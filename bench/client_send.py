"""The send the client benchmarks repeat: a typical notification, rendered.

``apns_bench.py``, ``fcm_bench.py`` and ``wns_bench.py`` each time one
provider client making the same request again and again; this builds that
request as the router would for one device.
"""

from __future__ import annotations

from pushstream.events import Notification, Platform, Send
from pushstream.router import default_renderers
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
