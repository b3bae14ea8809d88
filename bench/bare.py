"""`python -m bench.bare`: what grpc.aio alone costs a server per streamed write, with no chat code at all: the
floor under each of `make bench`'s figures (`measure`), or a table by events per write, writes in flight and
streams per connection."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection

import grpc

from bench import processes, procstat
from bench.processes import BenchError, command
from bench.protocol import Done, End, Go, Ready
from bench.shapes import WINDOW
from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.server import BACKLOG_OPTIONS

TIMEOUT = 120.0
SETTLE_SECONDS = 1.0  # idle: how long both benchmarks wait before reading memory
SERVICE = pb.DESCRIPTOR.services_by_name["ChatService"].full_name


@dataclass(frozen=True)
class Case:
    """`streams` streams each written `rounds` times, `events` message events per write: back to back, or with
    `interval_ns`, by `groups` rooms whose `senders` each write once to all its streams every interval, staggered."""

    streams: int
    rounds: int
    events: int
    in_flight: int  # writes in flight server-wide at most; 0 for no cap
    per_connection: int = 1
    groups: int = 1
    senders: int = 1
    interval_ns: int = 0
    memory: bool = False  # wait for the server to settle, as the chat benchmark does, before reading its memory
    lines: int = 0  # said by each of the first groups x senders streams, and read by the server, as chat senders' are
    # Reader processes, each with its share of the connections: as many as the chat run's load generator had, since
    # the kernel's and gRPC's cost of a write depends on how many processes read them (measured in bench/README).
    readers: int = 1


@dataclass(frozen=True)
class Result:
    """The server's CPU from the first write to the last read, and its memory per open stream."""

    case: Case
    spent: procstat.Spent
    rss_per_stream_kib: float

    @property
    def us_per_write(self) -> float:
        return 1e6 * self.spent.cpu / (self.case.streams * self.case.rounds)

    @property
    def us_per_event(self) -> float:
        return self.us_per_write / self.case.events


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
        self.message = pb.Event(message=pb.Message(seq=1, sender="alice", text="x" * 40))
        self.message.message.sent_at.GetCurrentTime()
        self.batches: dict[int, bytes] = {}
        self.slots: contextlib.AbstractAsyncContextManager[object] = (
            asyncio.Semaphore(case.in_flight) if case.in_flight else contextlib.nullcontext()
        )
        self.groups: list[list[_Stream]] = [[] for _ in range(case.groups)]
        self.opened = 0
        self.all_open, self.go, self.finish = asyncio.Event(), asyncio.Event(), asyncio.Event()

    def batch(self, due: int) -> bytes:
        """One pre-encoded ChatResponse carrying `due` writes' worth of events."""
        if due not in self.batches:
            events = [self.message] * (self.case.events * due)
            self.batches[due] = pb.ChatResponse(events=events).SerializeToString()
        return self.batches[due]

    async def chat(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        # As the chat server does, every stream reads its requests in a task of its own.
        reading = asyncio.create_task(_drain(requests))
        try:
            await self._write(context)
        finally:
            reading.cancel()

    async def _write(self, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
        stream = _Stream()
        self.groups[self.opened % self.case.groups].append(stream)
        self.opened += 1
        if self.opened == self.case.streams:
            self.all_open.set()
        await self.go.wait()
        written = 0
        while written < self.case.rounds:
            if self.case.interval_ns:
                while not stream.due:
                    stream.waiter = asyncio.get_running_loop().create_future()
                    await stream.waiter
            async with self.slots:
                # As the chat server does, one write carries every event due by the time a slot is free.
                due, stream.due = max(1, stream.due), 0
                written += due
                await context.write(self.batch(due))
        await self.finish.wait()

    async def send(self, group: list[_Stream], phase: float, start_ns: int) -> None:
        """One steady sender of a group: every interval, one more write due on each of the group's streams."""
        case = self.case
        for i in range(case.rounds // case.senders):
            delay = start_ns + int((i + phase) * case.interval_ns) - time.monotonic_ns()
            if delay > 0:
                await asyncio.sleep(delay / 1e9)
            for stream in group:
                stream.tick()


async def _drain(requests: AsyncIterator[bytes]) -> None:
    async for _ in requests:
        pass


async def _serve(conn: Connection, case: Case) -> None:
    """The bare server's process: serve, say Ready once every stream is open, write on Go, stop on End."""
    servicer = _Servicer(case)
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Chat": grpc.stream_stream_rpc_method_handler(servicer.chat, response_serializer=None)}
    )
    # With gRPC's default backlog of calls not yet taken up, some of 1400 or more streams opened together fail.
    server = grpc.aio.server(options=BACKLOG_OPTIONS)
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    conn.send(Ready(port))
    senders: list[asyncio.Task[None]] = []
    try:
        await asyncio.wait_for(servicer.all_open.wait(), TIMEOUT)
        conn.send(Ready())
        await command(conn, TIMEOUT, Go)
        servicer.go.set()
        if case.interval_ns:
            start, everyone = time.monotonic_ns(), case.groups * case.senders
            for g, group in enumerate(servicer.groups):
                for s in range(case.senders):
                    senders.append(asyncio.create_task(servicer.send(group, (g * case.senders + s) / everyone, start)))
        await command(conn, TIMEOUT, End)
    finally:
        servicer.finish.set()
        for task in senders:
            task.cancel()
        # A grace period lets every stream end with OK rather than be cancelled.
        await server.stop(10)


async def _read(conn: Connection, job: tuple[Case, int, int]) -> None:
    """A reader's process: open its share of the streams (every `readers`-th connection from its own), say Ready,
    read each one's writes, say Done, and close on End."""
    case, port, reader = job
    mine = [index for index in range(case.streams) if index // case.per_connection % case.readers == reader]
    connections = range(reader, -(-case.streams // case.per_connection), case.readers)
    opened = processes.channels(f"127.0.0.1:{port}", len(connections), 1)
    gate = asyncio.Semaphore(128)
    talkers = case.groups * case.senders if case.lines else 0
    line = pb.ChatRequest(say=pb.ChatRequest.SendMessage(text="x" * 30))
    responses = 0

    async def open_one(index: int) -> grpc.aio.StreamStreamCall[pb.ChatRequest, pb.ChatResponse]:
        async with gate:
            call = chat_pb2_grpc.ChatServiceStub(opened[index // case.per_connection // case.readers]).Chat()
            await call.wait_for_connection()
            return call

    async def read(call: grpc.aio.StreamStreamCall[pb.ChatRequest, pb.ChatResponse], index: int, start: int) -> None:
        nonlocal responses
        said = 0
        events = 0
        while events < case.rounds * case.events:
            # A talker says its next lines as a chat sender would: paced, else at most WINDOW ahead of what it
            # has read (its room's senders take turns, so each line is `senders` events).
            while index < talkers and said < case.lines:
                if case.interval_ns:
                    due = start + int((said + index / talkers) * case.interval_ns)
                    if due > time.monotonic_ns():
                        break
                elif (said - WINDOW + 1) * case.senders > events:
                    break
                said += 1
                await call.write(line)
            response = await call.read()
            if not isinstance(response, pb.ChatResponse):
                raise RuntimeError(f"a stream ended before its {case.rounds} writes")
            events += len(response.events)
            responses += 1

    try:
        async with asyncio.timeout(TIMEOUT):
            calls = await asyncio.gather(*(open_one(index) for index in mine))
            conn.send(Ready())
            await command(conn, TIMEOUT, Go)
            start = time.monotonic_ns()
            await asyncio.gather(*(read(call, index, start) for index, call in zip(mine, calls, strict=True)))
        conn.send(Done(time.monotonic_ns(), len(mine) * case.rounds * case.events, responses))
        await command(conn, TIMEOUT, End)
    finally:
        for channel in opened:
            await channel.close()


def measure(case: Case) -> Result:
    """Run one case against a fresh bare server process and its reader processes; raise BenchError if one fails."""
    server = processes.spawn("bare server", _serve, case)
    children = [server]
    try:
        port = processes.collect(children, Ready, TIMEOUT)[0].port
        pid = server.process.pid or 0
        rss_start = procstat.rss_kib(pid)
        children += [processes.spawn("bare reader", _read, (case, port, reader)) for reader in range(case.readers)]
        processes.collect(children, Ready, TIMEOUT)
        meter = procstat.Meter([pid])
        for child in children:
            child.conn.send(Go(time.monotonic_ns()))
        processes.collect(children[1:], Done, TIMEOUT)
        spent = meter.stop()
        if case.memory:
            time.sleep(SETTLE_SECONDS)
        rss = (procstat.rss_kib(pid) - rss_start) / case.streams
        for child in children:
            child.conn.send(End())
        return Result(case, spent, rss)
    finally:
        processes.stop(children, patience=10.0)


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bare benchmark's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.bare", description="Server CPU per streamed write of a bare grpc.aio server."
    )
    parser.add_argument("--streams", type=int, default=1000, help="streams, each written every round (default: 1000)")
    parser.add_argument("--rounds", type=int, default=50, help="writes per stream (default: 50)")
    parser.add_argument("--events", type=_numbers, default=[1, 32], help="events per write, a list (default: 1,32)")
    parser.add_argument("--in-flight", type=_numbers, default=[16, 64, 256, 0], help="writes in flight server-wide "
                        "at most, a list; 0 for no cap (default: 16,64,256,0)")  # fmt: skip
    parser.add_argument("--streams-per-connection", type=_numbers, default=[1], help="streams sharing one TCP "
                        "connection, a list (default: 1, a connection per stream as chat users have)")  # fmt: skip
    args = parser.parse_args(argv)
    if min(args.streams, args.rounds, *args.events, *args.streams_per_connection) < 1 or min(args.in_flight) < 0:
        parser.error("--streams, --rounds, --events and --streams-per-connection must be at least 1, --in-flight 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every combination of --streams-per-connection, --events and --in-flight and print a row for each."""
    args = parse_args(argv)
    processes.raise_open_files()
    readers = os.cpu_count() or 1
    print(f"bare grpc.aio server (uvloop), {args.streams} streams x {args.rounds} writes, read by {readers} processes")
    print(f"{'streams/conn':>12} {'events/write':>12} {'in flight':>10} {'µs/write':>9} {'µs/event':>9} {'wall s':>7}")
    for per_connection, events, in_flight in itertools.product(
        args.streams_per_connection, args.events, args.in_flight
    ):
        try:
            result = measure(Case(args.streams, args.rounds, events, in_flight, per_connection, readers=readers))
        except BenchError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(f"{per_connection:>12} {events:>12} {in_flight or 'no cap':>10} {result.us_per_write:>9.1f} "
              f"{result.us_per_event:>9.2f} {result.spent.seconds:>7.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
