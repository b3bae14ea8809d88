"""`chat-server --workers N`: N server processes on one port, forked before gRPC starts, and their supervisor.

The kernel spreads new connections over the workers' listening sockets (SO_REUSEPORT); a shared store gives them
one set of rooms. The supervisor holds the port, the admin token file and the listening line, and restarts a
worker that dies once the set has started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from chat_service import admin_token
from chat_service.server import Config, choose_token, host_port

log = logging.getLogger(__name__)

# How long a worker may take to start serving; a store that does not answer fails its start well before this.
START_TIMEOUT_SECONDS = 60.0
# A worker that dies is started again after this pause, so that one failing at once cannot spin the machine.
RESTART_PAUSE_SECONDS = 1.0

Serve = Callable[[Config, str, Callable[[int], None]], int]
"""Runs one worker until SIGTERM: its config, the admin token, and a callback taking its metrics port once it
serves; returns the process's exit status."""


class WorkerStartError(Exception):
    """A worker could not start; the text says which and why it ended."""


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) the port the workers will share, resolving port 0 once for all of them."""
    bare = host.removeprefix("[").removesuffix("]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((bare, port))
    except OSError:
        sock.close()
        raise
    return sock


class Supervisor:
    """Forks the workers, reports them ready, forwards SIGINT and SIGTERM, and restarts a worker that dies."""

    def __init__(self, config: Config, count: int, serve: Serve) -> None:
        self._config = config
        self._count = count
        self._serve = serve
        self._children: dict[int, int] = {}
        self._stopping = False

    def run(self) -> int:
        """Serve until SIGINT or SIGTERM; the exit status."""
        reserved = reserve_port(self._config.host, self._config.port)
        port = reserved.getsockname()[1]
        token = choose_token(self._config, None)
        config = dataclasses.replace(self._config, port=port, reuse_port=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._stop)
        try:
            metrics = [self._start(config, token.value, index) for index in range(self._count)]
            ready = self._await_ready(metrics)
            if token.generated:
                token.path = admin_token.default_token_path(port)
                admin_token.write_token(token.path, token.value)
            self._announce(config, port, ready, token.path)
            return self._supervise(config, token.value)
        finally:
            self._stop_all()
            reserved.close()
            if token.generated and token.path is not None:
                token.path.unlink(missing_ok=True)

    def _start(self, config: Config, token: str, index: int) -> int:
        """Fork worker `index`; the read end of the pipe it reports its metrics port on."""
        if config.metrics_port:
            config = dataclasses.replace(config, metrics_port=config.metrics_port + index)
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, signal.SIG_DFL)

            def ready(metrics_port: int) -> None:
                # A restarted worker's supervisor no longer listens; its pipe is closed.
                with contextlib.suppress(OSError):
                    os.write(write, f"{metrics_port}\n".encode())
                os.close(write)

            status = 1
            try:
                status = self._serve(config, token, ready)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(status)
        os.close(write)
        self._children[pid] = index
        return read

    def _await_ready(self, pipes: list[int]) -> list[int]:
        """Each worker's metrics port, once every worker serves; raises WorkerStartError if one ends first."""
        ports: dict[int, int] = {}
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        try:
            while len(ports) < len(pipes) and not self._stopping:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerStartError(f"the workers did not start within {START_TIMEOUT_SECONDS:g} s")
                readable, _, _ = select.select([fd for fd in pipes if fd not in ports], [], [], left)
                for fd in readable:
                    line = os.read(fd, 64).decode().strip()
                    if not line:
                        raise WorkerStartError(f"worker {pipes.index(fd) + 1} stopped while starting")
                    ports[fd] = int(line)
        finally:
            for fd in pipes:
                os.close(fd)
        return [ports.get(fd, 0) for fd in pipes]

    def _announce(self, config: Config, port: int, metrics: list[int], token_path: Path | None) -> None:
        print(f"chat server listening on {host_port(config.host, port)} ({self._count} workers)", flush=True)
        if config.metrics_port is not None:
            for index, metrics_port in enumerate(metrics, 1):
                print(f"metrics: worker {index}: http://{host_port(config.metrics_host, metrics_port)}/metrics")
        if config.tls is not None:
            print(f"TLS: on{', client certificates required' if config.tls.client_ca is not None else ''}")
        print(f"admin token: {token_path}" if token_path else f"admin token: from ${admin_token.ENV_VAR}", flush=True)

    def _supervise(self, config: Config, token: str) -> int:
        status = 0
        while self._children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            index = self._children.pop(pid, None)
            if index is None or self._stopping:
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            log.warning("Worker %d (pid %d) ended with status %d; starting it again", index + 1, pid, code)
            status = 1
            time.sleep(RESTART_PAUSE_SECONDS)
            if not self._stopping:
                os.close(self._start(config, token, index))
        return 0 if self._stopping else status

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True
        for pid in self._children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _stop_all(self) -> None:
        """Stop every worker still running and wait for it."""
        self._stop(signal.SIGTERM, None)
        for pid in list(self._children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self._children.clear()
