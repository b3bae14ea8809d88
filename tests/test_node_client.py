"""Cross-language contract test: a Node.js client, built from chat.proto at run time, against the server."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import trustme

from chat_service.server import ChatServer, Config, Tls
from tests.conftest import running

NODE_DIR = Path(__file__).parent / "node"
CLIENT = NODE_DIR / "chat_client.mjs"
PROTO = Path(__file__).parent.parent / "proto" / "chat" / "v1" / "chat.proto"
ROOM = "node-room"
# The client gives up on its own after CLIENT_TIMEOUT_MS; the wait here only catches a node that ignores that.
CLIENT_TIMEOUT_MS = 20_000
PROCESS_TIMEOUT_S = 30.0


Event = dict[str, Any]


def _node() -> str:
    """Returns the node executable, failing (not skipping) the test when the toolchain is not installed."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH; install Node.js 20 and run `make test`")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(f"{NODE_DIR}/node_modules is missing; run `make test`, which installs it with npm ci")
    return node


async def _run_client(address: str, *extra: str) -> dict[str, Any]:
    """Runs the Node scenario against `address` and returns the JSON document it printed."""
    proc = await asyncio.create_subprocess_exec(
        _node(),
        str(CLIENT),
        address,
        "--proto",
        str(PROTO),
        "--timeout-ms",
        str(CLIENT_TIMEOUT_MS),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), PROCESS_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"the Node client was still running after {PROCESS_TIMEOUT_S} s and was killed")
    if proc.returncode != 0:
        pytest.fail(f"the Node client exited {proc.returncode}:\n{stderr.decode(errors='replace')}")
    document: dict[str, Any] = json.loads(stdout)
    return document


def _of_kind(events: list[Event], kind: str) -> list[dict[str, Any]]:
    """Returns the fields of every event of one kind, in the order received."""
    return [event[kind] for event in events if event["kind"] == kind]


async def test_node_client_chats_through_the_python_server(server: ChatServer) -> None:
    """Two Node streams join, talk, whisper and leave; each sees exactly what the contract promises."""
    result = await _run_client(server.address)
    streams: dict[str, Any] = result["streams"]
    alice: list[Event] = streams["alice"]["events"]
    bob: list[Event] = streams["bob"]["events"]

    assert ROOM not in [room["name"] for room in result["rooms_before"]]
    during = {room["name"]: room for room in result["rooms_during"]}
    assert during[ROOM]["member_count"] == 2

    alice_joined = _of_kind(alice, "joined")
    assert len(alice_joined) == 1
    assert alice_joined[0]["room"] == ROOM
    assert alice_joined[0]["name"] == "alice"
    assert alice_joined[0]["created"] is True
    bob_joined = _of_kind(bob, "joined")
    assert len(bob_joined) == 1
    assert bob_joined[0]["name"] == "bob"
    assert bob_joined[0]["created"] is False
    assert bob_joined[0]["members"] == ["alice", "bob"]
    assert [m["name"] for m in _of_kind(alice, "member_joined")] == ["bob"]
    # A member is never told about its own arrival.
    assert _of_kind(bob, "member_joined") == []

    expected_lines = [(1, "alice", "hello from alice"), (2, "bob", "hello from bob")]
    for events in (alice, bob):
        lines = [(int(m["seq"]), m["sender"], m["text"]) for m in _of_kind(events, "message")]
        assert lines == expected_lines
        assert all(m["sent_at"] is not None for m in _of_kind(events, "message"))

    whisper = {"sender": "alice", "recipient": "bob", "text": "psst, bob"}
    for events in (alice, bob):
        whispers = _of_kind(events, "whisper")
        assert [{key: w[key] for key in whisper} for w in whispers] == [whisper]

    left = [(m["name"], m["reason"]) for m in _of_kind(alice, "member_left")]
    assert left == [("bob", "LEAVE_REASON_LEFT")]
    for stream in streams.values():
        assert _of_kind(stream["events"], "error") == []
        assert _of_kind(stream["events"], "room_closed") == []
        assert stream["status"]["code_name"] == "OK"


async def test_node_client_chats_over_tls(tmp_path: Path) -> None:
    """The same scenario over TLS, trusting a throwaway CA: the contract holds whatever the transport."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    chain = b"".join(blob.bytes() for blob in leaf.cert_chain_pems)
    tls = Tls(chain, leaf.private_key_pem.bytes())
    async with running(Config(port=0, grace_seconds=1.0, tls=tls)) as server:
        result = await _run_client(server.address, "--ca", str(ca_file))
    for stream in result["streams"].values():
        assert [m["text"] for m in _of_kind(stream["events"], "message")] == ["hello from alice", "hello from bob"]
        assert stream["status"]["code_name"] == "OK"
