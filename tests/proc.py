"""Drive a command-line program through pipes: send lines, wait for output lines, never sleep."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Mapping, Sequence
from typing import IO

from tests.conftest import ServerProcess, executable

TIMEOUT = 10.0


class Proc:
    """A subprocess in pipe mode whose stdout is read line by line by a background thread."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        self.args = list(args)
        self.popen = subprocess.Popen(
            self.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A program that hangs is aborted by `wait`: faulthandler then prints where each of its threads was.
            env={**(env if env is not None else os.environ), "PYTHONFAULTHANDLER": "1"},
        )
        self.output: list[str] = []
        self._stderr: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._ended = False
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.popen.stdout,), daemon=True),
            threading.Thread(target=self._drain, args=(self.popen.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        for thread in self._threads:
            thread.join()
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    @property
    def stderr(self) -> str:
        """Everything written to stderr so far (complete once `wait` has returned)."""
        return "".join(self._stderr)

    def send(self, line: str) -> None:
        """Write one line to the program's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def expect(self, substring: str, timeout: float = TIMEOUT) -> str:
        """Read stdout until a line contains `substring` and return it; fail with all output on timeout or exit."""
        while True:
            try:
                line = None if self._ended else self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(self._report(f"no line with {substring!r} within {timeout} s")) from None
            if line is None:
                self._ended = True
                raise AssertionError(self._report(f"stdout ended before a line with {substring!r}"))
            self.output.append(line)
            if substring in line:
                return line

    def close_stdin(self) -> None:
        """Signal end of input."""
        assert self.popen.stdin is not None
        self.popen.stdin.close()

    def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait for the program to exit, collect the rest of its stdout into `output`, return its status."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
            self._threads[1].join(timeout)
            raise AssertionError(self._report(f"still running after {timeout} s (aborted)")) from None
        for thread in self._threads:
            thread.join()
        while not self._ended:
            line = self._lines.get()
            if line is None:
                self._ended = True
            else:
                self.output.append(line)
        return status

    def finish(self, timeout: float = TIMEOUT) -> int:
        """Close stdin and wait for the exit, as a script's end of input would."""
        self.close_stdin()
        return self.wait(timeout)

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._stderr.append(line)

    def _report(self, problem: str) -> str:
        return f"{' '.join(self.args)}: {problem}\nstdout so far: {self.output!r}\nstderr so far: {self.stderr!r}"


def chat(server: ServerProcess) -> Proc:
    """A `chat` client of `server`, reading commands from a pipe."""
    return Proc([executable("chat"), "--host", server.host, "--port", str(server.port)], env=server.env)


def run_admin(
    server: ServerProcess, *args: str, env: Mapping[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """Run `chat-admin` once against `server`; by default it finds the token where the server wrote it."""
    command = [executable("chat-admin"), "--host", server.host, "--port", str(server.port), *args]
    return subprocess.run(
        command,
        env=dict(env if env is not None else server.env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def unused_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
