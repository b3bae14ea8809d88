"""A recorder of what a client Session delivers, for tests to wait on and inspect."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from chat.v1 import chat_pb2 as pb
from chat_cli.protocol import ConnectionLost, HistoryMessage, Incoming, Reconnecting

TIMEOUT = 10.0


class Recorder:
    """Collects what a Session delivers: each event's kind with the member name it came with, and the details."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.lost: list[str] = []
        self.messages: list[pb.Message] = []
        self.history: list[pb.Message] = []
        self.whispers: list[pb.Whisper] = []
        self.joined: list[pb.Joined] = []
        self.attempts: list[Reconnecting] = []
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._changed = asyncio.Event()

    def __call__(self, incoming: Incoming, me: str) -> None:
        if isinstance(incoming, ConnectionLost):
            kind = "lost"
            self.lost.append(incoming.message)
        elif isinstance(incoming, Reconnecting):
            kind = "reconnecting"
            self.attempts.append(incoming)
        elif isinstance(incoming, HistoryMessage):
            kind = "history"
            self.history.append(incoming.message)
        else:
            kind = str(incoming.WhichOneof("kind"))
            if kind == "message":
                self.messages.append(incoming.message)
            elif kind == "whisper":
                self.whispers.append(incoming.whisper)
            elif kind == "joined":
                self.joined.append(incoming.joined)
        self.seen.append((kind, me))
        self._queue.put_nowait(kind)
        self._changed.set()

    async def until(self, kind: str) -> None:
        """Wait until an event of `kind` is delivered (or was, and has not been waited for yet)."""
        async with asyncio.timeout(TIMEOUT):
            while await self._queue.get() != kind:
                pass

    async def until_true(self, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        """Wait until `condition` holds, checking it after each delivered event."""
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def texts(self) -> list[str]:
        """The text of every live message delivered so far."""
        return [message.text for message in self.messages]
