"""The benchmark's smoke runs, so that CI runs `make bench`'s code once (no thresholds), and the pieces they rest on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import bare

ROOT = Path(__file__).resolve().parent.parent


# A benchmark run takes 10-20 s; on a machine busy with other test processes one took over a minute. `_module` bounds
# each at 3 minutes, and reports what it printed.
@pytest.mark.timeout(200)
def test_quick_benchmark_delivers_every_message_exactly_once_in_order(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    # One shape of each kind: a burst, steady load and idle members, each beside its floor.
    only = ["--only", "burst-1x200", "--only", "steady", "--only", "idle"]
    run = _module("bench", "--quick", *only, "--output", str(results))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(results.read_text())
    assert report["ok"]
    assert report["meta"]["streams_per_channel"] == 1
    shapes = report["shapes"]
    assert {"burst", "steady", "idle"} == {shape["kind"] for shape in shapes.values()}
    assert all(shape["ok"] and not shape["errors"] for shape in shapes.values())
    assert "exactly once and in order" in run.stdout
    # Every figure comes with its floor: the same writes, or as many idle streams, from a bare grpc.aio server.
    for shape in shapes.values():
        median = shape["median"]
        floor = median["floor_rss_per_member_kib" if shape["kind"] == "idle" else "floor_us_per_delivery"]
        assert floor is not None and floor > 0, shape


@pytest.mark.timeout(200)
def test_quick_benchmark_on_nats_with_two_workers_delivers_every_message_exactly_once(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    # The smallest shape: a nats-server of the run's own, a supervisor and two workers sharing the port.
    args = ["--quick", "--only", "members-1x50", "--store", "nats", "--workers", "2", "--no-floor"]
    run = _module("bench", *args, "--output", str(results))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(results.read_text())
    shape = report["shapes"]["members-1x50 nats x2"]
    assert shape["ok"] and not shape["errors"], shape
    assert (shape["store"], shape["server_workers"]) == ("nats", 2)
    median = shape["median"]
    assert median["check"]["members"] == 50 and median["deliveries"] == 50 * 50
    # nats-server's CPU is measured as part of the server's (a short run may round it to nothing).
    assert median["store_us_per_delivery"] is not None
    assert median["messages_per_second"] > 0
    assert "members-1x50  nats x2" in run.stdout


def test_bench_refuses_workers_without_the_nats_store() -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench_main.parse_args(["--workers", "2"])
    assert exit_info.value.code == 2


def test_members_the_server_drops_as_too_slow_are_counted_from_their_streams_status(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    # A queue of 2 events cannot hold a burst's fan-out: the server drops members and ends their streams.
    run = _module(
        "bench", "--quick", "--only", "burst-1x200", "--max-queue", "2", "--no-floor", "--output", str(results)
    )
    assert run.returncode == 1, run.stdout + run.stderr
    check = json.loads(results.read_text())["shapes"]["burst-1x200"]["median"]["check"]
    assert check["dropped"] > 0
    assert "members dropped as too slow" in run.stdout


def test_bare_benchmark_prints_a_row_per_case() -> None:
    run = _module("bench.bare", "--streams", "64", "--rounds", "40", "--events", "3", "--in-flight", "4,0")
    assert run.returncode == 0, run.stdout + run.stderr
    rows = [line.split() for line in run.stdout.splitlines()[2:]]
    assert [(row[0], row[1], " ".join(row[2:-3])) for row in rows] == [("1", "3", "4"), ("1", "3", "no cap")]
    for row in rows:
        per_write, per_event = float(row[-3]), float(row[-2])
        assert per_write > 0
        assert per_event == pytest.approx(per_write / 3, rel=0.01)


def test_bare_benchmark_serves_thousands_of_streams_opened_together() -> None:
    run = _module("bench.bare", "--streams", "2000", "--rounds", "1", "--events", "1", "--in-flight", "0")
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(run.stdout.splitlines()) == 3


def test_bare_benchmark_refuses_zero_events() -> None:
    with pytest.raises(SystemExit) as exit_info:
        bare.parse_args(["--events", "1,0"])
    assert exit_info.value.code == 2


def _module(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `python -m name args` from the project root, bounded at 3 minutes."""
    return subprocess.run(
        [sys.executable, "-m", name, *args], cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
