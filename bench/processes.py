"""Child processes of the benchmark (load-generator workers, the bare server and its reader) and their pipes."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import resource
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import grpc
import uvloop

from bench.protocol import Command, Failed

R = TypeVar("R")
Main = Callable[[Connection, Any], Coroutine[Any, Any, None]]

# A private subchannel pool per channel gives each channel its own TCP connection; without it grpc would
# multiplex every channel to the same address over one connection.
CHANNEL_OPTIONS: list[tuple[str, int]] = [("grpc.use_local_subchannel_pool", 1)]


class BenchError(Exception):
    """The run could not be completed (a child failed or timed out); not a verdict on the server."""


def raise_open_files() -> None:
    """Lift this process's soft limit on open files to its hard limit: one connection per member needs thousands."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def channels(address: str, streams: int, per_channel: int) -> list[grpc.aio.Channel]:
    """Enough channels for `streams` streams, `per_channel` on each TCP connection."""
    return [grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) for _ in range(-(-streams // per_channel))]


async def command(conn: Connection, within: float, *kinds: type[Command]) -> Command:
    """The coordinator's next command, which must be one of `kinds`."""
    names = " or ".join(kind.__name__ for kind in kinds)
    # Polled in a thread with a bound, so the event loop goes on and no thread outlives the wait.
    if not await asyncio.to_thread(conn.poll, within):
        raise RuntimeError(f"no {names} from the coordinator within {within:.0f} s")
    got = conn.recv()
    if not isinstance(got, kinds):
        raise RuntimeError(f"expected {names} from the coordinator, got {got!r}")
    return got


def _child(main: Main, conn: Connection, arg: object) -> None:
    """A child's entry point: its own uvloop loop; any failure is reported on the pipe before the process ends."""
    try:
        raise_open_files()
        uvloop.run(main(conn, arg))
    except BaseException as error:
        expected = isinstance(error, RuntimeError | BenchError)
        reason = "".join(traceback.format_exception_only(error)).strip() if expected else traceback.format_exc()
        with contextlib.suppress(OSError):
            conn.send(Failed(reason))
        raise SystemExit(1) from None
    finally:
        conn.close()


@dataclass
class Child:
    """A spawned child process and the coordinator's end of its pipe."""

    name: str
    process: BaseProcess
    conn: Connection


def spawn(name: str, main: Main, arg: object) -> Child:
    """Start `main(conn, arg)` in a fresh process (spawned: grpc must not cross a fork)."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_child, args=(main, theirs, arg), name=name, daemon=True)
    process.start()
    theirs.close()
    return Child(name, process, ours)


def collect(
    children: Sequence[Child], kind: type[R], timeout: float, check: Callable[[], None] | None = None
) -> list[R]:
    """One `kind` report from every child, in order; `check` raises when a process they depend on has died."""
    deadline = time.monotonic() + timeout
    got: dict[int, R] = {}
    while len(got) < len(children):
        pending = [i for i in range(len(children)) if i not in got]
        left = deadline - time.monotonic()
        if left <= 0:
            names = ", ".join(children[i].name for i in pending)
            raise BenchError(f"{names} sent no {kind.__name__} report within {timeout:.0f} s")
        wait([children[i].conn for i in pending] + [children[i].process.sentinel for i in pending], min(left, 0.5))
        if check is not None:
            check()
        for i in pending:
            child = children[i]
            if child.conn.poll():
                try:
                    report = child.conn.recv()
                except EOFError:
                    child.process.join(2)
                    raise BenchError(f"{child.name} exited (code {child.process.exitcode}) without a report") from None
                if isinstance(report, Failed):
                    raise BenchError(f"{child.name} failed: {report.reason}")
                if not isinstance(report, kind):
                    raise BenchError(f"{child.name} sent {report!r}, expected {kind.__name__}")
                got[i] = report
            elif not child.process.is_alive():
                raise BenchError(f"{child.name} exited (code {child.process.exitcode}) without a report")
    return [got[i] for i in range(len(children))]


def stop(children: Sequence[Child], patience: float) -> None:
    """Give children `patience` seconds to exit on their own, then terminate and finally kill the stragglers."""
    deadline = time.monotonic() + patience
    for child in children:
        child.process.join(max(0.0, deadline - time.monotonic()))
    for child in children:
        if child.process.is_alive():
            child.process.terminate()
            child.process.join(2)
        if child.process.is_alive():
            child.process.kill()
            child.process.join(2)
        child.conn.close()
