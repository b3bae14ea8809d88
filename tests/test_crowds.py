"""A crowd coming and going at once, from a process of its own, never costs a prompt reader its place."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from tests.conftest import UNLIMITED_FLAGS, ServerProcess, start_server_process
from tests.streams import Stream

# Far more than the server's --max-queue: before joins and leaves were kept apart from messages, a crowd going at
# once overflowed prompt readers' queues (at the default bound of 1024, with a crowd of 1,100).
CROWD = 1_500
MAX_QUEUE = 32
READERS = 5
TIMEOUT = 120.0
ROOT = Path(__file__).resolve().parent.parent
# Every wait inside is bounded by TIMEOUT; the whole test gets room for a few of them on a busy machine.
pytestmark = pytest.mark.timeout(4 * TIMEOUT)


class Reader:
    """A member that reads its stream promptly and keeps the room's members and lines as its events tell them."""

    def __init__(self, stream: Stream, joined: pb.Joined) -> None:
        self.stream = stream
        self.members = set(joined.members)
        self.lines: list[str] = []

    async def until(self, done: Callable[[Reader], bool]) -> None:
        """Read events until `done` holds; fails on an error event, the room's end or the stream's."""
        while not done(self):
            event = await self.stream.next(TIMEOUT)
            kind = event.WhichOneof("kind")
            if kind == "member_joined":
                self.members.add(event.member_joined.name)
            elif kind == "member_left":
                self.members.discard(event.member_left.name)
            elif kind == "members":
                self.members = set(event.members.names)
            elif kind == "message":
                self.lines.append(event.message.text)
            else:
                raise AssertionError(f"a prompt reader got {event}")


async def _every(readers: list[Reader], done: Callable[[Reader], bool]) -> None:
    await asyncio.wait_for(asyncio.gather(*(reader.until(done) for reader in readers)), TIMEOUT)


def _output(server: ServerProcess) -> list[str]:
    """Everything a stopped server printed."""
    while (line := server.lines.get(timeout=TIMEOUT)) is not None:
        server.seen.append(line)
    return server.seen


@pytest.mark.parametrize("going", ["killed", "leaving"])
async def test_a_crowd_going_at_once_leaves_prompt_readers_in_place(tmp_path: Path, going: str) -> None:
    # One address brings the whole crowd, far faster than the per-address join rate allows; asyncio's debug mode
    # would make the server several times slower, and the crowd, not the debug checks, is what is tested here.
    server = start_server_process(
        tmp_path / "state", "--max-queue", str(MAX_QUEUE), *UNLIMITED_FLAGS, extra_env={"PYTHONASYNCIODEBUG": ""}
    )
    names = {f"reader{i}" for i in range(READERS)}
    env = {key: value for key, value in os.environ.items() if key != "PYTHONASYNCIODEBUG"}
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            readers = [Reader(*await Stream.joined(stub, "hall", name, create=not i)) for i, name in enumerate(names)]
            crowd = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.crowd",
                server.address,
                "hall",
                str(CROWD),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                cwd=ROOT,
                env=env,
            )
            assert crowd.stdin is not None and crowd.stdout is not None
            try:
                await _every(readers, lambda reader: len(reader.members) == READERS + CROWD)
                assert await asyncio.wait_for(crowd.stdout.readline(), TIMEOUT) == b"joined\n"
                if going == "killed":
                    crowd.kill()
                else:
                    crowd.stdin.write(b"leave\n")
                    await crowd.stdin.drain()
                await _every(readers, lambda reader: reader.members == names)
                if going == "leaving":
                    assert await asyncio.wait_for(crowd.stdout.readline(), TIMEOUT) == b"left\n"
            finally:
                if crowd.returncode is None:
                    crowd.kill()
                await crowd.wait()
            await readers[0].stream.say("still here")
            await _every(readers, lambda reader: "still here" in reader.lines)
            listed = await stub.ListRooms(pb.ListRoomsRequest(), timeout=TIMEOUT)
            assert [(room.name, room.member_count) for room in listed.rooms] == [("hall", READERS)]
            # A member whose connection was lost keeps its name for a resume; one that left gives it back.
            latecomer = Stream(stub)
            await latecomer.join("hall", "c0")
            answer = await latecomer.next(TIMEOUT)
            if going == "killed":
                assert answer.error.code == pb.ERROR_CODE_NAME_TAKEN, answer
                assert "connection dropped" in answer.error.message
            else:
                assert answer.WhichOneof("kind") == "joined", answer
    finally:
        server.stop()
    assert not [line for line in _output(server) if "too slowly" in line]
