"""The server's own console, typed into on a real (pseudo-)terminal."""

from __future__ import annotations

import os
import re
from pathlib import Path

import grpc

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from tests.conftest import executable
from tests.terminal import Terminal


def test_console_lists_and_kills_rooms(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "CHAT_ADMIN_TOKEN": "t"}
    with Terminal([executable("chat-server"), "--port", "0"], env) as term:
        term.expect("chat server listening on 127.0.0.1:")
        port = re.match(r"\d+", term.screen)
        assert port is not None
        term.expect("admin>")
        term.type("/ls\r")
        term.expect("no rooms")
        with grpc.insecure_channel(f"127.0.0.1:{port.group()}") as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for room in ("lobby", "attic", "cellar"):
                stub.CreateRoom(pb.CreateRoomRequest(room=room))
        term.expect("New room cellar created")
        term.type("/prune\r")
        term.expect("pruned 3 empty rooms: attic, cellar, lobby")
        with grpc.insecure_channel(f"127.0.0.1:{port.group()}") as channel:
            chat_pb2_grpc.ChatServiceStub(channel).CreateRoom(pb.CreateRoomRequest(room="lobby"))
        term.expect("New room lobby created")
        term.type("/ls\r")
        term.expect("lobby (0 members, 0 messages)")
        term.type("/kill nowhere\r")
        term.expect("error: room 'nowhere' does not exist")
        term.type("/kill lobby\r")
        term.expect("room lobby closed")
        # Ctrl-C only discards a half-typed line, as in the chat client; the server goes on.
        term.type("/half-typed")
        term.expect("/half-typed")
        term.type("\x03/ls\r")
        term.expect("no rooms")
        assert "shutting down" not in term.seen
        term.type("/bogus\r")
        term.expect("unknown command")
        term.type("/quit\r")
        term.expect("server stopped")
        assert term.wait() == 0
