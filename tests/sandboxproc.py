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
- Its methods call the admin API: :meth:`stats`, :meth:`accepted` and
  :meth:`wns_channel` (from :class:`pushstream.localstack.SandboxAdmin`, as
  the demo and the benchmarks call them), :meth:`scenario`, :meth:`outage`
  and :meth:`reset`. A call the sandbox refuses raises ``StackError``.
- :meth:`stop` sends SIGTERM and returns the exit status. When the sandbox
  dies or does not get ready, the test fails with the tail of its log.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn

import pytest

from pushstream.localstack import SandboxAdmin, sandbox_argv, sandbox_listening
from pushstream.sandbox.main import PORTS_FILE

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_LINES = 60


class SandboxProcess(SandboxAdmin):
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
        (self.folder / PORTS_FILE).unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                sandbox_argv(self.folder),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.ready_timeout
        while (listening := sandbox_listening(self.folder)) is None:
            if self.process.poll() is not None:
                self._fail(f"the sandbox exited with status {self.process.returncode}")
            if time.monotonic() > deadline:
                self.kill()
                self._fail(f"the sandbox was not ready in {self.ready_timeout:.0f}s")
            time.sleep(0.1)
        self.ports, self.env = listening

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

    # --- the admin API (call, stats, accepted, wns_channel: SandboxAdmin) ------------

    def scenario(self, **change: Any) -> dict[str, Any]:
        """POST /scenario with these fields (see :mod:`pushstream.sandbox.main`)."""
        result: dict[str, Any] = self.call("POST", "/scenario", change)
        return result

    def outage(self, platform: str, *, on: bool, mode: str = "503") -> None:
        """Switch a platform's outage on or off (mode ``503`` or ``no-answer``)."""
        self.scenario(platform=platform, outage=on, mode=mode)

    def reset(self) -> None:
        """Forget accepted pushes and counts; end every outage."""
        self.call("POST", "/reset")

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
