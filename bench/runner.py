"""One run of one shape: a fresh server, worker processes through join / go / done / end, then its bare floor."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import bare, processes, procstat, worker
from bench.processes import Child
from bench.protocol import Check, Done, End, Final, Go, Join, Ready, WorkerPlan
from bench.server import MEMORY, ServerProcess
from bench.shapes import Kind, Shape, assign
from chat_service.rooms import DEFAULT_WRITE_SLOTS

MARGIN_SECONDS = 30.0
# Chat users each have a connection of their own; a gateway or bridge multiplexes its members over a few.
MULTIPLEXED = 64
# Connections one load-generator process holds at most, so that none of them is the bottleneck of the larger shapes.
CONNECTIONS_PER_WORKER = 1000


@dataclass(frozen=True)
class Options:
    """How the load is laid out, and what the server and the run are told."""

    streams_per_channel: int = 1
    floor: bool = True  # measure each run's floor: the same writes from a bare grpc.aio server
    max_queue: int | None = None
    store: str = MEMORY  # or NATS: chat-server --store nats://… on a nats-server of the run's own
    server_workers: int = 1  # chat-server --workers, with the NATS store

    @property
    def server(self) -> str:
        """The server's set-up in a word or two: memory, nats x1, nats x2."""
        return self.store if self.store == MEMORY else f"{self.store} x{self.server_workers}"

    @property
    def wave_size(self) -> int:
        # A join wave queues one announcement per joiner for every member: keep a wave well under the queue bound.
        return 256 if self.max_queue is None else max(1, min(256, self.max_queue // 4))


@dataclass
class RunResult:
    """The figures of one run of one shape (shares are CPU seconds per wall second: 1.0 is one core)."""

    members: int
    workers: int
    deliveries: int
    deliveries_per_second: float  # from Go to the last delivery
    messages_per_second: float  # lines said and delivered, over the same time
    server_us_per_delivery: float | None  # every process of the server, nats-server included
    store_us_per_delivery: float | None  # nats-server's part of it
    server_cpu_share: float
    store_cpu_share: float
    server_loop_busy: float  # fraction of the time the busiest chat-server event loop ran or waited for a CPU
    server_loop_starved: float  # fraction of the time it was runnable but waited for a CPU
    loadgen_cpu_share: float  # all workers together
    loadgen_loop_busy: float  # the busiest worker's event loop, as for the server
    other_cpu_share: float  # processes other than the server and the workers: noise
    events_per_batch: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    rss_per_member_kib: float | None
    server_exit_code: int | None
    # The same writes (or idle streams) from a bare grpc.aio server, measured right after: what no chat code can beat.
    floor_us_per_delivery: float | None = None
    floor_rss_per_member_kib: float | None = None
    check: Check = field(default_factory=Check)


def median(runs: Sequence[RunResult]) -> RunResult:
    """The median of every float figure over `runs`; delivery checks are added up, so one bad run shows."""
    values: dict[str, Any] = {}  # one value per field, of that field's type
    for item in dataclasses.fields(RunResult):
        column = [getattr(run, item.name) for run in runs]
        if all(isinstance(value, float) for value in column):
            values[item.name] = statistics.median(column)
    check = Check()
    for run in runs:
        check.add(run.check)
    check.members = runs[0].check.members
    code = next((run.server_exit_code for run in runs if run.server_exit_code != 0), 0)
    return dataclasses.replace(runs[0], check=check, server_exit_code=code, **values)


def run_once(shape: Shape, options: Options) -> RunResult:
    """Run `shape` once against a fresh server, then its floor; raises ServerError or BenchError if it cannot finish."""
    result = _run_chat(shape, options)
    if options.floor and options.store == MEMORY:
        if shape.kind is Kind.IDLE:
            result.floor_rss_per_member_kib = bare.measure(floor_case(shape, result, options)).rss_per_stream_kib
        else:
            result.floor_us_per_delivery = bare.measure(floor_case(shape, result, options)).us_per_event
    return result


def floor_case(shape: Shape, result: RunResult, options: Options) -> bare.Case:
    """The bare traffic that matches a run: as many streams and connections, writes of as many events, and lines."""
    members, per_connection, readers = shape.total_members, options.streams_per_channel, result.workers
    if shape.kind is Kind.IDLE:
        return bare.Case(members, 1, 1, DEFAULT_WRITE_SLOTS, per_connection, memory=True, readers=readers)
    case = bare.Case(
        members,
        1,
        1,
        DEFAULT_WRITE_SLOTS,
        per_connection,
        shape.rooms,
        shape.senders,
        lines=shape.messages,
        readers=readers,
    )
    if shape.kind is Kind.STEADY:
        return dataclasses.replace(case, rounds=shape.room_messages, interval_ns=shape.interval_ns)
    batch = result.events_per_batch or 1.0
    rounds = max(1, round(result.deliveries / batch / members))
    return dataclasses.replace(case, rounds=rounds, events=max(1, round(result.deliveries / rounds / members)))


def _workers(shape: Shape, options: Options) -> int:
    """One load-generator process per CPU, and more when they would hold over 1000 connections each."""
    connections = -(-shape.total_members // options.streams_per_channel)
    return max(os.cpu_count() or 2, -(-connections // CONNECTIONS_PER_WORKER))


def _run_chat(shape: Shape, options: Options) -> RunResult:
    # Generous but bounded time limits (join announcements grow as a room's members squared).
    join_timeout = 30 + shape.total_members * 0.01 + shape.members**2 * 2e-6
    run_timeout = 60 + shape.deliveries * 100e-6 + shape.seconds * 2
    server = ServerProcess(options.max_queue, options.store, options.server_workers)
    children: list[Child] = []
    finished = False
    try:
        rss_start = sum(procstat.rss_kib(pid) for pid in server.pids)
        for index, members in enumerate(assign(shape, _workers(shape, options), options.wave_size)):
            plan = WorkerPlan(
                server.address,
                shape,
                tuple(members),
                options.wave_size,
                options.streams_per_channel,
                join_timeout,
                run_timeout,
            )
            children.append(processes.spawn(f"worker {index}", worker.main, plan))
        processes.collect(children, Ready, join_timeout + MARGIN_SECONDS, server.check_alive)
        for wave in range(-(-(shape.members - 1) // options.wave_size)):
            for child in children:
                child.conn.send(Join(wave))
            processes.collect(children, Ready, join_timeout + MARGIN_SECONDS, server.check_alive)
        if shape.kind is Kind.IDLE:
            # Let the last join announcements be written and their buffers freed before reading memory.
            time.sleep(bare.SETTLE_SECONDS)
        rss_joined = sum(procstat.rss_kib(pid) for pid in server.pids)

        on_server, on_store = procstat.Meter(server.chat_pids), procstat.Meter(server.store_pids)
        on_loadgen = procstat.Meter([c.process.pid or 0 for c in children])
        go_ns = time.monotonic_ns()
        for child in children:
            child.conn.send(Go(go_ns))
        dones = processes.collect(children, Done, run_timeout + MARGIN_SECONDS, server.check_alive)
        spent, store, loadgen = on_server.stop(), on_store.stop(), on_loadgen.stop()

        # A graceful stop ends every stream with RoomClosed; the workers read to the end to catch any extra.
        server.terminate()
        for child in children:
            child.conn.send(End())
        finals = processes.collect(children, Final, worker.DRAIN_SECONDS + MARGIN_SECONDS, lambda: None)
        exit_code = server.stop()
        finished = True
    finally:
        processes.stop(children, patience=10.0 if finished else 0.0)
        server.close()

    deliveries = sum(done.deliveries for done in dones)
    responses = sum(done.responses for done in dones)
    wall = max(1e-9, (max(done.finish_ns for done in dones) - go_ns) / 1e9)
    server_cpu = spent.cpu + store.cpu
    check = Check()
    samples: array[int] = array("q")
    for final in finals:
        check.add(final.check)
        samples.frombytes(final.latencies)
    p50, p99, peak = _percentiles(samples)
    return RunResult(
        members=shape.total_members,
        workers=len(children),
        deliveries=deliveries,
        deliveries_per_second=deliveries / wall,
        messages_per_second=shape.rooms * shape.room_messages / wall if deliveries else 0.0,
        server_us_per_delivery=server_cpu * 1e6 / deliveries if deliveries else None,
        store_us_per_delivery=store.cpu * 1e6 / deliveries if deliveries and server.store_pids else None,
        server_cpu_share=server_cpu / spent.seconds,
        store_cpu_share=store.share,
        server_loop_busy=spent.loop_busy,
        server_loop_starved=spent.loop_starved,
        loadgen_cpu_share=loadgen.share,
        loadgen_loop_busy=loadgen.loop_busy,
        other_cpu_share=max(0.0, spent.machine - server_cpu / spent.seconds - loadgen.share),
        events_per_batch=deliveries / responses if responses else None,
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        latency_max_ms=peak,
        rss_per_member_kib=(rss_joined - rss_start) / shape.total_members if shape.kind is Kind.IDLE else None,
        server_exit_code=exit_code,
        check=check,
    )


def _percentiles(samples: array[int]) -> tuple[float | None, float | None, float | None]:
    """p50, p99 and max of latency samples in ns, as milliseconds (nearest rank)."""
    if not samples:
        return None, None, None
    ordered = sorted(samples)
    p50, p99 = (ordered[math.ceil(q * len(ordered)) - 1] / 1e6 for q in (0.5, 0.99))
    return p50, p99, ordered[-1] / 1e6
