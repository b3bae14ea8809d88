"""The server under test as subprocesses: `chat-server` on a free loopback port and, for the NATS store, a
nats-server of its own; start them, watch that they live, stop them."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

STOP_TIMEOUT = 20.0
# Generous: chat-server and JetStream come up in well under a second on a quiet machine, slower on a busy one.
START_TIMEOUT = 30.0
LISTENING = "chat server listening on "
MEMORY, NATS = "memory", "nats"
STORES = (MEMORY, NATS)
# Thousands of members from one address, joining in waves and saying lines as fast as they can: what the server's
# per-address and per-member rate limits exist to refuse, so the benchmark turns them off. Every stream is opened
# before the first wave joins, which takes longer than the default join timeout.
ARGS = ["--no-console", "--rooms-per-minute", "0", "--joins-per-second", "0", "--lines-per-second", "0"]
ARGS += ["--join-timeout", "3600"]


class ServerError(Exception):
    """The server failed to start, or died while it was being measured: a real failure of the run."""


def children(pid: int) -> list[int]:
    """The processes `pid` started (forked workers), from /proc/PID/task/*/children."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as listing:
            found += [int(child) for child in listing.read().split()]
    return sorted(found)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class _Process:
    """An executable installed beside this Python, its output in a temporary file (an unread pipe would block it)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        found = Path(sys.executable).with_name(name)
        executable = str(found) if found.exists() else shutil.which(name)
        if executable is None:
            raise ServerError(f"{name} is not installed; run 'make bench' so the venv is set up first")
        self.name = name
        self.output = tempfile.TemporaryFile("w+")  # noqa: SIM115 - open as long as the process; close() ends it
        self.popen = subprocess.Popen(
            [executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.terminated = False

    def lines(self) -> list[str]:
        self.output.seek(0)
        return [line.rstrip("\n") for line in self.output]

    def error(self, what: str) -> ServerError:
        """`what` went wrong, with the process's last lines of output (tracebacks, log lines) as an indented block."""
        tail = "".join(f"\n      | {line}" for line in self.lines()[-20:]) or "no output"
        return ServerError(f"{what}: {tail}")

    def check_alive(self) -> None:
        """Raise ServerError if the process has exited."""
        if (code := self.popen.poll()) is not None:
            raise self.error(f"{self.name} exited (code {code}) during the run")

    def await_ready(self, ready: Callable[[], object]) -> None:
        """Wait until `ready()`; on failure or after START_TIMEOUT, stop the process and raise ServerError."""
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while not ready():
                if (code := self.popen.poll()) is not None or time.monotonic() > deadline:
                    raise self.error(f"{self.name} did not start within {START_TIMEOUT:g} s (exit code {code})")
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    def terminate(self) -> None:
        """Start a graceful shutdown (SIGTERM), once: a second SIGTERM during shutdown would kill chat-server."""
        if not self.terminated and self.popen.poll() is None:
            self.terminated = True
            self.popen.terminate()

    def stop(self) -> int | None:
        """Shut down gracefully and wait; returns the exit code, or None if it had to be killed."""
        self.terminate()
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.close()
            return None

    def close(self) -> None:
        """Make sure the process is gone and its output file released; safe any time."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)
        self.output.close()


class NatsServer(_Process):
    """`nats-server --jetstream` on a free loopback port, its store in a temporary directory deleted by `close`."""

    def __init__(self) -> None:
        self.store_dir = tempfile.mkdtemp(prefix="bench-nats-")
        self.port, monitor = _free_port(), _free_port()
        args = ["--addr", "127.0.0.1", "--port", str(self.port), "--http_port", str(monitor)]
        try:
            super().__init__("nats-server", [*args, "--jetstream", "--store_dir", self.store_dir])
        except ServerError:
            shutil.rmtree(self.store_dir, ignore_errors=True)
            raise
        self.await_ready(lambda: _healthy(f"http://127.0.0.1:{monitor}/healthz"))

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.store_dir, ignore_errors=True)


def _healthy(url: str) -> bool:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
        return bool(answer.status == 200)
    return False


class ServerProcess(_Process):
    """`chat-server --port 0` in memory, or `--store nats://… --workers N` on a nats-server of its own; the PIDs of all
    its processes are its cost."""

    def __init__(self, max_queue: int | None = None, store: str = MEMORY, workers: int = 1) -> None:
        args = ["--host", "127.0.0.1", "--port", "0", *ARGS]
        args += ["--max-queue", str(max_queue)] if max_queue is not None else []
        self.nats = NatsServer() if store == NATS else None
        if self.nats is not None:
            args += ["--store", f"nats://127.0.0.1:{self.nats.port}", "--workers", str(workers)]
        # A token in the environment keeps the server from writing a token file into the user's state dir.
        env = {**os.environ, "CHAT_ADMIN_TOKEN": "bench-admin-token", "PYTHONUNBUFFERED": "1"}
        self.workers: list[int] = []
        try:
            super().__init__("chat-server", args, env)
        except BaseException:
            if self.nats is not None:
                self.nats.close()
            raise
        self.await_ready(self._address)
        # A supervisor adds "(N workers)" after the address, once every worker serves: they are all forked by then.
        self.address = self._address().partition(" ")[0]
        self.workers = children(self.popen.pid) if workers > 1 else []
        if workers > 1 and len(self.workers) != workers:
            error = self.error(f"chat-server started {len(self.workers)} workers, not {workers}")
            self.close()
            raise error
        # The chat server's processes (each with an event loop, the supervisor's idle) and the store's.
        self.chat_pids = [self.popen.pid, *self.workers]
        self.store_pids = [self.nats.popen.pid] if self.nats is not None else []
        self.pids = self.chat_pids + self.store_pids

    def _address(self) -> str:
        return next((line.removeprefix(LISTENING) for line in self.lines() if line.startswith(LISTENING)), "")

    def check_alive(self) -> None:
        """Raise ServerError if the server, one of its workers or its nats-server has exited."""
        super().check_alive()
        # The supervisor would start a dead worker again, with another PID, after its members lost their streams.
        if self.workers and children(self.popen.pid) != self.workers:
            raise self.error("a chat-server worker died during the run")
        if self.nats is not None:
            self.nats.check_alive()

    def close(self) -> None:
        """Make sure every process is gone and nats-server's store deleted; safe any time."""
        running = self.popen.poll() is None
        super().close()
        # Workers outlive a supervisor that was killed.
        for pid in self.workers if running else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.nats is not None:
            self.nats.close()
