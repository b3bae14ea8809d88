"""Shared fixtures: a real server on an ephemeral loopback port, in-process or as the installed executable."""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import nats as nats_client
import pytest
from nats.js.errors import NotFoundError

from chat.v1 import chat_pb2_grpc
from chat_service import nats_store
from chat_service.events import Event
from chat_service.limits import NO_LIMIT, Limits
from chat_service.memory_store import MemoryStore
from chat_service.rooms import RoomRegistry
from chat_service.server import ChatServer, Config
from chat_service.store import Store
from tests.lagging_store import LaggingStore
from tests.nats import READY_TIMEOUT, NatsNode, nats_node

T = TypeVar("T")

BIN = Path(sys.executable).parent
UNLIMITED = Limits(rooms=NO_LIMIT, joins=NO_LIMIT, lines=NO_LIMIT)
# The same for the executable, for tests that flood from one address on purpose.
UNLIMITED_FLAGS = ("--rooms-per-minute", "0", "--joins-per-second", "0", "--lines-per-second", "0")
# The stores every behaviour suite runs against: the store suite (tests/test_store.py) and the registry's. A test
# gets "nats" as the URL of the session's nats-server (see `shared_nats`), emptied for it.
STORES = ["memory", "nats"]
# Options of a store rather than of the registry above it; make_registry hands these to make_store.
STORE_OPTIONS = frozenset({"history_limit", "history_bytes", "max_rooms", "max_members", "empty_room_ttl"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "unlimited: the `server` fixture runs without rate limits (the test floods)")
    config.addinivalue_line("markers", "cluster: starts a 3-node NATS cluster, slowest of all; -m 'not cluster' skips")


def executable(name: str) -> str:
    """The installed console script `name` from this virtual environment."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run 'make test' to install the package")
    return str(path)


async def make_store(kind: str, **options: Any) -> Store:
    """A new store of `kind` (one of STORES, or a NATS URL) with `options` (see STORE_OPTIONS); empty unless `kind`
    is the URL of a NATS that another store of this test already uses."""
    if kind == "memory":
        return MemoryStore(**options)
    if kind == "lagging":
        return LaggingStore(MemoryStore(**options))
    if kind.startswith("nats://"):
        return await nats_store.connect([kind], replicas=1, **options)
    raise ValueError(f"no store called {kind!r}")


async def empty_nats(url: str) -> None:
    """Delete the NATS store's stream and buckets, so that the next store made on `url` starts empty."""
    connection = await nats_client.connect(url)
    try:
        jetstream = connection.jetstream()
        buckets = (nats_store.ROOMS_BUCKET, nats_store.NAMES_BUCKET, nats_store.PROCESSES_BUCKET)
        for stream in (nats_store.LOG_STREAM, *(f"KV_{bucket}" for bucket in buckets)):
            with contextlib.suppress(NotFoundError):
                await jetstream.delete_stream(stream)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsNode]:
    """One nats-server with JetStream for the session's behaviour suites; each test empties it (`store_kind`)."""
    node = NatsNode(tmp_path_factory.mktemp("shared-nats"))
    node.start()
    # Waited for without an event loop: the first test to ask for it asks from inside its own running loop.
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while not _healthy(node):
            assert node.process is not None and node.process.poll() is None, "the shared nats-server exited"
            assert time.monotonic() < deadline, f"the shared nats-server was not ready within {READY_TIMEOUT} s"
            time.sleep(0.05)
        yield node
    finally:
        if node.process is not None:
            node.process.terminate()
            node.process.wait(READY_TIMEOUT)


def _healthy(node: NatsNode) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/healthz", timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


async def _kind(request: pytest.FixtureRequest) -> str:
    """The store kind a parametrised fixture names: for "nats", the shared nats-server's URL, emptied."""
    kind = str(request.param)
    if kind != "nats":
        return kind
    node: NatsNode = request.getfixturevalue("shared_nats")
    await empty_nats(node.url)
    return node.url


# The store suite also runs against the in-memory store made to pause and lag as a shared one does, which proves
# the suite relies on nothing a shared store cannot give.
@pytest.fixture(params=[*STORES, "lagging"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A new store of each kind, small enough to reach its limits: 5 messages a room, 3 rooms, 4 names."""
    made = await make_store(await _kind(request), history_limit=5, max_rooms=3, max_members=4)
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture(params=STORES)
async def store_kind(request: pytest.FixtureRequest) -> str:
    """Which store a registry test builds its registries over: "memory", or the URL of an empty NATS."""
    return await _kind(request)


async def build_registry(kind: str, encode: Callable[[Event], T], **options: Any) -> RoomRegistry[T]:
    """A registry over a new store of `kind`: `options` named in STORE_OPTIONS go to the store, the rest to it."""
    store = await make_store(kind, **{key: value for key, value in options.items() if key in STORE_OPTIONS})
    return RoomRegistry(store, encode, **{key: value for key, value in options.items() if key not in STORE_OPTIONS})


def _identity(event: Event) -> Event:
    return event


@pytest.fixture
async def registry(store_kind: str) -> AsyncIterator[Callable[..., Awaitable[RoomRegistry[Event]]]]:
    """Makes registries whose events come out as plain values (or as `encode` makes them), each over a store of the
    kind: a new one in memory; in NATS the test's, so that two registries stand for two server processes. Shut down
    after."""
    made: list[RoomRegistry[Event]] = []

    async def make(encode: Callable[[Event], Event] = _identity, **options: Any) -> RoomRegistry[Event]:
        made.append(await build_registry(store_kind, encode, **options))
        return made[-1]

    yield make
    for registry in made:
        await registry.shutdown()


@contextlib.asynccontextmanager
async def running(config: Config) -> AsyncIterator[ChatServer]:
    """A real grpc.aio chat server with `config` (use port 0) in this event loop, stopped on exit."""
    chat = ChatServer(config, token="test-admin-token")
    await chat.start()
    try:
        yield chat
    finally:
        await chat.stop()


@pytest.fixture
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ChatServer]:
    """A real grpc.aio chat server on 127.0.0.1, port 0, in this event loop; without rate limits if marked so."""
    limits = UNLIMITED if request.node.get_closest_marker("unlimited") else Limits()
    async with running(Config(port=0, grace_seconds=1.0, limits=limits)) as chat:
        yield chat


@pytest.fixture
async def channel(server: ChatServer) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to the in-process server."""
    async with grpc.aio.insecure_channel(server.address) as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceAsyncStub:
    """A ChatService stub on `channel`."""
    return chat_pb2_grpc.ChatServiceStub(channel)


@dataclass
class ServerProcess:
    """A `chat-server` subprocess and its stdout, read line by line."""

    process: subprocess.Popen[str]
    env: dict[str, str]
    host: str = "127.0.0.1"
    port: int = 0
    token_path: Path = Path()
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """SIGTERM the server if it still runs (SIGKILL after 10 s) and close its output."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def wait_for_line(self, substring: str, timeout: float = 10.0) -> str:
        """Read stdout until a line contains `substring`; fail with everything read on timeout or exit."""
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"server never printed {substring!r}; it printed {self.seen!r}") from None
            if line is None:
                raise AssertionError(f"server exited before printing {substring!r}; it printed {self.seen!r}")
            self.seen.append(line)
            if substring in line:
                return line


def _pump(stream: object, lines: queue.Queue[str | None]) -> None:
    assert hasattr(stream, "readline")
    # `stop` closes the stream once the server has exited, which can fall under a read still in progress.
    with contextlib.suppress(ValueError, OSError):
        for line in iter(stream.readline, ""):
            lines.put(line.rstrip("\n"))
    lines.put(None)


def start_server_process(
    state_dir: Path,
    *args: str,
    extra_env: dict[str, str] | None = None,
    program: Path | None = None,
    timeout: float = 10.0,
) -> ServerProcess:
    """Start `chat-server --port 0` (or `program`) with its own XDG_STATE_HOME and wait until it listens, at most
    `timeout` seconds."""
    env = {k: v for k, v in os.environ.items() if k != "CHAT_ADMIN_TOKEN"}
    env["XDG_STATE_HOME"] = str(state_dir)
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        [str(program or executable("chat-server")), "--port", "0", "--no-console", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    proc = ServerProcess(process, env)
    threading.Thread(target=_pump, args=(process.stdout, proc.lines), daemon=True).start()
    listening = proc.wait_for_line("chat server listening on", timeout)
    # `chat server listening on HOST:PORT`, followed by ` (N workers)` under --workers.
    proc.port = int(listening.rsplit(":", 1)[1].split()[0])
    token_line = proc.wait_for_line("admin token:")
    proc.token_path = Path(token_line.split(":", 1)[1].strip())
    return proc


def failed_start(state_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `chat-server --port 0 ARGS`, expected to stop at start-up, with its own XDG_STATE_HOME; how it ended."""
    result = subprocess.run(
        [executable("chat-server"), "--port", "0", "--no-console", *args],
        env={**os.environ, "XDG_STATE_HOME": str(state_dir)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr
    return result


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real `chat-server` executable on an ephemeral loopback port, stopped with SIGTERM afterwards."""
    proc = start_server_process(tmp_path / "state")
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture
async def nats(tmp_path: Path) -> AsyncIterator[NatsNode]:
    """A real nats-server with JetStream on a free loopback port, storing files under tmp_path, stopped afterwards."""
    async with nats_node(tmp_path / "jetstream") as node:
        yield node
