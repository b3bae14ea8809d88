"""Start-up and shut-down: ports, the admin token, health, reflection, signals and the console."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chat_service import admin_token, nats_store
from chat_service.console import run_console
from chat_service.encoding import encode
from chat_service.history import DEFAULT_HISTORY, DEFAULT_HISTORY_BYTES
from chat_service.limits import Limiter, Limits
from chat_service.memory_store import MemoryStore
from chat_service.metrics import Metrics
from chat_service.registry import Registry
from chat_service.rooms import DEFAULT_QUEUE_LIMIT, RoomRegistry
from chat_service.service import (
    DEFAULT_JOIN_TIMEOUT_SECONDS,
    DEFAULT_LINES_IN_FLIGHT,
    SERVICE_NAME,
    ChatServicer,
    handler,
)
from chat_service.stats import Stats
from chat_service.store import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_ROOMS, DEFAULT_RESUME_GRACE_SECONDS, Store

log = logging.getLogger(__name__)

# A crowd reconnecting at once (after a restart, say) arrives faster than grpc.aio takes calls up. Past gRPC's
# default backlog some are refused at random: a fifth of 4000 streams opened together were.
BACKLOG_OPTIONS: list[tuple[str, int]] = [
    ("grpc.server.max_pending_requests", 10_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]
MEMORY = "memory"
# Streams open at once on one connection; the client's further streams wait for one to end. bench/ opens 64.
DEFAULT_MAX_STREAMS_PER_CONNECTION = 100


def server_options(
    keepalive_seconds: float, max_streams: int = DEFAULT_MAX_STREAMS_PER_CONNECTION, *, reuse_port: bool = False
) -> list[tuple[str, int]]:
    """gRPC server options; a silent peer is dropped about 1.5 x `keepalive_seconds` after it went quiet."""
    keepalive_ms = int(keepalive_seconds * 1000)
    ack_ms = max(keepalive_ms // 2, 500)
    return [
        # A killed client is noticed at once by its closed socket; a vanished network (cable pulled, laptop
        # closed) only by pings that go unanswered.
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", ack_ms),
        # Current gRPC cores time the ack with this instead (default one minute), whatever keepalive_timeout says.
        ("grpc.http2.ping_timeout_ms", ack_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_ping_strikes", 0),
        # Off, a second server on the same port fails instead of silently sharing it; --workers shares it on purpose.
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.max_concurrent_streams", max_streams),
        *BACKLOG_OPTIONS,
    ]


@dataclass(frozen=True)
class Tls:
    """PEM bytes to serve TLS with; with `client_ca`, clients must present a certificate that CA signed."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass(frozen=True)
class Config:
    """How to run the server."""

    host: str = "127.0.0.1"
    port: int = 50051
    admin_token_file: Path | None = None
    queue_limit: int = DEFAULT_QUEUE_LIMIT
    history: int = DEFAULT_HISTORY
    history_bytes: int = DEFAULT_HISTORY_BYTES
    resume_grace_seconds: float = DEFAULT_RESUME_GRACE_SECONDS
    max_rooms: int = DEFAULT_MAX_ROOMS
    max_members: int = DEFAULT_MAX_MEMBERS
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION
    join_timeout_seconds: float = DEFAULT_JOIN_TIMEOUT_SECONDS
    lines_in_flight: int = DEFAULT_LINES_IN_FLIGHT
    empty_room_ttl: float | None = None
    limits: Limits = field(default_factory=Limits)
    grace_seconds: float = 5.0
    keepalive_seconds: float = 10.0
    tls: Tls | None = None
    # Off unless given; 0 picks a free port. Loopback by default: metrics are for the operator, not the internet.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Set for --workers: the processes share the port, and the kernel spreads connections over them.
    reuse_port: bool = False
    # MEMORY, or the comma-separated nats:// URLs of a JetStream cluster; `replicas` None lets the cluster's size say.
    store: str = MEMORY
    replicas: int | None = None


@dataclass
class Token:
    """The admin token, where it is stored, and whether this process made it (and so owns its file)."""

    value: str
    path: Path | None
    generated: bool


class ChatServer:
    """A running chat server: the gRPC server, its registry, and how to stop both."""

    def __init__(self, config: Config, token: str | None = None, store: Store | None = None) -> None:
        self.config = config
        stats = Stats()
        if store is None:
            store = memory_store(config)
        self.store = store
        self.registry: Registry[bytes] = RoomRegistry(
            store,
            encode,
            queue_limit=config.queue_limit,
            resume_grace=config.resume_grace_seconds,
            stats=stats,
        )
        self._token = choose_token(config, token)
        servicer = ChatServicer(
            self.registry,
            Limiter(config.limits, time.monotonic, stats),
            self._token.value,
            config.join_timeout_seconds,
            config.lines_in_flight,
        )
        self.metrics = (
            Metrics(stats, lambda: store.room_count, lambda: store.seated) if config.metrics_port is not None else None
        )
        self.metrics_port = 0
        self.health = _Health()
        self._guard = admin_token.AdminTokenInterceptor(
            self._token.value, frozenset({f"/{SERVICE_NAME}/KillRoom", f"/{SERVICE_NAME}/PruneRooms"})
        )
        # Timing comes first, so that it also times the calls the admin token guard refuses.
        timing = [self.metrics.interceptor(SERVICE_NAME)] if self.metrics is not None else []
        self._server = grpc.aio.server(
            interceptors=[*timing, self._guard],
            options=server_options(
                config.keepalive_seconds, config.max_streams_per_connection, reuse_port=config.reuse_port
            ),
        )
        self._server.add_generic_rpc_handlers([handler(servicer)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self._server,
        )
        self.port = 0
        self._stopping = False
        self._health_change: asyncio.Task[None] | None = None

    @property
    def admin_token(self) -> str:
        """The token KillRoom and PruneRooms require, and which exempts a call from every rate limit."""
        return self._token.value

    @property
    def token_path(self) -> Path | None:
        """Where the token is stored, when it is stored in a file."""
        return self._token.path

    @property
    def address(self) -> str:
        """host:port as clients dial it."""
        return host_port(self.config.host, self.port)

    async def start(self) -> None:
        """Bind, serve metrics if asked, write the token file if one was generated, and start serving."""
        address = host_port(self.config.host, self.config.port)
        tls = self.config.tls
        self.port = (
            self._server.add_secure_port(address, tls.credentials())
            if tls is not None
            else self._server.add_insecure_port(address)
        )
        # Before the token file, so that a metrics port in use leaves no file behind.
        if self.metrics is not None and self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        if self._token.generated:
            self._token.path = admin_token.default_token_path(self.port)
            admin_token.write_token(self._token.path, self._token.value)
        await self._server.start()
        await self._set_health(self.store.available)

    def store_available(self, available: bool) -> None:
        """The store came back or went away: health says whether new members can be served, and members are told."""
        if not self._stopping:
            self.registry.store_changed(available)
            self._health_change = asyncio.get_running_loop().create_task(self._set_health(available))

    async def _set_health(self, available: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if available else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(SERVICE_NAME, status)
        await self.health.set("", status)

    async def stop(self) -> None:
        """Tell every member the server is going, refuse new calls, and end within the grace period."""
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        await self.registry.shutdown()
        await self._server.stop(self.config.grace_seconds)
        if self.metrics is not None:
            # Stopping the HTTP server waits for its thread's poll, up to half a second: not on the loop.
            await asyncio.to_thread(self.metrics.close)
        if self._token.generated and self._token.path is not None:
            self._token.path.unlink(missing_ok=True)


class _Health(health.aio.HealthServicer):  # type: ignore[misc]
    """The library's health service, with the List method that its proto advertises and it leaves out."""

    async def List(  # noqa: N802
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> health_pb2.HealthListResponse:
        statuses = {name: health_pb2.HealthCheckResponse(status=status) for name, status in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)


def memory_store(config: Config) -> MemoryStore:
    """The in-memory store the flags describe."""
    return MemoryStore(
        history_limit=config.history,
        history_bytes=config.history_bytes,
        max_rooms=config.max_rooms,
        max_members=config.max_members,
        empty_room_ttl=config.empty_room_ttl,
    )


async def open_store(config: Config, on_availability: Callable[[bool], None]) -> Store:
    """The store --store names, connected; `on_availability` hears a shared store come and go."""
    if config.store == MEMORY:
        return memory_store(config)
    return await nats_store.connect(
        [url.strip() for url in config.store.split(",")],
        replicas=config.replicas,
        history_limit=config.history,
        history_bytes=config.history_bytes,
        resume_grace=config.resume_grace_seconds,
        max_rooms=config.max_rooms,
        max_members=config.max_members,
        empty_room_ttl=config.empty_room_ttl,
        on_availability=on_availability,
    )


def host_port(host: str, port: int) -> str:
    """`host:port` for gRPC, with an IPv6 host in brackets whether or not it was given with them."""
    host = host.removeprefix("[").removesuffix("]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def choose_token(config: Config, token: str | None) -> Token:
    """The admin token: given, from the environment, from --admin-token-file, or new (written once serving)."""
    if token is not None:
        return Token(token, None, generated=False)
    from_env = os.environ.get(admin_token.ENV_VAR)
    if from_env:
        return Token(from_env.strip(), None, generated=False)
    if config.admin_token_file is not None:
        return Token(admin_token.read_token(config.admin_token_file), config.admin_token_file, generated=False)
    return Token(admin_token.new_token(), None, generated=True)


async def run(
    config: Config, *, console: bool, token: str | None = None, ready: Callable[[int], None] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM (or the console's /quit), then shut down gracefully. A worker passes its
    supervisor's `token` and `ready`, called with the metrics port instead of printing the start-up lines."""
    # Handlers first: a supervisor may send SIGTERM the moment it reads the listening line, and that must still
    # shut down cleanly and remove the token file.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server: ChatServer | None = None

    def availability(available: bool) -> None:
        if server is not None:
            server.store_available(available)

    server = ChatServer(config, token, await open_store(config, availability))
    await server.start()
    if ready is not None:
        ready(server.metrics_port)
    else:
        _announce(server)
    tasks: list[asyncio.Task[object]] = [asyncio.create_task(stop.wait())]
    if console:
        tasks.append(asyncio.create_task(run_console(server.registry)))
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        if ready is None:
            print("shutting down: telling every member and closing connections", flush=True)
        await server.stop()
        if ready is None:
            print("server stopped", flush=True)
        sys.stdout.flush()


def _announce(server: ChatServer) -> None:
    config = server.config
    print(f"chat server listening on {server.address}", flush=True)
    if server.metrics is not None:
        print(f"metrics: http://{host_port(config.metrics_host, server.metrics_port)}/metrics", flush=True)
    if config.tls is not None:
        required = ", client certificates required" if config.tls.client_ca is not None else ""
        print(f"TLS: on{required}", flush=True)
    if server.token_path is not None:
        print(f"admin token: {server.token_path}", flush=True)
    else:
        print(f"admin token: from ${admin_token.ENV_VAR}", flush=True)
