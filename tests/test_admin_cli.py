"""The installed `chat-admin` executable against a real server: one-shot commands, the console, and its errors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_cli.admin import default_token_path
from tests.conftest import ServerProcess, executable
from tests.proc import chat, run_admin, unused_port


def create_rooms(server: ServerProcess, *names: str) -> None:
    """Make empty rooms through the API, so a test needs no chat client just to have something to list."""
    with grpc.insecure_channel(server.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for name in names:
            stub.CreateRoom(pb.CreateRoomRequest(room=name), timeout=10)


def test_ls(server_process: ServerProcess) -> None:
    empty = run_admin(server_process, "ls")
    assert (empty.returncode, empty.stdout, empty.stderr) == (0, "no rooms yet; /create ROOM makes one\n", "")
    create_rooms(server_process, "lobby", "attic")
    listed = run_admin(server_process, "ls")
    assert (listed.returncode, listed.stdout) == (
        0,
        "rooms:\n  attic (0 members, 0 messages)\n  lobby (0 members, 0 messages)\n",
    )


def test_kill_ejects_the_members(server_process: ServerProcess) -> None:
    with chat(server_process) as alice:
        alice.send("/create lobby alice")
        alice.expect("* room lobby created")
        killed = run_admin(server_process, "kill", "lobby")
        assert (killed.returncode, killed.stdout, killed.stderr) == (
            0,
            "room lobby killed; 1 member sent back to waiting\n",
            "",
        )
        alice.expect("* room lobby was closed by the server")
    assert run_admin(server_process, "ls").stdout == "no rooms yet; /create ROOM makes one\n"


def test_prune_closes_the_empty_rooms_and_says_which(server_process: ServerProcess) -> None:
    create_rooms(server_process, "attic", "cellar")
    with chat(server_process) as alice:
        alice.send("/create lobby alice")
        alice.expect("* room lobby created")
        pruned = run_admin(server_process, "prune")
        assert (pruned.returncode, pruned.stdout, pruned.stderr) == (0, "pruned 2 empty rooms: attic, cellar\n", "")
        again = run_admin(server_process, stdin="/prune\n")
        assert (again.returncode, again.stdout) == (0, "no empty rooms to prune\n")


def test_kill_unknown_room(server_process: ServerProcess) -> None:
    result = run_admin(server_process, "kill", "nowhere")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert "nowhere" in result.stderr
    assert result.stdout == ""


def test_token_from_the_environment_or_a_file(server_process: ServerProcess, tmp_path: Path) -> None:
    token = server_process.token_path.read_text().strip()
    create_rooms(server_process, "one", "two", "three")
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    # The token file is found even where the server's state directory is not.
    elsewhere = {**server_process.env, "XDG_STATE_HOME": str(tmp_path / "elsewhere")}
    by_file = run_admin(server_process, "--token-file", str(token_file), "kill", "one", env=elsewhere)
    assert (by_file.returncode, by_file.stderr) == (0, "")
    by_env = run_admin(server_process, "kill", "two", env={**elsewhere, "CHAT_ADMIN_TOKEN": token})
    assert (by_env.returncode, by_env.stderr) == (0, "")
    # A token file named on the command line wins over the environment variable.
    wrong_env = {**elsewhere, "CHAT_ADMIN_TOKEN": "stale-token"}
    by_flag = run_admin(server_process, "--token-file", str(token_file), "kill", "three", env=wrong_env)
    assert (by_flag.returncode, by_flag.stderr) == (0, "")


@pytest.mark.parametrize("source", ["file", "env"])
def test_wrong_token_is_refused(server_process: ServerProcess, tmp_path: Path, source: str) -> None:
    create_rooms(server_process, "lobby")
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")
    if source == "file":
        result = run_admin(server_process, "--token-file", str(token_file), "kill", "lobby")
        named = str(token_file)
    else:
        result = run_admin(server_process, "kill", "lobby", env={**server_process.env, "CHAT_ADMIN_TOKEN": "nope"})
        named = "$CHAT_ADMIN_TOKEN"
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: the server refused the admin token from {named}: ")
    assert run_admin(server_process, "ls").stdout == "rooms:\n  lobby (0 members, 0 messages)\n"


def test_missing_token_file_says_where_it_looked(server_process: ServerProcess, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-token"
    given = run_admin(server_process, "--token-file", str(missing), "kill", "lobby")
    assert given.returncode == 1
    assert str(missing) in given.stderr
    assert "--token-file" in given.stderr

    env = {**server_process.env, "XDG_STATE_HOME": str(tmp_path / "empty-state")}
    default = run_admin(server_process, "kill", "lobby", env=env)
    assert default.returncode == 1
    expected_path = tmp_path / "empty-state" / "chat-service" / f"admin-token-{server_process.port}"
    assert str(expected_path) in default.stderr
    assert "CHAT_ADMIN_TOKEN is not set" in default.stderr
    assert "Traceback" not in default.stderr


def test_default_token_path_matches_the_server(server_process: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", server_process.env["XDG_STATE_HOME"])
    assert default_token_path(server_process.port) == server_process.token_path


def test_console_reads_commands_line_by_line(server_process: ServerProcess) -> None:
    create_rooms(server_process, "lobby")
    result = run_admin(server_process, stdin="/ls\n\n/kill lobby\n/kill lobby\n/frob\n/help\n/quit\n/ls\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "rooms:",
        "  lobby (0 members, 0 messages)",
        "room lobby killed; 0 members sent back to waiting",
    ]
    assert lines[3].startswith("error: ") and "lobby" in lines[3]
    assert lines[4] == "error: unknown command /frob; /help lists the commands"
    assert "/kill ROOM" in result.stdout
    # Nothing after /quit runs.
    assert lines[-1].startswith("  /quit")


def test_no_server_is_a_clear_error() -> None:
    port = unused_port()
    result = subprocess.run(
        [executable("chat-admin"), "--port", str(port), "ls"], capture_output=True, text=True, timeout=20, check=False
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: cannot reach the chat server at 127.0.0.1:{port} (is it running? start it with 'make run')\n"
    )
