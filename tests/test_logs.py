"""The server's log lines: a UTC timestamp and a level on each, as text for people or JSON lines for shippers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from tests.conftest import ServerProcess, start_server_process

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def _create(server: ServerProcess, room: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        chat_pb2_grpc.ChatServiceStub(channel).CreateRoom(pb.CreateRoomRequest(room=room), timeout=10)


def test_text_lines_have_a_timestamp_and_a_level(server_process: ServerProcess) -> None:
    _create(server_process, "lobby")
    line = server_process.wait_for_line("New room lobby created")
    assert re.fullmatch(f"{TIMESTAMP} INFO New room lobby created", line), line


def test_json_lines_carry_the_same_as_fields(tmp_path: Path) -> None:
    proc = start_server_process(tmp_path / "state", "--log-format", "json")
    try:
        _create(proc, "lobby")
        entry = json.loads(proc.wait_for_line("New room lobby created"))
        assert re.fullmatch(TIMESTAMP, entry.pop("time"))
        assert entry == {
            "level": "INFO",
            "logger": "chat_service.rooms",
            "message": "New room lobby created",
            "room": "lobby",
        }
    finally:
        proc.stop()


def test_a_higher_level_leaves_info_out(tmp_path: Path) -> None:
    proc = start_server_process(tmp_path / "state", "--log-level", "warning")
    try:
        _create(proc, "quiet")
        proc.process.terminate()
        assert proc.process.wait(timeout=10) == 0
        rest = []
        while (line := proc.lines.get(timeout=10)) is not None:
            rest.append(line)
        assert "server stopped" in rest
        assert not [line for line in proc.seen + rest if "New room" in line]
    finally:
        proc.stop()


def test_rooms_closed_and_limits_hit_are_logged_once_per_flood_with_their_fields(tmp_path: Path) -> None:
    proc = start_server_process(
        tmp_path / "state",
        "--log-format",
        "json",
        "--max-rooms",
        "2",
        "--room-burst",
        "1",
        "--rooms-per-minute",
        "0.001",
    )
    admin = (("authorization", f"Bearer {proc.token_path.read_text().strip()}"),)
    try:
        with grpc.insecure_channel(proc.address) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            stub.CreateRoom(pb.CreateRoomRequest(room="lobby"), timeout=10)
            stub.CreateRoom(pb.CreateRoomRequest(room="attic"), metadata=admin, timeout=10)
            for n in range(20):
                for metadata in (admin, None):
                    # With the token no rate limit applies and the room cap refuses; without it, the rate limit.
                    with pytest.raises(grpc.RpcError) as refused:
                        stub.CreateRoom(pb.CreateRoomRequest(room=f"extra{n}"), metadata=metadata, timeout=10)
                    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            stub.KillRoom(pb.KillRoomRequest(room="lobby"), metadata=admin, timeout=10)
            stub.PruneRooms(pb.PruneRoomsRequest(), metadata=admin, timeout=10)
        pruned = json.loads(proc.wait_for_line("Room attic pruned"))
        assert (pruned["level"], pruned["room"], pruned["reason"]) == ("INFO", "attic", "pruned")
        entries = [json.loads(line) for line in proc.seen if line.startswith("{")]
        killed = [entry for entry in entries if entry["message"].startswith("Room lobby killed")]
        assert [(entry["room"], entry["reason"]) for entry in killed] == [("lobby", "killed")]
        refusals = [entry for entry in entries if "limit" in entry]
        assert [(entry["level"], entry["limit"], entry["room"]) for entry in refusals] == [
            ("INFO", "max_rooms", "extra0"),
            ("INFO", "rooms", "extra0"),
        ]
        assert refusals[1]["peer"] == "127.0.0.1"
    finally:
        proc.stop()
