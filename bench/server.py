"""The `chat-server` under test as a subprocess: start it on a free port, read its CPU and memory, stop it."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import IO

from bench import procstat

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
LISTENING = "chat server listening on "
# Thousands of members from one address, joining in waves and saying lines as fast as they can: what the server's
# per-address and per-member rate limits exist to refuse, so the benchmark turns them off.
UNLIMITED = ["--rooms-per-minute", "0", "--joins-per-second", "0", "--lines-per-second", "0"]


class ServerError(Exception):
    """The server failed to start, or died while it was being measured: a real failure of the run."""


def executable() -> str:
    """The `chat-server` installed beside this interpreter (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / "chat-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("chat-server")
    if found is None:
        raise ServerError("chat-server is not installed; run 'make bench' so the venv is set up first")
    return found


class ServerProcess:
    """A running `chat-server --port 0`; its stdout is drained by a thread so it never blocks on a full pipe."""

    def __init__(self, max_queue: int | None = None) -> None:
        # Every stream is opened before the first wave joins, which takes longer than the default join timeout.
        args = [
            executable(),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-console",
            *UNLIMITED,
            "--join-timeout",
            "3600",
        ]
        if max_queue is not None:
            args += ["--max-queue", str(max_queue)]
        # A token in the environment keeps the server from writing a token file into the user's state dir.
        env = {**os.environ, "CHAT_ADMIN_TOKEN": "bench-admin-token", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.pid = self.process.pid
        self.tail: deque[str] = deque(maxlen=40)
        self.stderr: deque[str] = deque(maxlen=40)
        self._terminated = False
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.process.stdout is not None and self.process.stderr is not None
        self._drains = [
            threading.Thread(target=self._pump, args=(self.process.stdout,), daemon=True),
            threading.Thread(target=self._keep, args=(self.process.stderr,), daemon=True),
        ]
        for thread in self._drains:
            thread.start()
        self.address = self._wait_for_address()

    def _pump(self, stream: IO[str]) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            self.tail.append(line)
            if line.startswith(LISTENING):
                self._lines.put(line)
        self._lines.put(None)

    def _keep(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr.append(line.rstrip("\n"))

    def _wait_for_address(self) -> str:
        try:
            line = self._lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            self.kill()
            raise ServerError(f"chat-server printed no address within {START_TIMEOUT:.0f} s") from None
        if line is None:
            self.kill()
            raise ServerError(f"chat-server exited at start (code {self.process.returncode}): {self.errors()}")
        return line.removeprefix(LISTENING).strip()

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all its threads), in seconds."""
        return procstat.cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        """Resident set size (VmRSS) of the server process in KiB."""
        return procstat.rss_kib(self.pid)

    def sched(self) -> procstat.Sched:
        """Run and run-queue time of the server's main thread, which runs its event loop."""
        return procstat.sched(self.pid)

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

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Shut down gracefully and wait; returns the exit code, or None if it had to be killed."""
        self.terminate()
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """Make sure the process is gone; safe to call any time."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        for thread in self._drains:
            thread.join(timeout=2)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()

    def errors(self) -> str:
        """The last lines the server wrote to stderr (tracebacks), else the last log lines, as one indented block."""
        lines = list(self.stderr)[-20:] or [line for line in self.tail if "New room" not in line][-10:]
        return "".join(f"\n      | {line}" for line in lines) or "nothing on stderr"

    def close(self) -> None:
        """Kill if still running and release the pipes."""
        self.kill()
