"""The benchmark's smoke run, so that CI runs `make bench`'s code once: no thresholds, only exactly-once delivery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_delivers_every_message_exactly_once_in_order(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(results)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(results.read_text())
    assert report["ok"]
    shapes = report["shapes"]
    assert {"burst", "steady", "idle"} <= {shape["kind"] for shape in shapes.values()}
    assert all(shape["ok"] and not shape["errors"] for shape in shapes.values())
    assert "exactly once and in order" in run.stdout
