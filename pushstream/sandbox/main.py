"""``pushstream sandbox``: the APNs, FCM and WNS stand-ins in one process.

It makes a throwaway CA and server certificate (:mod:`.certs`) and throwaway
credentials for each provider (their ``make_credentials``) in a folder
(default ``.cache/sandbox``), serves

- APNs over HTTP/2 (default port 8443), one host for both environments;
- FCM with its OAuth token endpoint (8444);
- WNS with its two token endpoints and the channels (8445);
- an admin API, plain HTTP on 127.0.0.1 only (8446),

and writes ``sandbox.env``: the ``PUSHSTREAM_*`` settings that point a worker
at all of it (endpoints, credentials, the CA to trust, the WNS host to allow).
``set -a; . .cache/sandbox/sandbox.env`` in a shell, or an ``env_file`` in
Compose, is enough. Port 0 picks a free port; once every listener is bound
the ports are in ``sandbox.json`` and one line on stdout says so.

Admin API (JSON):

- ``GET /stats``: per platform, push requests received (answered or not),
  token requests, answers by status, accepted pushes, the outage switch;
- ``GET /accepted?platform=apns``: the accepted pushes, oldest first;
- ``POST /scenario``: ``{"platform", "outage": bool, "mode": "503" |
  "no-answer"}`` switches an outage; ``"token"`` and ``"scenario"`` give one
  APNs token or WNS channel a scenario; ``"settings"`` sets the stand-in's
  knobs (:data:`KNOBS`, e.g. FCM's ``quota_failures``);
- ``GET /wns-channel?package=...&scenario=ok``: a new channel URI;
- ``POST /reset``: forget accepted pushes and counts, end outages.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import shlex
import signal
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click
from aiohttp import web

from pushstream.events import PLATFORMS
from pushstream.sandbox.apns import ApnsSandbox
from pushstream.sandbox.certs import SandboxCerts, ensure_certs
from pushstream.sandbox.fcm import FcmSandbox
from pushstream.sandbox.server import Handler, Request, Response, SandboxServer
from pushstream.sandbox.wns import WnsSandbox

log = logging.getLogger(__name__)

DEFAULT_FOLDER = Path(".cache/sandbox")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORTS = {"apns": 8443, "fcm": 8444, "wns": 8445}
DEFAULT_ADMIN_PORT = 8446
ADMIN_HOST = "127.0.0.1"
ENV_FILE = "sandbox.env"
PORTS_FILE = "sandbox.json"

# Outage modes as the admin API names them, and as the stand-ins do.
OUTAGE_MODES = {"503": "503", "no-answer": "hang", "hang": "hang"}

# Stand-in attributes the admin API may set (when the stand-in has them).
KNOBS = ("quota_failures", "retry_after_s", "slow_s", "hang_s", "goaway_next")

# Paths of the token endpoints: requests to them are not pushes.
_TOKEN_PATHS = ("/token", "/accesstoken.srf", "/oauth2/v2.0/token")


class StandIn(Protocol):
    """What every provider stand-in has."""

    accepted: list[dict[str, Any]]
    stats: Counter[str]
    outage: bool
    outage_mode: Any

    async def handle(self, req: Request) -> Response: ...

    def make_credentials(self, folder: Path) -> dict[str, str]: ...


@dataclass(frozen=True, slots=True)
class SandboxOptions:
    """Where the sandbox listens and keeps its files.

    ``advertise`` is the host name put in URLs and the certificate (default:
    ``host``, or 127.0.0.1 when ``host`` is a wildcard address).
    """

    host: str = DEFAULT_HOST
    apns_port: int = DEFAULT_PORTS["apns"]
    fcm_port: int = DEFAULT_PORTS["fcm"]
    wns_port: int = DEFAULT_PORTS["wns"]
    admin_port: int = DEFAULT_ADMIN_PORT
    folder: Path = DEFAULT_FOLDER
    advertise: str | None = None

    @property
    def public_host(self) -> str:
        """The host clients use to reach the sandbox."""
        if self.advertise:
            return self.advertise
        return DEFAULT_HOST if self.host in ("0.0.0.0", "::", "") else self.host


@dataclass
class Counts:
    """Requests one stand-in received, by kind (push/token), and its answers."""

    received: Counter[str] = field(default_factory=Counter)
    answered: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.received["push"],
            "token_requests": self.received["token"],
            "statuses": {
                key.removeprefix("push "): n
                for key, n in sorted(self.answered.items())
                if key.startswith("push ")
            },
        }


def counted(handler: Handler, counts: Counts) -> Handler:
    """Wrap a handler to count requests as they arrive and answers as they go."""

    async def handle(req: Request) -> Response:
        path = req.path.partition("?")[0]
        kind = "token" if path.endswith(_TOKEN_PATHS) else "push"
        counts.received[kind] += 1
        response = await handler(req)
        counts.answered[f"{kind} {response.status}"] += 1
        return response

    return handle


def format_env(values: Mapping[str, str]) -> str:
    """``KEY='value'`` lines a POSIX shell can source and Compose can read."""
    return "".join(f"{key}={shlex.quote(values[key])}\n" for key in sorted(values))


def parse_env(text: str) -> dict[str, str]:
    """Read what :func:`format_env` wrote."""
    values = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, quoted = line.partition("=")
        words = shlex.split(quoted)
        values[key.strip()] = words[0] if words else ""
    return values


class Sandbox:
    """The three stand-ins, their servers and the admin API, in one event loop."""

    def __init__(self, options: SandboxOptions) -> None:
        self.options = options
        self.folder = options.folder.resolve()
        self.certs: SandboxCerts | None = None
        self.stand_ins: dict[str, StandIn] = {}
        self.counts: dict[str, Counts] = {p: Counts() for p in PLATFORMS}
        self.ports: dict[str, int] = {}
        self.env: dict[str, str] = {}
        self._servers: list[SandboxServer] = []
        self._admin: web.AppRunner | None = None

    @property
    def env_file(self) -> Path:
        return self.folder / ENV_FILE

    @property
    def ports_file(self) -> Path:
        return self.folder / PORTS_FILE

    async def start(self) -> None:
        """Bind every listener, write credentials and the env file, then serve."""
        options = self.options
        host = options.public_host
        self.folder.mkdir(parents=True, exist_ok=True)
        self.certs = await asyncio.to_thread(self._ensure_certs, host)
        certs = self.certs

        apns = ApnsSandbox(environment="production", certs=certs)
        fcm = FcmSandbox()
        wns = WnsSandbox()
        self.stand_ins = {"apns": apns, "fcm": fcm, "wns": wns}
        servers = {
            "apns": apns.server(options.host, options.apns_port),
            "fcm": fcm.server(certs, options.host, options.fcm_port),
            "wns": wns.server(certs, options.host, options.wns_port),
        }
        try:
            for platform, server in servers.items():
                server.handler = counted(server.handler, self.counts[platform])
                await server.start()
                self._servers.append(server)
                self.ports[platform] = server.port
            await self._start_admin()
        except BaseException:
            await self.aclose()
            raise

        urls = {
            p: f"https://{_host_port(host, port)}" for p, port in self.ports.items()
        }
        apns.base_url, fcm.base_url, wns.base_url = (
            urls["apns"],
            urls["fcm"],
            urls["wns"],
        )
        self.env = await asyncio.to_thread(self._credentials)
        await asyncio.to_thread(self._write_files)

    def _ensure_certs(self, host: str) -> SandboxCerts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return ensure_certs(self.folder / "certs", dns_names=[host])
        return ensure_certs(self.folder / "certs", ip_addresses=[host])

    def _credentials(self) -> dict[str, str]:
        """Make throwaway credentials; the settings pointing a worker at them."""
        folder = self.folder / "credentials"
        env: dict[str, str] = {}
        for stand_in in self.stand_ins.values():
            env |= stand_in.make_credentials(folder)
        apns_url = self.env_url("apns")
        env["PUSHSTREAM_ENDPOINTS__APNS_PRODUCTION"] = apns_url
        env["PUSHSTREAM_ENDPOINTS__APNS_DEVELOPMENT"] = apns_url
        env["PUSHSTREAM_ENDPOINTS__FCM"] = self.env_url("fcm")
        if self.certs is not None:
            env["PUSHSTREAM_ENDPOINTS__CA_FILE"] = str(self.certs.ca_cert)
        return env

    def env_url(self, platform: str) -> str:
        """The base URL of one stand-in."""
        host = self.options.public_host
        return f"https://{_host_port(host, self.ports[platform])}"

    def _write_files(self) -> None:
        self.env_file.write_text(format_env(self.env), encoding="utf-8")
        self.env_file.chmod(0o600)
        ports = {**self.ports, "admin": self.admin_port, "env_file": str(self.env_file)}
        self.ports_file.write_text(json.dumps(ports, indent=2) + "\n", encoding="utf-8")

    @property
    def admin_port(self) -> int:
        """The admin API's port (after :meth:`start`)."""
        if self._admin is None:
            raise RuntimeError("the sandbox is not started")
        address = self._admin.addresses[0]
        port: int = address[1]
        return port

    async def aclose(self) -> None:
        """Stop every listener; safe to call twice."""
        servers, self._servers = self._servers, []
        for server in servers:
            await server.aclose()
        admin, self._admin = self._admin, None
        if admin is not None:
            await admin.cleanup()

    async def __aenter__(self) -> Sandbox:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- what the admin API shows and changes ----------------------------------

    def stats(self) -> dict[str, Any]:
        """Requests, answers and accepted pushes per platform."""
        stats = {}
        for platform, stand_in in self.stand_ins.items():
            stats[platform] = {
                **self.counts[platform].as_dict(),
                "accepted": len(stand_in.accepted),
                "outage": stand_in.outage,
                "outage_mode": stand_in.outage_mode,
            }
        return stats

    def accepted(self, platform: str) -> list[dict[str, Any]]:
        """The pushes a stand-in accepted, oldest first."""
        return list(self._stand_in(platform).accepted)

    def scenario(self, change: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a ``POST /scenario`` body; ValueError says what is wrong."""
        platform = str(change.get("platform", ""))
        stand_in = self._stand_in(platform)
        if "mode" in change:
            mode = OUTAGE_MODES.get(str(change["mode"]))
            if mode is None:
                raise ValueError(f"mode is one of {', '.join(OUTAGE_MODES)}")
            stand_in.outage_mode = mode
        if "outage" in change:
            stand_in.outage = bool(change["outage"])
            log.info(
                "%s outage %s (%s)",
                platform,
                "on" if stand_in.outage else "off",
                stand_in.outage_mode,
            )
        if "token" in change or "scenario" in change:
            setter = getattr(stand_in, "set_scenario", None)
            if setter is None:
                raise ValueError(f"{platform} scenarios are chosen by token prefix")
            setter(str(change.get("token", "")), str(change.get("scenario", "")))
        for knob, value in dict(change.get("settings") or {}).items():
            if knob not in KNOBS or not hasattr(stand_in, knob):
                raise ValueError(f"{platform} has no setting {knob!r}")
            setattr(stand_in, knob, value)
        return self.stats()[platform]  # type: ignore[no-any-return]

    def reset(self) -> None:
        """Forget accepted pushes and counts; end every outage."""
        for platform, stand_in in self.stand_ins.items():
            stand_in.accepted.clear()
            stand_in.stats.clear()
            stand_in.outage = False
            stand_in.outage_mode = "503"
            self.counts[platform].received.clear()
            self.counts[platform].answered.clear()

    def wns_channel(self, package: str, scenario: str) -> str:
        """A new WNS channel URI for ``package`` answering as ``scenario``."""
        wns = self.stand_ins["wns"]
        if not isinstance(wns, WnsSandbox):
            raise RuntimeError("the sandbox is not started")
        return wns.channel_uri(package, scenario)

    def _stand_in(self, platform: str) -> StandIn:
        stand_in = self.stand_ins.get(platform)
        if stand_in is None:
            raise ValueError(f"platform is one of {', '.join(self.stand_ins)}")
        return stand_in

    # --- the admin API ---------------------------------------------------------------

    async def _start_admin(self) -> None:
        app = web.Application()
        app.router.add_get("/stats", self._get_stats)
        app.router.add_get("/accepted", self._get_accepted)
        app.router.add_post("/scenario", self._post_scenario)
        app.router.add_post("/reset", self._post_reset)
        app.router.add_get("/wns-channel", self._get_wns_channel)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        self._admin = runner
        await web.TCPSite(runner, ADMIN_HOST, self.options.admin_port).start()

    async def _get_stats(self, request: web.Request) -> web.Response:
        return _json(self.stats())

    async def _get_accepted(self, request: web.Request) -> web.Response:
        return await _answer(lambda: self.accepted(request.query.get("platform", "")))

    async def _post_scenario(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _json({"error": "the body is a JSON object"}, status=400)
        if not isinstance(body, dict):
            return _json({"error": "the body is a JSON object"}, status=400)
        return await _answer(lambda: self.scenario(body))

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return _json(self.stats())

    async def _get_wns_channel(self, request: web.Request) -> web.Response:
        package = request.query.get("package", "")
        scenario = request.query.get("scenario", "ok")
        return await _answer(lambda: {"uri": self.wns_channel(package, scenario)})


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


async def _answer(make: Callable[[], Any]) -> web.Response:
    try:
        return _json(make())
    except ValueError as exc:
        return _json({"error": str(exc)}, status=400)


async def serve(options: SandboxOptions, *, ready: Callable[[Sandbox], None]) -> None:
    """Run the sandbox until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with Sandbox(options) as sandbox:
        ready(sandbox)
        await stop.wait()
        log.info("sandbox stopping")


def _print_ready(sandbox: Sandbox) -> None:
    ports = " ".join(f"{name}={port}" for name, port in sandbox.ports.items())
    click.echo(
        f"sandbox ready: {ports} admin={sandbox.admin_port} env={sandbox.env_file}"
    )
    sys.stdout.flush()


def _port_option(name: str, default: int, what: str) -> Callable[[Any], Any]:
    return click.option(
        f"--{name}-port",
        type=click.IntRange(0, 65535),
        default=default,
        show_default=True,
        envvar=f"PUSHSTREAM_SANDBOX_{name.upper()}_PORT",
        help=f"Port of {what} (0: any free port).",
    )


@click.command("sandbox")
@click.option(
    "--host",
    default=DEFAULT_HOST,
    show_default=True,
    envvar="PUSHSTREAM_SANDBOX_HOST",
    help="Address the stand-ins listen on.",
)
@click.option(
    "--advertise",
    default=None,
    envvar="PUSHSTREAM_SANDBOX_ADVERTISE",
    help="Host name for URLs and the certificate [default: the host].",
)
@_port_option("apns", DEFAULT_PORTS["apns"], "APNs")
@_port_option("fcm", DEFAULT_PORTS["fcm"], "FCM and its token endpoint")
@_port_option("wns", DEFAULT_PORTS["wns"], "WNS and its token endpoints")
@_port_option("admin", DEFAULT_ADMIN_PORT, "the admin API (on 127.0.0.1)")
@click.option(
    "--folder",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_FOLDER,
    show_default=True,
    envvar="PUSHSTREAM_SANDBOX_FOLDER",
    help="Where certificates, credentials and sandbox.env go.",
)
def command(
    host: str,
    advertise: str | None,
    apns_port: int,
    fcm_port: int,
    wns_port: int,
    admin_port: int,
    folder: Path,
) -> None:
    """Run local stand-ins for APNs, FCM and WNS (never for production)."""
    options = SandboxOptions(
        host=host,
        apns_port=apns_port,
        fcm_port=fcm_port,
        wns_port=wns_port,
        admin_port=admin_port,
        folder=folder,
        advertise=advertise,
    )
    try:
        asyncio.run(serve(options, ready=_print_ready))
    except OSError as exc:
        raise click.ClickException(f"the sandbox cannot listen: {exc}") from None
