"""A program on a pseudo-terminal: type keys, wait for text to be drawn."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time

# Colour, cursor-movement and charset escapes, and carriage returns, so that tests match the text a person sees.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class Terminal:
    """A program on a pseudo-terminal, so that it runs its interactive front end."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        # A bare pty never answers prompt_toolkit's cursor-position query, which would cost 2 s a prompt.
        env = {"TERM": "xterm", **env, "PROMPT_TOOLKIT_NO_CPR": "1"}
        self.fd, child_end = pty.openpty()
        self.popen = subprocess.Popen(args, stdin=child_end, stdout=child_end, stderr=child_end, env=env)
        os.close(child_end)
        self.screen = ""
        # Everything drawn so far, kept after `expect` has moved past it.
        self.seen = ""
        # The same with its escapes, for tests of colour.
        self.raw = ""

    def __enter__(self) -> Terminal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        os.close(self.fd)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def expect(self, text: str, timeout: float = 10.0) -> None:
        """Read the terminal until `text` has been drawn since the last match."""
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            if not self._read(deadline):
                raise AssertionError(f"{text!r} never appeared; the terminal shows {self.screen!r}")
        self.screen = self.screen[self.screen.index(text) + len(text) :]

    def wait(self, timeout: float = 10.0) -> int:
        """Read the terminal until the program exits and closes it; return the exit status."""
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        try:
            return self.popen.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s; the terminal shows {self.screen!r}") from None

    def _read(self, deadline: float) -> bool:
        """Append what the program drew; False on timeout or once the program has closed the terminal."""
        ready, _, _ = select.select([self.fd], [], [], max(deadline - time.monotonic(), 0))
        if not ready:
            return False
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:  # Linux reports a pseudo-terminal closed by its program as EIO
            return False
        self.raw += chunk.decode(errors="replace")
        text = _ANSI.sub("", chunk.decode(errors="replace"))
        self.screen += text
        self.seen += text
        return bool(chunk)
