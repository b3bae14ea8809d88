"""The `chat-server` under test as a subprocess: start it on a free port, watch that it lives, stop it."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
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


def executable() -> str:
    """The `chat-server` installed beside this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "chat-server"
    found = str(beside) if beside.exists() else shutil.which("chat-server")
    if found is None:
        raise ServerError("chat-server is not installed; run 'make bench' so the venv is set up first")
    return found


class ServerProcess:
    """A running `chat-server --port 0`; its output is drained by a thread so it never blocks on a full pipe."""

    def __init__(self, max_queue: int | None = None) -> None:
        args = [executable(), "--host", "127.0.0.1", "--port", "0", *ARGS]
        if max_queue is not None:
            args += ["--max-queue", str(max_queue)]
        # A token in the environment keeps the server from writing a token file into the user's state dir.
        env = {**os.environ, "CHAT_ADMIN_TOKEN": "bench-admin-token", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        # The server's processes, whose CPU is the server's cost.
        self.pids = [self.process.pid]
        self.tail: deque[str] = deque(maxlen=20)
        self._terminated = False
        addresses: queue.Queue[str | None] = queue.Queue()
        self._drain = threading.Thread(target=self._pump, args=(addresses,), daemon=True)
        self._drain.start()
        try:
            address = addresses.get(timeout=START_TIMEOUT)
        except queue.Empty:
            address = None
        if address is None:
            self.close()
            raise ServerError(f"chat-server did not start (exit code {self.process.returncode}): {self.errors()}")
        self.address = address

    def _pump(self, addresses: queue.Queue[str | None]) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.rstrip("\n")
            if line.startswith(LISTENING):
                addresses.put(line.removeprefix(LISTENING).strip())
            elif "New room" not in line:
                self.tail.append(line)
        addresses.put(None)

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
        """Make sure the process is gone and its pipe released; safe to call any time."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self._drain.join(timeout=2)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def errors(self) -> str:
        """The server's last lines of output (tracebacks, log lines), as one indented block."""
        return "".join(f"\n      | {line}" for line in self.tail) or "no output"
