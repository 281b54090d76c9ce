"""Run ``lorart serve`` as a child process: what the server's tests and its load
benchmark use to talk to a real server over real HTTP.

    with ServerProcess(["--adapter", "a=out/a"]) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        ...
    server.returncode   # 0 after the SIGTERM that closing sent

A process rather than uvicorn in a thread: SIGTERM handling and the exit status are
part of what is tested, and the server's step loop and the test's own model then do
not share one interpreter (GIL, global torch settings).

The server binds ``127.0.0.1`` port 0 (any free port, no race between picking a port
and binding it) and prints its URL, which is read back from its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

_URL_LINE = re.compile(r"lorart serve: (http://[^\s/]+)/v1")


class ServerProcess:
    """``python -m lorart serve --host 127.0.0.1 --port 0 *args`` with its log in a file."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None,
                 start_timeout: float = 300.0):
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.url: str | None = None
        self.returncode: int | None = None
        self._log = tempfile.NamedTemporaryFile("w+", prefix="lorart-serve-", suffix=".log",
                                                delete=False)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [sys.executable, "-m", "lorart", "serve", "--host", "127.0.0.1", "--port", "0",
               *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lorart serve exited with {self.proc.returncode} while "
                                   f"starting:\n{self.log()}")
            if self.url is None:
                match = _URL_LINE.search(self.log())
                self.url = match.group(1) if match else None
            if self.url is not None and self._healthy():
                return
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"lorart serve did not become healthy in {self.start_timeout} s:\n"
                           f"{self.log()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log(self) -> str:
        try:
            with open(self._log.name) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Send ``sig`` and wait; returns the exit status (killed after ``timeout``)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode
        if self.returncode == 0:  # keep the log of a server that failed, for the report
            with contextlib.suppress(OSError):
                os.unlink(self._log.name)
        return self.returncode
