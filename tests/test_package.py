"""The package as a user gets it: a wheel and an sdist built from this checkout, each installed in a fresh venv."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, start_server_process
from tests.proc import Proc

ROOT = Path(__file__).parent.parent
# Building and installing take tens of seconds on a busy machine.
pytestmark = pytest.mark.timeout(240)


BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from it, by `python -m build` with this venv's build tools."""
    out = tmp_path_factory.mktemp("dist")
    # Not isolated, to save two fresh build environments; the sdist's own install below still builds in one.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return out


@pytest.fixture(params=["whl", "tar.gz"])
def installed(request: pytest.FixtureRequest, dist: Path, tmp_path: Path) -> Iterator[Path]:
    """The bin/ folder of a fresh venv into which the wheel or the sdist was installed."""
    (artifact,) = dist.glob(f"*.{request.param}")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet", str(artifact)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    yield venv / "bin"


def test_an_installed_package_serves_chats_and_administers(installed: Path, tmp_path: Path) -> None:
    version = metadata.version("chat-service")
    for program in ("chat-server", "chat", "chat-admin"):
        shown = subprocess.run(
            [str(installed / program), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
        assert (shown.returncode, shown.stdout) == (0, f"{program} {version}\n"), shown.stderr
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{installed}{os.pathsep}{env.get('PATH', '')}"
    server: ServerProcess = start_server_process(tmp_path / "state", extra_env=env, program=installed / "chat-server")
    try:
        with Proc([str(installed / "chat"), "--port", str(server.port)], env=server.env) as alice:
            alice.send("/create lobby alice")
            alice.expect("room lobby created")
            alice.send("hello from an installed client")
            alice.expect("alice : hello from an installed client")
            listed = subprocess.run(
                [str(installed / "chat-admin"), "--port", str(server.port), "kill", "lobby"],
                env=server.env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert listed.returncode == 0, listed.stderr
            alice.expect("room lobby was closed by the server")
            assert alice.finish() == 0
    finally:
        server.stop()
