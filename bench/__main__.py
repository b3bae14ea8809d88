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
from bench.processes import BenchError, raise_open_files
from bench.report import Outcome
from bench.runner import MULTIPLEXED, Options, run_once
from bench.server import ServerError

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
        help="run only this shape or group (burst, steady, idle, scale); may be repeated",
    )
    parser.add_argument("--runs", type=int, default=1, help="runs per shape; figures are their medians (default: 1)")
    parser.add_argument(
        "--multiplexed",
        action="store_true",
        help=f"{MULTIPLEXED} members per connection, as a gateway or bridge holding many members would connect",
    )
    parser.add_argument("--no-floor", action="store_true", help="skip each run's bare grpc.aio floor (about half)")
    parser.add_argument("--max-queue", type=int, help="pass --max-queue to chat-server (default: the server's own)")
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"where to write the results (default: {RESULTS})")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
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
    try:
        selected = shapes.select(shapes.QUICK if args.quick else shapes.FULL, args.only)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    options = Options(MULTIPLEXED if args.multiplexed else 1, not args.no_floor, args.max_queue)
    layout = f"{MULTIPLEXED} members per TCP connection" if args.multiplexed else "one TCP connection per member"
    cpus = os.cpu_count() or 1
    print(
        f"chat-server fan-out benchmark: {len(selected)} shape(s), median of {args.runs} run(s), {layout}, "
        f"{cpus} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    started = time.monotonic()
    outcomes = [_run(number, shape, options, args.runs, len(selected)) for number, shape in enumerate(selected, 1)]
    elapsed = time.monotonic() - started
    bad = report.failures(outcomes)
    if bad:
        print("\nDELIVERY OR SERVER FAILURES: messages were lost, duplicated or reordered, or a process failed")
        print("\n".join(bad))
    print("\n" + "\n".join(report.table(outcomes)))
    verdict = "FAILED (see above)" if bad else "all deliveries exactly once and in order"
    print(f"\n{verdict}; {elapsed:.0f} s in all")
    meta = {
        "quick": args.quick,
        "runs": args.runs,
        "streams_per_channel": options.streams_per_channel,
        "max_queue": args.max_queue,
        "cpus": cpus,
        "server_commit": _commit(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - elapsed)),
        "seconds": round(elapsed, 1),
    }
    ok = all(outcome.ok for outcome in outcomes)
    shapes_json = {outcome.shape.name: report.as_json(outcome) for outcome in outcomes}
    args.output.write_text(json.dumps({"meta": meta, "ok": ok, "shapes": shapes_json}, indent=2) + "\n")
    print(f"results written to {args.output}")
    return 0 if ok else 1


def _run(number: int, shape: shapes.Shape, options: Options, runs: int, of: int) -> Outcome:
    outcome = Outcome(shape)
    for run in range(1, runs + 1):
        print(f"[{number}/{of}] {shape.name} run {run}/{runs}: {shape.describe()} ...", end="", flush=True)
        began = time.monotonic()
        try:
            result = run_once(shape, options)
        except (ServerError, BenchError) as error:
            outcome.errors.append(f"run {run}: {type(error).__name__}: {error}")
            print(f" FAILED after {time.monotonic() - began:.1f} s: {error}", flush=True)
            continue
        outcome.runs.append(result)
        print(f" {time.monotonic() - began:.1f} s, {result.check.summary()}", flush=True)
    return outcome


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


if __name__ == "__main__":
    sys.exit(main())
