"""Turning runs into what is printed and written: the table, the bottleneck and noise lines, failures, JSON."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.runner import RunResult, median
from bench.shapes import Kind, Shape

BUSY = 0.9  # an event loop busy (running or waiting for a CPU) this much of the time never waits for work
NOISE = 0.2  # CPUs used by other processes beyond which the figures are suspect


@dataclass
class Outcome:
    """A shape's runs, and any failure that stopped a run."""

    shape: Shape
    runs: list[RunResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> RunResult | None:
        return median(self.runs) if self.runs else None

    @property
    def ok(self) -> bool:
        """Every run finished, every message arrived exactly once and in order, and the server stopped cleanly."""
        return bool(self.runs) and not self.errors and all(run.ok for run in self.runs)


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
    """Which side limited the measured phase, judged by whose event loop never waited for work."""
    server, generator = run.server_loop_busy >= BUSY, run.loadgen_loop_busy >= BUSY
    if kind is Kind.IDLE:
        return "-"
    if server or generator:
        return "both" if server and generator else "server" if server else "load generator"
    return "neither (paced)" if kind is Kind.STEADY else "neither (window)"


def evidence(run: RunResult) -> str:
    """The figures behind the bottleneck verdict, and a warning when other processes competed for the CPUs."""
    text = (
        f"server loop busy {run.server_loop_busy:.0%} (waiting for a CPU {run.server_loop_starved:.0%}), "
        f"busiest load-generator loop {run.loadgen_loop_busy:.0%}; CPUs used: server {run.server_cpu_share:.2f}, "
        f"load generator {run.loadgen_cpu_share:.2f} ({run.workers} workers), others {run.other_cpu_share:.2f}"
    )
    if run.sender_lag_ms is not None:
        text += f"; senders fell behind their schedule by up to {run.sender_lag_ms:.1f} ms"
    if run.other_cpu_share > NOISE:
        text += " -- NOISY: other processes competed for the CPUs"
    return text


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """The results table, one row per shape, then the bottleneck of each busy one."""
    rows: list[tuple[str, ...]] = [
        ("shape", "deliveries", "deliv/s", "srv µs/deliv", "floor µs", "x floor", "ev/batch", "p50 ms", "p99 ms",
         "RSS/member KiB", "floor KiB", "delivery", "bottleneck"),
    ]  # fmt: skip
    notes = []
    for outcome in outcomes:
        run, kind = outcome.median, outcome.shape.kind
        if run is None:
            rows.append((outcome.shape.name, *["-"] * 10, "FAILED", "-"))
            continue
        rows.append(
            (outcome.shape.name, f"{run.deliveries:,}", _num(run.deliveries_per_second, 0),
             _num(run.server_us_per_delivery), _num(run.floor_us_per_delivery), _num(ratio(run)),
             _num(run.events_per_batch, 1), _num(run.latency_p50_ms, 1), _num(run.latency_p99_ms, 1),
             _num(run.rss_per_member_kib, 1), _num(run.floor_rss_per_member_kib, 1),
             "ok" if outcome.ok else "FAILED", bottleneck(run, kind)),
        )  # fmt: skip
        if kind is not Kind.IDLE:
            notes.append(f"  {outcome.shape.name}: {bottleneck(run, kind)} -- {evidence(run)}")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) if i in (0, 11, 12) else cell.rjust(width) for i, (cell, width) in
                  enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]  # fmt: skip
    if notes:
        lines += ["", "Bottleneck (the side whose event loop never waited for work):", *notes]
    return lines


def failures(outcomes: Sequence[Outcome]) -> list[str]:
    """What went wrong, shape by shape, with examples: printed before anything else."""
    lines: list[str] = []
    for outcome in (outcome for outcome in outcomes if not outcome.ok):
        lines.append(f"  {outcome.shape.name}:")
        lines.extend(f"    {error}" for error in outcome.errors)
        for index, run in enumerate(outcome.runs, 1):
            if not run.check.ok:
                lines.append(f"    run {index}: {run.check.summary()}")
                lines.extend(f"      e.g. {example}" for example in run.check.examples[:5])
            if run.server_exit_code != 0:
                code = run.server_exit_code
                lines.append(f"    run {index}: the server did not stop cleanly on SIGTERM (exit code {code})")
    return lines


def as_json(outcome: Outcome) -> dict[str, object]:
    """One shape's entry in results.json."""
    run = outcome.median
    return {
        "description": outcome.shape.describe(),
        "kind": outcome.shape.kind.value,
        "ok": outcome.ok,
        "errors": outcome.errors,
        "bottleneck": bottleneck(run, outcome.shape.kind) if run else None,
        "median": dataclasses.asdict(run) if run else None,
        "runs": [dataclasses.asdict(run) for run in outcome.runs],
    }
