"""Every executable refuses a bad command line with a usage error (status 2), never a traceback or a wrong value."""

from __future__ import annotations

import subprocess
from importlib import metadata

import pytest

from tests.conftest import executable


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [executable(command[0]), *command[1:]],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--port", "70000"], "argument --port: must be from 0 to 65535, not 70000"),
        (["--port", "-1"], "argument --port: must be from 0 to 65535, not -1"),
        (["--port", "http"], "argument --port: expected a whole number, not 'http'"),
        (["--max-queue", "0"], "argument --max-queue: must be 1 or more, not 0"),
        (["--max-rooms", "0"], "argument --max-rooms: must be 1 or more, not 0"),
        (["--max-lines-in-flight", "0"], "argument --max-lines-in-flight: must be 1 or more, not 0"),
        (["--history", "-5"], "argument --history: must be 0 or more, not -5"),
        (["--resume-grace", "-1"], "argument --resume-grace: must be 0 seconds or more, not -1"),
        (["--resume-grace", "nan"], "argument --resume-grace: must be 0 seconds or more, not nan"),
        (["--log-level", "bogus"], "argument --log-level: invalid choice: 'BOGUS'"),
        (["--metrics-port", "70000"], "argument --metrics-port: must be from 0 to 65535, not 70000"),
        (["--store", "redis://x:1"], "argument --store: expected memory or nats://HOST:PORT[,nats://HOST:PORT...]"),
        (["--store", "nats://a:1,nats://b"], "argument --store: expected memory or nats://HOST:PORT"),
        (["--store", "nats://a:99999"], "argument --store: expected memory or nats://HOST:PORT"),
        (["--workers", "2"], "--workers needs a nats:// --store"),
        (["--workers", "0"], "argument --workers: must be from 1 to 256, not 0"),
        (["--replicas", "3"], "--replicas applies to a nats:// --store only"),
        (["--store", "nats://a:1", "--replicas", "6"], "argument --replicas: must be from 1 to 5, not 6"),
    ],
)
def test_the_server_refuses_bad_arguments(args: list[str], complaint: str) -> None:
    result = _run("chat-server", "--no-console", *args)
    assert result.returncode == 2
    assert complaint in result.stderr
    assert result.stderr.startswith("usage: chat-server")
    assert "Traceback" not in result.stderr


def test_the_server_takes_log_levels_in_any_case() -> None:
    result = _run("chat-server", "--log-level", "warning", "--help")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("program", ["chat", "chat-admin"])
@pytest.mark.parametrize("port", ["0", "65536", "-1", "x"])
def test_the_clients_refuse_a_port_out_of_range(program: str, port: str) -> None:
    result = _run(program, "--port", port)
    assert result.returncode == 2
    assert "argument --port:" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("program", ["chat-server", "chat", "chat-admin"])
def test_every_executable_tells_its_version(program: str) -> None:
    result = _run(program, "--version")
    assert (result.returncode, result.stdout) == (0, f"{program} {metadata.version('chat-service')}\n")


def test_tls_files_go_in_pairs() -> None:
    result = _run("chat-server", "--no-console", "--tls-cert", "cert.pem")
    assert result.returncode == 2
    assert "--tls-cert and --tls-key go together" in result.stderr
