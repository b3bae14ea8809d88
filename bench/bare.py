"""`python -m bench.bare`: what grpc.aio alone costs a server per streamed write, with no chat code at all.

The chat server writes at least once per member per batch, so no figure of `make bench` can go below what one bare
write costs; this measures that cost, by events per write and by how many writes are in flight at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import queue
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event as ProcessEvent
from typing import Any, TypeVar

import grpc

from bench import procstat
from bench.runner import STREAMS_PER_CHANNEL, stop_processes
from bench.worker import CHANNEL_OPTIONS
from chat.v1 import chat_pb2 as pb
from chat.v1 import chat_pb2_grpc
from chat_service.server import BACKLOG_OPTIONS

TIMEOUT = 120.0
T = TypeVar("T")
SERVICE = pb.DESCRIPTOR.services_by_name["ChatService"].full_name


@dataclass(frozen=True)
class Case:
    """One measurement: `streams` streams each written `rounds` times, `events` message events per write."""

    streams: int
    rounds: int
    events: int
    in_flight: int  # writes in flight server-wide at most; 0 for no cap
    loop: str

    @property
    def writes(self) -> int:
        return self.streams * self.rounds


@dataclass(frozen=True)
class Result:
    """The server's CPU and the wall time from the first write to the last read."""

    case: Case
    cpu_seconds: float
    wall_seconds: float

    @property
    def us_per_write(self) -> float:
        return 1e6 * self.cpu_seconds / self.case.writes

    @property
    def us_per_event(self) -> float:
        return self.us_per_write / self.case.events


def _run(loop: str, main: Coroutine[Any, Any, None]) -> None:
    if loop == "uvloop":
        import uvloop  # noqa: PLC0415

        uvloop.run(main)
    else:
        asyncio.run(main)


def _serve(case: Case, ports: Queue[int], read_all: ProcessEvent, results: Queue[Result]) -> None:
    _run(case.loop, _serve_async(case, ports, read_all, results))


async def _serve_async(case: Case, ports: Queue[int], read_all: ProcessEvent, results: Queue[Result]) -> None:
    message = pb.Event(message=pb.Message(seq=1, sender="alice", text="x" * 40))
    message.message.sent_at.GetCurrentTime()
    payload = pb.ChatResponse(events=[message] * case.events).SerializeToString()
    slots: contextlib.AbstractAsyncContextManager[object] = (
        asyncio.Semaphore(case.in_flight) if case.in_flight else contextlib.nullcontext()
    )
    opened = 0
    all_open = asyncio.Event()
    go = asyncio.Event()

    async def chat(requests: object, context: grpc.aio.ServicerContext[object, bytes]) -> None:
        nonlocal opened
        opened += 1
        if opened == case.streams:
            all_open.set()
        await go.wait()
        for _ in range(case.rounds):
            async with slots:
                await context.write(payload)

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Chat": grpc.stream_stream_rpc_method_handler(chat, response_serializer=None)}
    )
    # With gRPC's default backlog of calls not yet taken up, some of 1400 or more streams opened together fail.
    server = grpc.aio.server(options=BACKLOG_OPTIONS)
    server.add_generic_rpc_handlers([handler])
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    try:
        await asyncio.wait_for(all_open.wait(), TIMEOUT)
        cpu, start = procstat.cpu_seconds(), time.monotonic()
        go.set()
        if not await asyncio.to_thread(read_all.wait, TIMEOUT):
            raise TimeoutError("the reader did not read every write in time")
        results.put(Result(case, procstat.cpu_seconds() - cpu, time.monotonic() - start))
    finally:
        await server.stop(None)


def _read(case: Case, port: int, read_all: ProcessEvent) -> None:
    _run("asyncio", _read_async(case, port, read_all))


async def _read_async(case: Case, port: int, read_all: ProcessEvent) -> None:
    count = -(-case.streams // STREAMS_PER_CHANNEL)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) for _ in range(count)]

    async def one(index: int) -> None:
        call = chat_pb2_grpc.ChatServiceStub(channels[index // STREAMS_PER_CHANNEL]).Chat()
        received = 0
        async for _ in call:
            received += 1
        if received != case.rounds:
            raise RuntimeError(f"stream {index} read {received} writes, not {case.rounds}")

    try:
        await asyncio.wait_for(asyncio.gather(*(one(index) for index in range(case.streams))), TIMEOUT)
    finally:
        for channel in channels:
            await channel.close()
    read_all.set()


def measure(case: Case) -> Result:
    """Run one case against a fresh server process and a reader process; raise if either fails or stalls."""
    context = multiprocessing.get_context("spawn")
    ports: Queue[int] = context.Queue()
    results: Queue[Result] = context.Queue()
    read_all = context.Event()
    processes: list[BaseProcess] = []
    try:
        server = context.Process(target=_serve, args=(case, ports, read_all, results), daemon=True)
        server.start()
        processes.append(server)
        port = _get(ports, processes)
        reader = context.Process(target=_read, args=(case, port, read_all), daemon=True)
        reader.start()
        processes.append(reader)
        return _get(results, processes)
    finally:
        stop_processes(processes, patience=10.0)


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
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="the server's event loop (default: uvloop)"
    )
    args = parser.parse_args(argv)
    if args.streams < 1 or args.rounds < 1 or 0 in args.events:
        parser.error("--streams, --rounds and every --events value must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Measure every combination of --events and --in-flight and print a row for each."""
    args = parse_args(argv)
    print(f"bare grpc.aio server ({args.loop}), {args.streams} streams x {args.rounds} writes, read by another process")
    print(f"{'events/write':>12} {'in flight':>10} {'µs/write':>9} {'µs/event':>9} {'wall s':>7}")
    for events in args.events:
        for in_flight in args.in_flight:
            result = measure(Case(args.streams, args.rounds, events, in_flight, args.loop))
            cap = str(in_flight) if in_flight else "no cap"
            print(
                f"{events:>12} {cap:>10} {result.us_per_write:>9.1f} {result.us_per_event:>9.2f} "
                f"{result.wall_seconds:>7.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
