"""TLS and mutual TLS end to end, with a throwaway CA: the clients, the admin CLI, health, and mismatches both ways."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_cli.admin import Admin, token_may_travel
from chat_cli.commands import Kill, Prune
from tests.conftest import ServerProcess, executable, start_server_process
from tests.proc import Proc, run_admin


@dataclass(frozen=True)
class Pki:
    """PEM files of a CA, a server certificate for loopback, and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "::1", "localhost")
    client = ca.issue_cert("alice@example.org")
    pki = Pki(*(folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    ca.cert_pem.write_to_path(str(pki.ca))
    server.private_key_pem.write_to_path(str(pki.server_key))
    client.private_key_pem.write_to_path(str(pki.client_key))
    for leaf, path in ((server, pki.server_cert), (client, pki.client_cert)):
        path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return pki


def _serve(tmp_path: Path, pki: Pki, *extra: str) -> ServerProcess:
    return start_server_process(
        tmp_path / "state", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), *extra
    )


@pytest.fixture
def tls_server(tmp_path: Path, pki: Pki) -> Iterator[ServerProcess]:
    proc = _serve(tmp_path, pki)
    try:
        yield proc
    finally:
        proc.stop()


def _chat(server: ServerProcess, *args: str) -> Proc:
    return Proc([executable("chat"), "--host", server.host, "--port", str(server.port), *args], env=server.env)


def test_members_chat_and_an_admin_kills_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    assert "TLS: on" in tls_server.seen
    with _chat(tls_server, "--tls", "--ca", str(pki.ca)) as alice:
        alice.send("/create lobby alice")
        alice.expect("room lobby created")
        alice.send("hello over tls")
        alice.expect("alice : hello over tls")
        killed = run_admin(tls_server, "--tls", "--ca", str(pki.ca), "kill", "lobby")
        assert (killed.returncode, killed.stderr) == (0, ""), killed.stderr
        alice.expect("room lobby was closed by the server")
        assert alice.finish() == 0


def test_health_and_reflection_answer_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
    with grpc.secure_channel(tls_server.address, credentials) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (listed,) = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(iter([request]), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert "chat.v1.ChatService" in {service.name for service in listed.list_services_response.service}


def test_a_plaintext_client_is_told_the_server_wants_tls(tls_server: ServerProcess) -> None:
    with _chat(tls_server) as plain:
        assert plain.wait() == 1
        assert "does not speak plaintext gRPC; if the server uses TLS, add --tls" in plain.stderr
        assert "Traceback" not in plain.stderr
    listed = run_admin(tls_server, "ls")
    assert listed.returncode == 1
    assert "add --tls" in listed.stderr


def test_a_tls_client_is_told_the_server_is_plaintext(server_process: ServerProcess, pki: Pki) -> None:
    with _chat(server_process, "--tls", "--ca", str(pki.ca)) as secure:
        assert secure.wait() == 1
        assert f"the TLS handshake with {server_process.address} failed" in secure.stderr
        assert "Traceback" not in secure.stderr


def test_a_server_asking_for_client_certificates_refuses_clients_without_one(tmp_path: Path, pki: Pki) -> None:
    proc = _serve(tmp_path, pki, "--tls-client-ca", str(pki.ca))
    try:
        assert "TLS: on, client certificates required" in proc.seen
        with _chat(proc, "--ca", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key)) as alice:
            alice.send("/create lobby alice")
            alice.expect("room lobby created")
            assert alice.finish() == 0
        with _chat(proc, "--tls", "--ca", str(pki.ca)) as anonymous:
            assert anonymous.wait() == 1
            assert "(--cert and --key)" in anonymous.stderr
    finally:
        proc.stop()


def test_a_client_certificate_needs_its_key(tls_server: ServerProcess, pki: Pki) -> None:
    with _chat(tls_server, "--cert", str(pki.client_cert)) as half:
        assert half.wait() == 1
        assert "--cert and --key go together" in half.stderr


@pytest.mark.parametrize(
    ("host", "tls", "insecure", "allowed"),
    [
        ("127.0.0.1", False, False, True),
        ("127.0.0.7", False, False, True),
        ("localhost", False, False, True),
        ("::1", False, False, True),
        ("[::1]", False, False, True),
        ("::ffff:127.0.0.1", False, False, True),
        ("chat.example.org", False, False, False),
        ("192.0.2.10", False, False, False),
        ("192.0.2.10", True, False, True),
        ("192.0.2.10", False, True, True),
    ],
)
def test_the_admin_token_travels_in_clear_only_to_loopback(host: str, tls: bool, insecure: bool, allowed: bool) -> None:
    assert token_may_travel(host, tls=tls, insecure=insecure) is allowed


def test_no_admin_command_sends_the_token_where_it_may_not_travel(server_process: ServerProcess) -> None:
    with grpc.insecure_channel(server_process.address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        stub.CreateRoom(pb.CreateRoomRequest(room="lobby"), timeout=10)
        # As if the host were elsewhere on a plaintext channel: the refusal comes before anything is sent.
        admin = Admin(stub, "chat.example.org:50051", None, server_process.port, token_may_travel=False)
        for command in (Kill("lobby"), Prune()):
            (line,) = admin.run(command)
            assert line.startswith("error: refusing to send the admin token in plaintext to chat.example.org:50051")
        assert [room.name for room in stub.ListRooms(pb.ListRoomsRequest(), timeout=10).rooms] == ["lobby"]
