"""The `chat-server` under test as a subprocess: start it on a free port, watch that it lives, stop it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LISTENING = "chat server listening on "
# Thousands of members from one address, joining in waves and saying lines as fast as they can: what the server's
# per-address and per-member rate limits exist to refuse, so the benchmark turns them off. Every stream is opened
# before the first wave joins, which takes longer than the default join timeout.
ARGS = ["--no-console", "--rooms-per-minute", "0", "--joins-per-second", "0", "--lines-per-second", "0"]
ARGS += ["--join-timeout", "3600"]


class ServerError(Exception):
    """The server failed to start, or died while it was being measured: a real failure of the run."""


class ServerProcess:
    """A running `chat-server --port 0`, its output in a temporary file (a pipe left unread would block it)."""

    def __init__(self, max_queue: int | None = None) -> None:
        found = Path(sys.executable).with_name("chat-server")
        executable = str(found) if found.exists() else shutil.which("chat-server")
        if executable is None:
            raise ServerError("chat-server is not installed; run 'make bench' so the venv is set up first")
        args = [executable, "--host", "127.0.0.1", "--port", "0", *ARGS]
        args += ["--max-queue", str(max_queue)] if max_queue is not None else []
        # A token in the environment keeps the server from writing a token file into the user's state dir.
        env = {**os.environ, "CHAT_ADMIN_TOKEN": "bench-admin-token", "PYTHONUNBUFFERED": "1"}
        self.output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - open as long as the server; close() ends both
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT, text=True, env=env
        )
        # The server's processes, whose CPU is the server's cost.
        self.pids = [self.process.pid]
        self._terminated = False
        deadline = time.monotonic() + START_TIMEOUT
        while not (address := self._address()) and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not address:
            error = ServerError(f"chat-server did not start (exit code {self.process.poll()}): {self.errors()}")
            self.close()
            raise error
        self.address = address

    def _address(self) -> str:
        self.output.seek(0)
        lines = (line for line in self.output if line.startswith(LISTENING))
        return next(lines, "").removeprefix(LISTENING).strip()

    def check_alive(self) -> None:
        """Raise ServerError if the server has exited."""
        code = self.process.poll()
        if code is not None:
            raise ServerError(f"chat-server died (exit code {code}) during the run: {self.errors()}")

    def terminate(self) -> None:
        """Start a graceful shutdown (SIGTERM), once: a second SIGTERM during shutdown would kill the server."""
        if not self._terminated and self.process.poll() is None:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        """Shut down gracefully and wait; returns the exit code, or None if it had to be killed."""
        self.terminate()
        try:
            return self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.close()
            return None

    def close(self) -> None:
        """Make sure the process is gone and its output file released; safe to call any time."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.output.close()

    def errors(self) -> str:
        """The server's last lines of output (tracebacks, log lines), as one indented block."""
        self.output.seek(0)
        lines = [line.rstrip("\n") for line in self.output][-20:]
        return "".join(f"\n      | {line}" for line in lines) or "no output"
