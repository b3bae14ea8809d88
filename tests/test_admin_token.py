"""Where the server's admin token comes from, and that a generated one is readable only by its owner."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest

from chat_service import admin_token
from chat_service._pb.chat.v1 import chat_pb2 as pb
from chat_service._pb.chat.v1 import chat_pb2_grpc
from tests.conftest import ServerProcess, start_server_process


def _kill(address: str, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.CreateRoom(pb.CreateRoomRequest(room="r"))
        try:
            stub.KillRoom(pb.KillRoomRequest(room="r"), metadata=(("authorization", f"Bearer {token}"),))
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_generated_token_file_is_private_and_works(server_process: ServerProcess) -> None:
    path = server_process.token_path
    assert path == Path(server_process.env["XDG_STATE_HOME"]) / "chat-service" / f"admin-token-{server_process.port}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    token = admin_token.read_token(path)
    assert len(token) >= 32
    assert _kill(server_process.address, token) == grpc.StatusCode.OK
    assert _kill(server_process.address, token + "x") == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("source", ["file", "env"])
def test_server_takes_the_token_from_a_file_or_the_environment(tmp_path: Path, source: str) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("chosen-token\n")
    args = ["--admin-token-file", str(token_file)] if source == "file" else []
    env = {"CHAT_ADMIN_TOKEN": "chosen-token"} if source == "env" else {}
    proc = start_server_process(tmp_path / "state", *args, extra_env=env)
    try:
        assert not (tmp_path / "state" / "chat-service").exists()
        assert _kill(proc.address, "chosen-token") == grpc.StatusCode.OK
    finally:
        proc.process.terminate()
        proc.process.wait(timeout=10)
        if proc.process.stdout is not None:
            proc.process.stdout.close()
