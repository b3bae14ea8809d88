"""One run of one shape: a fresh server, worker processes through join / go / done / end, and the figures."""

from __future__ import annotations

import math
import multiprocessing
import os
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import TypeVar

from bench import bare, procstat, worker
from bench.procstat import Sched
from bench.protocol import Check, Done, End, Failed, Final, Go, Join, Opened, Report, Settled, WorkerPlan
from bench.server import ServerError, ServerProcess
from bench.shapes import Kind, Shape, assign, waves
from chat_service.rooms import DEFAULT_WRITE_SLOTS

R = TypeVar("R", Opened, Settled, Done, Final)

IDLE_SETTLE_SECONDS = 1.0
MARGIN_SECONDS = 30.0


class BenchError(Exception):
    """The run could not be completed (a worker failed or timed out); not a verdict on the server."""


# Chat users each have a connection of their own; a gateway or bridge multiplexes its members over a few.
STREAMS_PER_CHANNEL = 1
MULTIPLEXED = 64
# Connections one load-generator process holds at most, so that none of them is the bottleneck of the larger shapes.
CONNECTIONS_PER_WORKER = 1000


@dataclass(frozen=True)
class Options:
    """How the load generator is laid out; `workers` None picks one per CPU, more for many connections."""

    workers: int | None = None
    streams_per_channel: int = STREAMS_PER_CHANNEL
    floor: bool = True  # measure each run's floor: the same writes from a bare grpc.aio server
    open_concurrency: int = 128
    wave_size: int = 256
    max_queue: int | None = None


@dataclass
class RunResult:
    """The figures of one run of one shape (shares are CPU seconds per wall second: 1.0 is one core)."""

    shape: str
    workers: int
    channels: int
    members: int
    expected_deliveries: int
    deliveries: int
    join_seconds: float
    wall_seconds: float  # from Go to the last delivery
    deliveries_per_second: float
    server_cpu_seconds: float
    server_us_per_delivery: float | None
    server_cpu_share: float
    server_loop_busy: float  # fraction of the time the server's event-loop thread ran or waited for a CPU
    server_loop_starved: float  # fraction of the time it was runnable but waited for a CPU
    loadgen_cpu_seconds: float
    loadgen_cpu_share: float  # all workers together
    loadgen_loop_busy: float  # the busiest worker's event-loop thread, as for the server
    machine_cpu_share: float  # every process on the machine
    other_cpu_share: float  # processes other than the server and the workers: noise
    events_per_batch: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    sender_lag_ms: float | None
    rss_start_kib: int
    rss_joined_kib: int
    rss_after_kib: int
    rss_per_member_kib: float | None
    server_exit_code: int | None
    # The same writes (or idle streams) from a bare grpc.aio server, measured right after: what no chat code can beat.
    floor_us_per_delivery: float | None = None
    floor_rss_per_member_kib: float | None = None
    check: Check = field(default_factory=Check)


@dataclass
class _Handle:
    index: int
    process: BaseProcess
    conn: Connection


@dataclass(frozen=True)
class _Limits:
    join: float  # each step of opening and joining
    run: float  # the measured phase
    drain: float  # reading every stream to its end after the server stops


@dataclass(frozen=True)
class _Usage:
    """What the measured phase cost, from Go until every worker reported Done."""

    go_ns: int
    window: float
    server_cpu: float
    server_sched: Sched
    machine_cpu: float


def limits(shape: Shape) -> _Limits:
    """Generous but bounded time limits for a shape (join announcements grow as members squared)."""
    join = 30 + shape.total_members * 0.01 + shape.members**2 * 2e-6
    run = 60 + shape.deliveries * 100e-6 + shape.seconds * 2
    return _Limits(join, run, 30.0)


def workers_for(shape: Shape, options: Options) -> int:
    """Load-generator processes for `shape`: as asked, else one per CPU and at most 1000 connections each."""
    if options.workers is not None:
        return options.workers
    connections = -(-shape.total_members // options.streams_per_channel)
    return max(os.cpu_count() or 2, -(-connections // CONNECTIONS_PER_WORKER))


def run_once(shape: Shape, options: Options) -> RunResult:
    """Run `shape` once against a fresh server, then its floor; raises ServerError or BenchError if it cannot finish."""
    result = _run_chat(shape, options)
    if options.floor:
        try:
            floor = bare.measure(floor_case(shape, result, options))
        except (RuntimeError, TimeoutError) as error:
            raise BenchError(f"the bare floor failed: {error}") from None
        if shape.kind is Kind.IDLE:
            result.floor_rss_per_member_kib = floor.rss_per_stream_kib
        else:
            result.floor_us_per_delivery = floor.us_per_event
    return result


def floor_case(shape: Shape, result: RunResult, options: Options) -> bare.Case:
    """The bare writes that match a run: as many streams on as many connections, writes of as many events."""
    per_connection = options.streams_per_channel
    members = shape.total_members
    if shape.kind is Kind.IDLE:
        return bare.Case(members, 1, 1, DEFAULT_WRITE_SLOTS, per_connection, memory=True)
    if shape.kind is Kind.STEADY:
        interval = int(shape.seconds * 1e9 / shape.messages)
        return bare.Case(
            members, shape.room_messages, 1, DEFAULT_WRITE_SLOTS, per_connection, shape.rooms, shape.senders, interval
        )
    batch = result.events_per_batch or 1.0
    rounds = max(1, round(result.deliveries / batch / members))
    events = max(1, round(result.deliveries / rounds / members))
    return bare.Case(members, rounds, events, DEFAULT_WRITE_SLOTS, per_connection)


def _run_chat(shape: Shape, options: Options) -> RunResult:
    limit = limits(shape)
    server = ServerProcess(options.max_queue)
    handles: list[_Handle] = []
    finished = False
    try:
        rss_start = server.rss_kib()
        _spawn(handles, shape, options, server.address, limit)
        started = time.monotonic()
        readies = _join(handles, shape, options, server, limit)
        join_seconds = time.monotonic() - started
        if shape.kind is Kind.IDLE:
            # Let the last join announcements be written and their buffers freed before reading memory.
            time.sleep(IDLE_SETTLE_SECONDS)
        rss_joined = server.rss_kib()
        usage, dones = _measure(handles, server, limit)
        rss_after = server.rss_kib()
        # A graceful stop ends every stream with RoomClosed; the workers read to the end to catch any extra.
        server.terminate()
        for handle in handles:
            handle.conn.send(End())
        finals = _collect(handles, Final, limit.drain + MARGIN_SECONDS, None)
        exit_code = server.stop()
        finished = True
    finally:
        _stop_workers(handles, patience=10.0 if finished else 0.0)
        server.close()

    wall = max(1e-9, (max(done.finish_ns for done in dones) - usage.go_ns) / 1e9)
    window = usage.window
    deliveries = sum(done.deliveries for done in dones)
    responses = sum(done.responses for done in dones)
    worker_cpu = [done.cpu - ready.cpu for done, ready in zip(dones, readies, strict=True)]
    worker_busy = [_busy(done.sched - ready.sched, window) for done, ready in zip(dones, readies, strict=True)]
    check = Check()
    samples: array[int] = array("q")
    for final in finals:
        check.add(final.check)
        samples.frombytes(final.latencies)
    p50, p99, peak = _percentiles(samples)
    idle_members = shape.total_members if shape.kind is Kind.IDLE else 0
    return RunResult(
        shape=shape.name,
        workers=len(handles),
        channels=sum(ready.channels for ready in readies),
        members=shape.total_members,
        expected_deliveries=shape.deliveries,
        deliveries=deliveries,
        join_seconds=join_seconds,
        wall_seconds=wall,
        deliveries_per_second=deliveries / wall if deliveries else 0.0,
        server_cpu_seconds=usage.server_cpu,
        server_us_per_delivery=usage.server_cpu * 1e6 / deliveries if deliveries else None,
        server_cpu_share=usage.server_cpu / window,
        server_loop_busy=_busy(usage.server_sched, window),
        server_loop_starved=usage.server_sched.wait_ns / 1e9 / window,
        loadgen_cpu_seconds=sum(worker_cpu),
        loadgen_cpu_share=sum(worker_cpu) / window,
        loadgen_loop_busy=max(worker_busy, default=0.0),
        machine_cpu_share=usage.machine_cpu / window,
        other_cpu_share=max(0.0, usage.machine_cpu - usage.server_cpu - sum(worker_cpu)) / window,
        events_per_batch=deliveries / responses if responses else None,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        latency_max_ms=peak,
        sender_lag_ms=max(done.sender_lag_ns for done in dones) / 1e6 if shape.kind is Kind.STEADY else None,
        rss_start_kib=rss_start,
        rss_joined_kib=rss_joined,
        rss_after_kib=rss_after,
        rss_per_member_kib=(rss_joined - rss_start) / idle_members if idle_members else None,
        server_exit_code=exit_code,
        check=check,
    )


def _spawn(handles: list[_Handle], shape: Shape, options: Options, address: str, limit: _Limits) -> None:
    """Start one worker process per non-empty share of the members (spawned: grpc must not cross a fork)."""
    context = multiprocessing.get_context("spawn")
    room_sizes = {f"r{r}": shape.members for r in range(shape.rooms)}
    steady = shape.kind is Kind.STEADY
    interval = int(shape.seconds * 1e9 / shape.messages) if steady and shape.messages else 0
    shares = [members for members in assign(shape, workers_for(shape, options), options.wave_size) if members]
    for index, members in enumerate(shares):
        plan = WorkerPlan(
            index=index,
            address=address,
            members=tuple(members),
            room_sizes=room_sizes,
            wave_size=options.wave_size,
            room_messages=shape.room_messages,
            messages=shape.messages,
            window=shape.window if shape.kind is Kind.BURST else 0,
            interval_ns=interval,
            latency=steady,
            streams_per_channel=options.streams_per_channel,
            open_concurrency=options.open_concurrency,
            join_timeout=limit.join,
            run_timeout=limit.run,
            drain_timeout=limit.drain,
        )
        ours, theirs = context.Pipe()
        process = context.Process(target=worker.main, args=(plan, theirs), name=f"bench-worker-{index}")
        process.daemon = True
        process.start()
        theirs.close()
        handles.append(_Handle(index, process, ours))


def _join(
    handles: list[_Handle], shape: Shape, options: Options, server: ServerProcess, limit: _Limits
) -> list[Settled]:
    """Open every stream, then join wave by wave; returns each worker's report after the last wave."""
    _collect(handles, Opened, limit.join + MARGIN_SECONDS, server)
    settled: list[Settled] = []
    for wave in range(waves(shape, options.wave_size)):
        for handle in handles:
            handle.conn.send(Join(wave))
        settled = _collect(handles, Settled, limit.join + MARGIN_SECONDS, server)
    return settled


def _measure(handles: list[_Handle], server: ServerProcess, limit: _Limits) -> tuple[_Usage, list[Done]]:
    """Start the load and wait until every worker has every message; the server's cost is read around it."""
    cpu, sched, machine = server.cpu_seconds(), server.sched(), procstat.machine_busy_seconds()
    go_ns = time.monotonic_ns()
    for handle in handles:
        handle.conn.send(Go(go_ns))
    dones = _collect(handles, Done, limit.run + MARGIN_SECONDS, server)
    window = (time.monotonic_ns() - go_ns) / 1e9
    usage = _Usage(
        go_ns=go_ns,
        window=window,
        server_cpu=server.cpu_seconds() - cpu,
        server_sched=server.sched() - sched,
        machine_cpu=procstat.machine_busy_seconds() - machine,
    )
    return usage, dones


def _busy(sched: Sched, window: float) -> float:
    """Fraction of `window` a thread was running or ready to run: near 1.0 means it never waited for work."""
    return min(1.0, (sched.run_ns + sched.wait_ns) / 1e9 / window)


def _collect(handles: list[_Handle], kind: type[R], timeout: float, server: ServerProcess | None) -> list[R]:
    """One `kind` report from every worker, in worker order; fails fast on a dead server or worker."""
    deadline = time.monotonic() + timeout
    got: dict[int, R] = {}
    while len(got) < len(handles):
        left = deadline - time.monotonic()
        pending = [handle for handle in handles if handle.index not in got]
        if left <= 0:
            names = ", ".join(str(handle.index) for handle in pending)
            raise BenchError(f"worker(s) {names} sent no {kind.__name__} report within {timeout:.0f} s")
        wait([handle.conn for handle in pending] + [handle.process.sentinel for handle in pending], min(left, 0.5))
        if server is not None:
            server.check_alive()
        for handle in pending:
            if handle.conn.poll():
                try:
                    report: Report = handle.conn.recv()
                except EOFError:
                    handle.process.join(2)
                    raise BenchError(
                        f"worker {handle.index} exited (code {handle.process.exitcode}) without a report"
                    ) from None
                if isinstance(report, Failed):
                    raise BenchError(f"worker {handle.index} failed: {report.reason}")
                if not isinstance(report, kind):
                    raise BenchError(f"worker {handle.index} sent {type(report).__name__}, expected {kind.__name__}")
                got[handle.index] = report
            elif not handle.process.is_alive():
                raise BenchError(f"worker {handle.index} exited (code {handle.process.exitcode}) without a report")
    return [got[handle.index] for handle in handles]


def _stop_workers(handles: list[_Handle], patience: float) -> None:
    bare.stop_processes([handle.process for handle in handles], patience)
    for handle in handles:
        handle.conn.close()


def _percentiles(samples: array[int]) -> tuple[float | None, float | None, float | None]:
    """p50, p99 and max of latency samples in ns, as milliseconds (nearest rank)."""
    if not samples:
        return None, None, None
    ordered = sorted(samples)
    n = len(ordered)

    def rank(q: float) -> float:
        return ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1e6

    return rank(0.50), rank(0.99), ordered[-1] / 1e6


__all__ = ["BenchError", "Options", "RunResult", "ServerError", "run_once"]
