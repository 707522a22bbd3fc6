"""A real ``pushstream sandbox`` subprocess for integration tests.

Usage, together with ``workerproc``::

    from sandboxproc import SandboxProcess
    from workerproc import WorkerProcess

    def test_something(tmp_path, worker_env):
        with SandboxProcess(tmp_path / "sandbox") as sandbox:
            with WorkerProcess(worker_env() | sandbox.env) as worker:
                ...
                assert sandbox.stats()["apns"]["requests"] == 1
                sandbox.outage("fcm", on=True, mode="no-answer")

- :class:`SandboxProcess` starts ``python -m pushstream sandbox`` on free
  ports (port 0) with its own folder, waits until every listener is bound,
  and reads the env file that points a worker at it (:attr:`env`).
- Its methods call the admin API: :meth:`stats`, :meth:`accepted`,
  :meth:`scenario`, :meth:`outage`, :meth:`reset`, :meth:`wns_channel`.
- :meth:`stop` sends SIGTERM and returns the exit status. When the sandbox
  dies or does not get ready, the test fails with the tail of its log.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import pytest

from pushstream.sandbox.main import ENV_FILE, PORTS_FILE, parse_env

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 60


class SandboxProcess:
    """One ``pushstream sandbox`` subprocess; a context manager that stops it."""

    def __init__(
        self,
        folder: Path,
        *,
        start: bool = True,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self.folder = Path(folder)
        self.log_path = self.folder / "sandbox.log"
        self.ready_timeout = ready_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.env: dict[str, str] = {}
        if start:
            self.start()

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Start the sandbox on free ports and wait until it listens."""
        assert self.process is None or self.process.poll() is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        ports_file = self.folder / PORTS_FILE
        ports_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pushstream",
                    "sandbox",
                    *("--apns-port", "0", "--fcm-port", "0", "--wns-port", "0"),
                    *("--admin-port", "0", "--folder", str(self.folder)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.ready_timeout
        while not ports_file.exists():
            if self.process.poll() is not None:
                self._fail(f"the sandbox exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                self._fail(f"the sandbox was not ready in {self.ready_timeout:.0f}s")
            time.sleep(0.1)
        self.ports = {
            name: port
            for name, port in json.loads(ports_file.read_text()).items()
            if isinstance(port, int)
        }
        self.env = parse_env((self.folder / ENV_FILE).read_text())

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, return the exit status (SIGKILL and fail if it hangs)."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                self._fail(f"the sandbox did not stop within {timeout:.0f}s")
        return process.returncode

    def kill(self) -> None:
        """SIGKILL the sandbox, if it runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            print(self.log_tail())
        if self.process is not None and self.process.poll() is None:
            self.stop()

    # --- the admin API ---------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Per platform: requests, token_requests, statuses, accepted, outage."""
        result: dict[str, Any] = self._call("GET", "/stats")
        return result

    def accepted(self, platform: str) -> list[dict[str, Any]]:
        """The pushes one stand-in accepted, oldest first."""
        query = urllib.parse.urlencode({"platform": platform})
        result: list[dict[str, Any]] = self._call("GET", f"/accepted?{query}")
        return result

    def scenario(self, **change: Any) -> dict[str, Any]:
        """POST /scenario with these fields (see :mod:`pushstream.sandbox.main`)."""
        result: dict[str, Any] = self._call("POST", "/scenario", change)
        return result

    def outage(self, platform: str, *, on: bool, mode: str = "503") -> None:
        """Switch a platform's outage on or off (mode ``503`` or ``no-answer``)."""
        self.scenario(platform=platform, outage=on, mode=mode)

    def reset(self) -> None:
        """Forget accepted pushes and counts; end every outage."""
        self._call("POST", "/reset")

    def wns_channel(
        self, package: str = "Contoso.Sandbox", scenario: str = "ok"
    ) -> str:
        """A new channel URI of a WNS app the sandbox made."""
        query = urllib.parse.urlencode({"package": package, "scenario": scenario})
        uri: str = self._call("GET", f"/wns-channel?{query}")["uri"]
        return uri

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        url = f"http://127.0.0.1:{self.ports['admin']}{path}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise AssertionError(
                f"sandbox {method} {path}: {exc.code} {detail}"
            ) from None

    # --- failing with the log ---------------------------------------------------------

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines the sandbox printed."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no sandbox log)"
        return "\n".join(text.splitlines()[-lines:])

    def _fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\n--- sandbox log ---\n{self.log_tail()}", pytrace=False)
