"""`python -m bench.bare`: what grpc.aio alone costs a server per streamed write, with no chat code at all.

The chat server writes at least once per member per batch, so no figure of `make bench` can go below what the same
writes cost a bare server: `make bench` measures that floor for each shape with `measure`, and this command line
measures it by events per write, writes in flight and streams per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import queue
import resource
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any, TypeVar, cast

import grpc
import uvloop

from bench import procstat
from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.server import BACKLOG_OPTIONS

TIMEOUT = 120.0
SETTLE_SECONDS = 1.0  # idle: as the chat benchmark waits before reading memory
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["ChatService"].full_name
# A private subchannel pool per channel gives each channel its own TCP connection; without it grpc would
# multiplex every channel to the same address over one connection.
CHANNEL_OPTIONS: list[tuple[str, int]] = [("grpc.use_local_subchannel_pool", 1)]


@dataclass(frozen=True)
class Case:
    """`streams` streams each written `rounds` times, `events` message events per write.

    Writes go back to back unless `interval_ns` is set: then the streams form `groups` rooms, each with `senders`
    that every `interval_ns` (staggered as the chat benchmark's steady senders are) write once to all its streams.
    """

    streams: int
    rounds: int
    events: int
    in_flight: int  # writes in flight server-wide at most; 0 for no cap
    per_connection: int = 1
    groups: int = 1
    senders: int = 1
    interval_ns: int = 0
    memory: bool = False  # wait for the server to settle, as the chat benchmark does, before reading its memory

    @property
    def writes(self) -> int:
        return self.streams * self.rounds


@dataclass(frozen=True)
class Result:
    """The server's CPU from the first write to the last read, and its memory per open stream."""

    case: Case
    cpu_seconds: float
    wall_seconds: float
    rss_per_stream_kib: float

    @property
    def us_per_write(self) -> float:
        return 1e6 * self.cpu_seconds / max(1, self.case.writes)

    @property
    def us_per_event(self) -> float:
        return self.us_per_write / self.case.events


def raise_open_files() -> None:
    """Lift this process's soft limit on open files to its hard limit: one connection per member needs thousands."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _run(main: Coroutine[Any, Any, None]) -> None:
    raise_open_files()
    uvloop.run(main)


def _serve(case: Case, ports: Queue[int], read_all: ProcessEvent, results: Queue[Result]) -> None:
    _run(_serve_async(case, ports, read_all, results))


class _Stream:
    """One bare stream's writes still due, and the future its handler sleeps on when none is."""

    __slots__ = ("due", "waiter")

    def __init__(self) -> None:
        self.due = 0
        self.waiter: asyncio.Future[None] | None = None

    def tick(self) -> None:
        self.due += 1
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


class _Servicer:
    """The Chat method with no chat code: each stream waits for Go, writes its share, then waits to be ended."""

    def __init__(self, case: Case) -> None:
        self.case = case
        message = pb.Event(message=pb.Message(seq=1, sender="alice", text="x" * 40))
        message.message.sent_at.GetCurrentTime()
        self.message = message
        self.batches: dict[int, bytes] = {}
        self.slots: contextlib.AbstractAsyncContextManager[object] = (
            asyncio.Semaphore(case.in_flight) if case.in_flight else contextlib.nullcontext()
        )
        self.groups: list[list[_Stream]] = [[] for _ in range(case.groups)]
        self.all_open = asyncio.Event()
        self.go = asyncio.Event()
        self.finish = asyncio.Event()

    def batch(self, due: int) -> bytes:
        """One pre-encoded ChatResponse carrying `due` writes' worth of events."""
        if due not in self.batches:
            events = [self.message] * (self.case.events * due)
            self.batches[due] = pb.ChatResponse(events=events).SerializeToString()
        return self.batches[due]

    async def chat(self, requests: object, context: grpc.aio.ServicerContext[object, bytes]) -> None:
        case, slots = self.case, self.slots
        opened = sum(len(group) for group in self.groups)
        stream = _Stream()
        self.groups[opened % case.groups].append(stream)
        if opened + 1 == case.streams:
            self.all_open.set()
        await self.go.wait()
        if case.interval_ns:
            await self._paced(stream, context)
        else:
            payload = self.batch(1)
            for _ in range(case.rounds):
                async with slots:
                    await context.write(payload)
        await self.finish.wait()

    async def _paced(self, stream: _Stream, context: grpc.aio.ServicerContext[object, bytes]) -> None:
        loop = asyncio.get_running_loop()
        written = 0
        while written < self.case.rounds:
            while not stream.due:
                stream.waiter = loop.create_future()
                await stream.waiter
            async with self.slots:
                # As the chat server does, one write carries every event due by the time a slot is free.
                due, stream.due = stream.due, 0
                written += due
                await context.write(self.batch(due))


async def _serve_async(case: Case, ports: Queue[int], read_all: ProcessEvent, results: Queue[Result]) -> None:
    servicer = _Servicer(case)
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Chat": grpc.stream_stream_rpc_method_handler(servicer.chat, response_serializer=None)}
    )
    # With gRPC's default backlog of calls not yet taken up, some of 1400 or more streams opened together fail.
    server = grpc.aio.server(options=BACKLOG_OPTIONS)
    server.add_generic_rpc_handlers([handler])
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    rss_start = procstat.rss_kib()
    senders: list[asyncio.Task[None]] = []
    try:
        await asyncio.wait_for(servicer.all_open.wait(), TIMEOUT)
        cpu, start = procstat.cpu_seconds(), time.monotonic()
        servicer.go.set()
        if case.interval_ns:
            senders = _start_senders(case, servicer.groups)
        if not await asyncio.to_thread(read_all.wait, TIMEOUT):
            raise TimeoutError("the reader did not read every write in time")
        cpu, wall = procstat.cpu_seconds() - cpu, time.monotonic() - start
        if case.memory:
            await asyncio.sleep(SETTLE_SECONDS)
        rss = (procstat.rss_kib() - rss_start) / case.streams
        results.put(Result(case, cpu, wall, rss))
    finally:
        servicer.finish.set()
        for task in senders:
            task.cancel()
        # A grace period lets every stream end with OK rather than be cancelled.
        await server.stop(10)


def _start_senders(case: Case, groups: list[list[_Stream]]) -> list[asyncio.Task[None]]:
    """Each group's senders, staggered over one interval as the chat benchmark's steady senders are."""
    start_ns = time.monotonic_ns()
    everyone = case.groups * case.senders

    async def send(group: list[_Stream], phase: float) -> None:
        for i in range(case.rounds // case.senders):
            delay = start_ns + int((i + phase) * case.interval_ns) - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            for stream in group:
                stream.tick()

    return [
        asyncio.create_task(send(group, (g * case.senders + s) / everyone))
        for g, group in enumerate(groups)
        for s in range(case.senders)
    ]


def _read(case: Case, port: int, read_all: ProcessEvent, done: ProcessEvent) -> None:
    _run(_read_async(case, port, read_all, done))


async def _read_async(case: Case, port: int, read_all: ProcessEvent, done: ProcessEvent) -> None:
    count = -(-case.streams // case.per_connection)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) for _ in range(count)]
    gate = asyncio.Semaphore(128)
    remaining = case.streams
    everything = asyncio.Event()

    async def one(index: int) -> None:
        nonlocal remaining
        async with gate:
            call = chat_pb2_grpc.ChatServiceStub(channels[index // case.per_connection]).Chat()
            await call.wait_for_connection()
        events = 0
        while events < case.rounds * case.events:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise RuntimeError(f"stream {index} ended before its {case.rounds} writes")
            events += len(cast(pb.ChatResponse, response).events)
        remaining -= 1
        if not remaining:
            everything.set()
        if await call.read() is not grpc.aio.EOF:
            raise RuntimeError(f"stream {index} got more than {case.rounds * case.events} events")

    tasks = [asyncio.create_task(one(index)) for index in range(case.streams)]
    try:
        waiter = asyncio.create_task(everything.wait())
        # Streams end only after the server has measured, so any stream finishing first failed.
        finished, _ = await asyncio.wait([waiter, *tasks], timeout=TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        if waiter not in finished:
            for task in finished:
                task.result()
            raise TimeoutError("the streams were not all read in time")
        read_all.set()
        await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)
    finally:
        for task in tasks:
            task.cancel()
        for channel in channels:
            await channel.close()
    done.set()


def measure(case: Case) -> Result:
    """Run one case against a fresh server process and a reader process; raise if either fails or stalls."""
    context = multiprocessing.get_context("spawn")
    ports: Queue[int] = context.Queue()
    results: Queue[Result] = context.Queue()
    read_all, done = context.Event(), context.Event()
    processes: list[BaseProcess] = []
    try:
        server = context.Process(target=_serve, args=(case, ports, read_all, results), daemon=True)
        server.start()
        processes.append(server)
        port = _get(ports, processes)
        reader = context.Process(target=_read, args=(case, port, read_all, done), daemon=True)
        reader.start()
        processes.append(reader)
        return _get(results, processes)
    finally:
        stop_processes(processes, patience=10.0)


def stop_processes(processes: list[BaseProcess], patience: float) -> None:
    """Give processes `patience` seconds to exit on their own, then terminate and finally kill the stragglers."""
    deadline = time.monotonic() + patience
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
            process.join(2)
        if process.is_alive():
            process.kill()
            process.join(2)


def _get(answers: Queue[T], processes: list[BaseProcess]) -> T:
    # A dead process never answers, so poll rather than wait the whole timeout for nothing.
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            return answers.get(timeout=0.5)
        failed = [process for process in processes if process.exitcode not in (None, 0)]
        if failed:
            raise RuntimeError(f"a bare-benchmark process failed with exit status {failed[0].exitcode}")
    raise TimeoutError(f"no result within {TIMEOUT:g} s")


def _numbers(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, not {text!r}") from None
    if any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"must be 0 or more: {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bare benchmark's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare", description="Server CPU per streamed write of a bare grpc.aio server."
    )
    parser.add_argument("--streams", type=int, default=1000, help="streams, each written every round (default: 1000)")
    parser.add_argument("--rounds", type=int, default=50, help="writes per stream (default: 50)")
    parser.add_argument(
        "--events", type=_numbers, default=[1, 32], help="message events per write, a list (default: 1,32)"
    )
    parser.add_argument(
        "--in-flight",
        type=_numbers,
        default=[16, 64, 256, 0],
        help="writes in flight server-wide at most, a list; 0 for no cap (default: 16,64,256,0)",
    )
    parser.add_argument(
        "--streams-per-connection",
        type=_numbers,
        default=[1],
        help="streams sharing one TCP connection, a list (default: 1, a connection per stream as chat users have)",
    )
    args = parser.parse_args(argv)
    if args.streams < 1 or args.rounds < 1 or 0 in args.events or 0 in args.streams_per_connection:
        parser.error("--streams, --rounds and every --events and --streams-per-connection value must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every combination of --streams-per-connection, --events and --in-flight and print a row for each."""
    args = parse_args(argv)
    print(f"bare grpc.aio server (uvloop), {args.streams} streams x {args.rounds} writes, read by another process")
    print(f"{'streams/conn':>12} {'events/write':>12} {'in flight':>10} {'µs/write':>9} {'µs/event':>9} {'wall s':>7}")
    for per_connection in args.streams_per_connection:
        for events in args.events:
            for in_flight in args.in_flight:
                case = Case(args.streams, args.rounds, events, in_flight, per_connection)
                result = measure(case)
                cap = str(in_flight) if in_flight else "no cap"
                print(
                    f"{per_connection:>12} {events:>12} {cap:>10} {result.us_per_write:>9.1f} "
                    f"{result.us_per_event:>9.2f} {result.wall_seconds:>7.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
