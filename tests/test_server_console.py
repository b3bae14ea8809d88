"""The server's own console, typed into on a real (pseudo-)terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import time
from pathlib import Path

import grpc

from chat_service._pb.chat.v1 import chat_pb2 as pb
from chat_service._pb.chat.v1 import chat_pb2_grpc
from tests.conftest import executable

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\r")


class Terminal:
    """A process on a pseudo-terminal: type lines, wait for text on the screen."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self._fd, child = pty.openpty()
        self.process = subprocess.Popen(args, stdin=child, stdout=child, stderr=child, env=env, close_fds=True)
        os.close(child)
        self.screen = b""

    def type(self, line: str) -> None:
        os.write(self._fd, line.encode() + b"\r")

    def expect(self, text: str, timeout: float = 10.0) -> None:
        """Read the terminal until `text` has appeared since the last expect."""
        deadline = time.monotonic() + timeout
        while text.encode() not in _ANSI.sub(b"", self.screen):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{text!r} never appeared; the screen shows {_ANSI.sub(b'', self.screen)!r}"
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if ready:
                try:
                    self.screen += os.read(self._fd, 65536)
                except OSError:
                    break
        clean = _ANSI.sub(b"", self.screen)
        assert text.encode() in clean, f"{text!r} never appeared; the screen shows {clean!r}"
        self.screen = clean[clean.index(text.encode()) + len(text) :]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        os.close(self._fd)


def test_console_lists_and_kills_rooms(tmp_path: Path) -> None:
    # A bare pty never answers prompt_toolkit's cursor-position query, which would cost 2 s a prompt.
    env = {
        **os.environ,
        "XDG_STATE_HOME": str(tmp_path),
        "TERM": "xterm",
        "CHAT_ADMIN_TOKEN": "t",
        "PROMPT_TOOLKIT_NO_CPR": "1",
    }
    term = Terminal([executable("chat-server"), "--port", "0"], env)
    try:
        term.expect("chat server listening on 127.0.0.1:")
        port = int(re.match(rb"\d+", term.screen.lstrip()).group())  # type: ignore[union-attr]
        term.expect("admin>")
        term.type("/ls")
        term.expect("no rooms")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            chat_pb2_grpc.ChatServiceStub(channel).CreateRoom(pb.CreateRoomRequest(room="lobby"))
        term.expect("New room lobby created")
        term.type("/ls")
        term.expect("lobby (0 members)")
        term.type("/kill nowhere")
        term.expect("error: room 'nowhere' does not exist")
        term.type("/kill lobby")
        term.expect("room lobby closed")
        term.type("/bogus")
        term.expect("unknown command")
        term.type("/quit")
        term.expect("server stopped")
        assert term.process.wait(timeout=10) == 0
    finally:
        term.close()
