"""`python -m bench`: run the shapes, print the table, write bench/results.json; non-zero only on real failure."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from bench import shapes
from bench.processes import BenchError, raise_open_files
from bench.runner import MULTIPLEXED, Options, RunResult, median, run_once
from bench.server import MEMORY, NATS, STORES, ServerError
from bench.shapes import Kind, Shape

RESULTS = Path(__file__).with_name("results.json")
BUSY = 0.9  # an event loop busy (running or waiting for a CPU) this much of the time never waits for work
NOISE = 0.2  # CPUs used by other processes beyond which the figures are suspect


@dataclass
class Outcome:
    """A shape's runs, and what went wrong in any of them."""

    shape: Shape
    options: Options
    runs: list[RunResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> RunResult | None:
        return median(self.runs) if self.runs else None

    def as_json(self) -> dict[str, object]:
        """This shape's entry in results.json."""
        run = self.median
        return {
            "description": self.shape.describe(),
            "kind": self.shape.kind.value,
            "store": self.options.store,
            "server_workers": self.options.server_workers,
            "ok": not self.errors,
            "errors": self.errors,
            "bottleneck": bottleneck(run, self.shape.kind) if run else None,
            "median": dataclasses.asdict(run) if run else None,
            "runs": [dataclasses.asdict(run) for run in self.runs],
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Fan-out benchmark of chat-server with real gRPC clients."
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, under a minute in all (the CI smoke test)")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="run only this shape or group")
    parser.add_argument("--runs", type=int, default=1, help="runs per shape; figures are their medians (default: 1)")
    parser.add_argument(
        "--multiplexed", action="store_true", help=f"{MULTIPLEXED} members per connection, as a gateway"
    )
    parser.add_argument("--no-floor", action="store_true", help="skip each run's bare grpc.aio floor (about half)")
    parser.add_argument("--max-queue", type=int, help="pass --max-queue to chat-server (default: the server's own)")
    parser.add_argument("--store", action="append", choices=STORES, help="memory (default), or nats on a nats-server "
                        "of each run's own; twice runs each shape on both in turn")  # fmt: skip
    parser.add_argument("--workers", action="append", type=int, metavar="N", help="chat-server --workers with the "
                        "nats store; twice or more runs each (default: 1)")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"where to write the results (default: {RESULTS})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.store = list(dict.fromkeys(args.store or [MEMORY]))
    args.workers = list(dict.fromkeys(args.workers or [1]))
    if any(workers < 1 for workers in args.workers):
        parser.error("--workers must be at least 1")
    if args.workers != [1] and NATS not in args.store:
        parser.error("--workers needs --store nats: in memory, chat-server runs one process")
    return args


def setups(args: argparse.Namespace) -> list[Options]:
    """The servers to measure, in order: memory, then nats with each number of workers."""
    base = Options(MULTIPLEXED if args.multiplexed else 1, not args.no_floor, args.max_queue)
    found = [base] if MEMORY in args.store else []
    if NATS in args.store:
        found += [dataclasses.replace(base, store=NATS, server_workers=workers) for workers in args.workers]
    return found


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception, so every finally block kills its server and workers on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the selected shapes; return 0 when every message arrived exactly once and nothing crashed."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Inherited by the server and every worker: one connection per member takes a descriptor per member on each side.
    raise_open_files()
    try:
        selected = shapes.select(shapes.QUICK if args.quick else shapes.FULL, args.only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    servers = setups(args)
    layout = f"{MULTIPLEXED} members per TCP connection" if args.multiplexed else "one TCP connection per member"
    cpus = os.cpu_count() or 1
    print(
        f"chat-server fan-out benchmark: {len(selected)} shape(s) on {', '.join(o.server for o in servers)}, "
        f"median of {args.runs} run(s), {layout}, {cpus} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.monotonic()
    outcomes = []
    for number, shape in enumerate(selected, 1):
        ours = [Outcome(shape, options) for options in servers]
        # Run by run, each server in turn, so that a busy spell of the machine falls on all of them alike.
        for run in range(1, args.runs + 1):
            for outcome in ours:
                _run(outcome, f"[{number}/{len(selected)}]", run, args.runs, len(servers) > 1)
        outcomes += ours
    elapsed = time.monotonic() - started
    bad = [f"  {outcome.shape.name}: {error}" for outcome in outcomes for error in outcome.errors]
    if bad:
        print("\nDELIVERY OR SERVER FAILURES: messages were lost, duplicated or reordered, or a process failed")
        print("\n".join(bad))
    print("\n" + "\n".join(table(outcomes)))
    verdict = "FAILED (see above)" if bad else "all deliveries exactly once and in order"
    print(f"\n{verdict}; {elapsed:.0f} s in all")
    meta = {
        "quick": args.quick,
        "runs": args.runs,
        "streams_per_channel": servers[0].streams_per_channel,
        "max_queue": args.max_queue,
        "cpus": cpus,
        "server_commit": _commit(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - elapsed)),
        "seconds": round(elapsed, 1),
    }
    shapes_json = {_key(outcome): outcome.as_json() for outcome in outcomes}
    args.output.write_text(json.dumps({"meta": meta, "ok": not bad, "shapes": shapes_json}, indent=2) + "\n")
    print(f"results written to {args.output}")
    return 1 if bad else 0


def _key(outcome: Outcome) -> str:
    """The shape's name in results.json, followed by the server's set-up unless it ran in memory."""
    name, server = outcome.shape.name, outcome.options.server
    return name if outcome.options.store == MEMORY else f"{name} {server}"


def _run(outcome: Outcome, number: str, run: int, runs: int, named: bool) -> None:
    shape = outcome.shape
    on = f" on {outcome.options.server}" if named else ""
    print(f"{number} {shape.name}{on} run {run}/{runs}: {shape.describe()} ...", end="", flush=True)
    began = time.monotonic()
    try:
        result = run_once(shape, outcome.options)
    except (ServerError, BenchError) as error:
        outcome.errors.append(f"run {run}: {type(error).__name__}: {error}")
        print(f" FAILED after {time.monotonic() - began:.1f} s: {error}", flush=True)
        return
    outcome.runs.append(result)
    print(f" {time.monotonic() - began:.1f} s, {result.check.summary()}", flush=True)
    if not result.check.ok:
        outcome.errors.append(f"run {run}: {result.check.summary()}")
        outcome.errors.extend(f"  e.g. {example}" for example in result.check.examples[:5])
    if result.server_exit_code != 0:
        code = result.server_exit_code
        outcome.errors.append(f"run {run}: the server did not stop cleanly on SIGTERM (exit code {code})")


def _commit() -> str | None:
    """The git commit of the server under test, marked -dirty when the working tree differs from it."""
    git = ["git", "describe", "--always", "--dirty", "--exclude", "*"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        found = subprocess.run(git, cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=True)
        return found.stdout.strip() or None
    return None


def ratio(run: RunResult) -> float | None:
    """The chat server's cost over its bare floor: CPU per delivery, or memory per member for idle shapes."""
    for value, floor in (
        (run.server_us_per_delivery, run.floor_us_per_delivery),
        (run.rss_per_member_kib, run.floor_rss_per_member_kib),
    ):
        if value is not None and floor:
            return value / floor
    return None


def bottleneck(run: RunResult, kind: Kind) -> str:
    """Which side limited the measured phase, judged by whose event loop never waited for work, or else whether
    the server's processes (nats-server's too), the load generator and the rest left no CPU idle."""
    server, generator = run.server_loop_busy >= BUSY, run.loadgen_loop_busy >= BUSY
    if kind is Kind.IDLE:
        return "-"
    if server or generator:
        return "both" if server and generator else "server" if server else "load generator"
    used = run.server_cpu_share + run.loadgen_cpu_share + run.other_cpu_share
    if used >= BUSY * (os.cpu_count() or 1):
        return "CPUs (all in use)"
    return "neither (paced)" if kind is Kind.STEADY else "neither (window)"


def evidence(run: RunResult, options: Options) -> str:
    """The figures behind the bottleneck verdict, and a warning when other processes competed for the CPUs."""
    workers = f" ({options.server_workers} workers)" if options.server_workers > 1 else ""
    store = f", of which nats-server {run.store_cpu_share:.2f}" if options.store != MEMORY else ""
    text = (
        f"server loop busy {run.server_loop_busy:.0%} (waiting for a CPU {run.server_loop_starved:.0%}), "
        f"busiest load-generator loop {run.loadgen_loop_busy:.0%}; CPUs used: server {run.server_cpu_share:.2f}"
        f"{workers}{store}, load generator {run.loadgen_cpu_share:.2f} ({run.workers} workers), "
        f"others {run.other_cpu_share:.2f}"
    )
    if run.other_cpu_share > NOISE:
        text += " -- NOISY: other processes competed for the CPUs"
    return text


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


COLUMNS = ("shape", "server", "deliv/s", "msg/s", "srv µs/deliv", "nats µs", "floor µs", "x floor", "ev/batch",
           "p50 ms", "p99 ms", "RSS/member KiB", "floor KiB", "delivery", "bottleneck")  # fmt: skip
TEXT_COLUMNS = {0, 1, len(COLUMNS) - 2, len(COLUMNS) - 1}


def _row(outcome: Outcome) -> tuple[str, ...]:
    run, name = outcome.median, (outcome.shape.name, outcome.options.server)
    if run is None:
        return (*name, *["-"] * (len(COLUMNS) - 4), "FAILED", "-")
    return (*name, _num(run.deliveries_per_second or None, 0), _num(run.messages_per_second or None, 0),
            _num(run.server_us_per_delivery), _num(run.store_us_per_delivery), _num(run.floor_us_per_delivery),
            _num(ratio(run)), _num(run.events_per_batch, 1), _num(run.latency_p50_ms, 1),
            _num(run.latency_p99_ms, 1), _num(run.rss_per_member_kib, 1), _num(run.floor_rss_per_member_kib, 1),
            "FAILED" if outcome.errors else "ok", bottleneck(run, outcome.shape.kind))  # fmt: skip


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """The results table, one row per shape and server, then the evidence for each busy one's bottleneck."""
    rows = [COLUMNS, *map(_row, outcomes)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) if i in TEXT_COLUMNS else cell.rjust(width)
                  for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]  # fmt: skip
    notes = [
        f"  {o.shape.name} {o.options.server}: {bottleneck(o.median, o.shape.kind)} -- {evidence(o.median, o.options)}"
        for o in outcomes
        if o.median is not None and o.shape.kind is not Kind.IDLE
    ]
    if notes:
        lines += ["", "Bottleneck (the side whose event loop never waited for work, or the CPUs):", *notes]
    return lines


if __name__ == "__main__":
    sys.exit(main())
