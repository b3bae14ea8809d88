"""Where the server's admin token comes from, and that a generated one is readable only by its owner."""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service import admin_token
from tests.conftest import ServerProcess, failed_start, start_server_process
from tests.proc import unused_port


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


def _token_path(state: Path, port: int) -> Path:
    return state / "chat-service" / f"admin-token-{port}"


def _refusals(address: str) -> list[str]:
    """The details of a KillRoom refused without a token and with a wrong one."""
    details: list[str] = []
    with grpc.insecure_channel(address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.RpcError) as refused:
                stub.KillRoom(pb.KillRoomRequest(room="r"), metadata=metadata)
            assert isinstance(refused.value, grpc.Call)
            details.append(refused.value.details() or "")
    return details


def test_a_link_planted_at_the_token_path_is_replaced_not_followed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = unused_port()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o644)
    planted = _token_path(state, port)
    planted.parent.mkdir(parents=True, mode=0o700)
    planted.symlink_to(victim)
    proc = start_server_process(state, "--port", str(port))
    try:
        assert (victim.read_text(), stat.S_IMODE(victim.stat().st_mode)) == ("precious\n", 0o644)
        assert not planted.is_symlink()
        assert stat.S_IMODE(planted.stat().st_mode) == 0o600
        assert _kill(proc.address, admin_token.read_token(planted)) == grpc.StatusCode.OK
    finally:
        proc.stop()


def test_a_stale_token_file_is_replaced_and_a_loose_directory_made_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = unused_port()
    stale = _token_path(state, port)
    stale.parent.mkdir(parents=True)
    stale.parent.chmod(0o777)
    stale.write_text("left-by-a-killed-server\n")
    proc = start_server_process(state, "--port", str(port))
    try:
        assert stat.S_IMODE(stale.parent.stat().st_mode) == 0o700
        token = admin_token.read_token(stale)
        assert token != "left-by-a-killed-server"
        assert _kill(proc.address, token) == grpc.StatusCode.OK
    finally:
        proc.stop()
    assert not stale.exists()


def test_a_token_directory_that_is_a_link_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (state / "chat-service").symlink_to(tmp_path / "elsewhere")
    result = failed_start(state)
    assert result.returncode == 1
    assert "it is a link or not a directory" in result.stderr
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_refusals_do_not_tell_anonymous_callers_where_the_token_lives(server_process: ServerProcess) -> None:
    unauthenticated, denied = _refusals(server_process.address)
    assert unauthenticated == "this needs the admin token as 'authorization: Bearer TOKEN' metadata"
    assert denied == "the admin token is wrong"
