"""`python -m bench`: run the shapes, print the table, write bench/results.json; non-zero only on real failure."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

from bench import report, shapes
from bench.bare import raise_open_files
from bench.report import Outcome
from bench.runner import MULTIPLEXED, STREAMS_PER_CHANNEL, BenchError, Options, ServerError, run_once

RESULTS = Path(__file__).with_name("results.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Fan-out benchmark of chat-server with real gRPC clients."
    )
    parser.add_argument("--quick", action="store_true", help="small shapes, under a minute in all (the CI smoke test)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NAME",
        help="run only this shape or group (burst, steady, idle, scale); may be repeated; --list shows the names",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per shape; figures are their medians (default: 1)")
    parser.add_argument(
        "--workers",
        type=int,
        help="load-generator processes, each with its own event loop and connections "
        "(default: one per CPU, and one per 1000 connections beyond that)",
    )
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--streams-per-channel",
        type=int,
        default=STREAMS_PER_CHANNEL,
        help=f"members sharing one TCP connection (default: {STREAMS_PER_CHANNEL}, each on its own, as chat users are)",
    )
    layout.add_argument(
        "--multiplexed",
        dest="streams_per_channel",
        action="store_const",
        const=MULTIPLEXED,
        help=f"{MULTIPLEXED} members per connection, as a gateway or bridge holding many members would connect",
    )
    parser.add_argument(
        "--no-floor", action="store_true", help="skip measuring each run's bare grpc.aio floor (about halves the time)"
    )
    parser.add_argument("--max-queue", type=int, help="pass --max-queue to chat-server (default: the server's own)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"where to write the results (default: {RESULTS})")
    parser.add_argument("--list", action="store_true", help="list the shapes and exit")
    args = parser.parse_args(argv)
    if args.runs < 1 or (args.workers is not None and args.workers < 1) or args.streams_per_channel < 1:
        parser.error("--runs, --workers and --streams-per-channel must be at least 1")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception, so every finally block kills its server and workers on the way out.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the selected shapes; return 0 when every message arrived exactly once and nothing crashed."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # Inherited by the server and every worker: one connection per member takes a descriptor per member on each side.
    raise_open_files()
    catalogue = shapes.QUICK if args.quick else shapes.FULL
    if args.list:
        for shape in catalogue:
            print(f"{shape.name:<18} {shape.group:<7} {shape.describe()}")
        return 0
    try:
        selected = shapes.select(catalogue, args.only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # A join wave queues one announcement per joiner for every member: keep a wave well under the queue bound.
    wave_size = 256 if args.max_queue is None else max(1, min(256, args.max_queue // 4))
    options = Options(
        workers=args.workers,
        streams_per_channel=args.streams_per_channel,
        wave_size=wave_size,
        max_queue=args.max_queue,
        floor=not args.no_floor,
    )
    cpus = os.cpu_count() or 1
    mode = "quick" if args.quick else "full"
    print(
        f"chat-server fan-out benchmark ({mode}): {len(selected)} shape(s), median of {args.runs} run(s), "
        f"{_layout(options.streams_per_channel)}, {cpus} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.monotonic()
    try:
        outcomes = _run_all(selected, options, args.runs)
    except (KeyboardInterrupt, SystemExit):
        print("\ninterrupted: the server and the workers of the current run were stopped", file=sys.stderr)
        raise
    elapsed = time.monotonic() - started
    _print(outcomes, cpus, elapsed)
    meta = {
        "mode": mode,
        "runs": args.runs,
        "workers": options.workers or "auto",
        "streams_per_channel": options.streams_per_channel,
        "max_queue": options.max_queue,
        "cpus": cpus,
        "server_commit": _commit(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - elapsed)),
        "seconds": round(elapsed, 1),
    }
    _write(args.output, meta, outcomes)
    return 0 if all(outcome.ok for outcome in outcomes) else 1


def _run_all(selected: list[shapes.Shape], options: Options, runs: int) -> list[Outcome]:
    outcomes: list[Outcome] = []
    measured: dict[tuple[object, ...], Outcome] = {}
    for number, shape in enumerate(selected, 1):
        earlier = measured.get(shape.key)
        if earlier is not None:
            # The scale series repeats shapes measured above; one measurement serves both names.
            outcomes.append(Outcome(shape, earlier.median, earlier.runs, earlier.errors, same_as=earlier.shape.name))
            print(f"[{number}/{len(selected)}] {shape.name}: same as {earlier.shape.name}", flush=True)
            continue
        outcome = Outcome(shape)
        for run in range(1, runs + 1):
            print(
                f"[{number}/{len(selected)}] {shape.name} run {run}/{runs}: {shape.describe()} ...", end="", flush=True
            )
            began = time.monotonic()
            try:
                result = run_once(shape, options)
            except (ServerError, BenchError) as error:
                outcome.errors.append(f"run {run}: {type(error).__name__}: {error}")
                print(f" FAILED after {time.monotonic() - began:.1f} s: {error}", flush=True)
                continue
            outcome.runs.append(result)
            status = "ok" if result.check.ok else result.check.summary()
            print(f" {time.monotonic() - began:.1f} s, {status}", flush=True)
        if outcome.runs:
            outcome.median = report.median(outcome.runs)
        measured[shape.key] = outcome
        outcomes.append(outcome)
    return outcomes


def _print(outcomes: list[Outcome], cpus: int, elapsed: float) -> None:
    bad = report.failures(outcomes)
    print()
    if bad:
        print("!" * 100)
        print("DELIVERY OR SERVER FAILURES: messages were lost, duplicated or reordered, or a process failed")
        print("\n".join(bad))
        print("!" * 100)
        print()
    print("\n".join(report.table(outcomes)))
    print()
    notes = report.warnings(outcomes)
    if notes:
        print("Warnings:")
        print("\n".join(notes))
        print()
    evidence = [
        f"  {o.shape.name}: {report.bottleneck(o.median, o.shape.kind)} -- {report.explain(o.median, cpus)}"
        for o in outcomes
        if o.median is not None and o.same_as is None and o.shape.kind is not shapes.Kind.IDLE
    ]
    if evidence:
        print("Bottleneck (the side whose event loop never waited for work):")
        print("\n".join(evidence))
    against = report.goals(outcomes)
    if against:
        print("\nAgainst the goals (informational):")
        print("\n".join(against))
    verdict = "all deliveries exactly once and in order" if not bad else "FAILED (see above)"
    print(f"\n{verdict}; {elapsed:.0f} s in all")


def _layout(per_connection: int) -> str:
    if per_connection == 1:
        return "one TCP connection per member"
    return f"{per_connection} members per TCP connection (multiplexed)"


def _commit() -> str | None:
    """The git commit of the server under test, marked -dirty when the working tree differs from it."""
    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--exclude", "*"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def _write(path: Path, meta: dict[str, object], outcomes: list[Outcome]) -> None:
    document = {
        "meta": meta,
        "ok": all(outcome.ok for outcome in outcomes),
        "shapes": {outcome.shape.name: report.as_json(outcome) for outcome in outcomes},
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {path}")


if __name__ == "__main__":
    sys.exit(main())
