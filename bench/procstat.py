"""Readings from /proc: what a set of processes spent over a window, and their memory."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a whole process (every thread) from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces and parentheses: the fields that count come after the last ')'.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"/proc/{pid}/status has no VmRSS")


def _loop_ns(pid: int) -> tuple[int, int]:
    """How long a process's main thread (its event loop) ran, and waited runnable for a CPU, in ns."""
    with open(f"/proc/{pid}/schedstat") as schedstat:
        run, wait, _ = schedstat.read().split()
    return int(run), int(wait)


def _machine_cpu() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, neither idle nor waiting for I/O)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


@dataclass(frozen=True)
class Spent:
    """What a set of processes spent over a window; shares are CPU seconds per wall second (1.0 is one core)."""

    seconds: float
    cpu: float  # summed over the processes
    loop_busy: float  # the busiest event loop's fraction of the window running or waiting for a CPU
    loop_starved: float  # that loop's fraction of the window waiting for a CPU
    machine: float  # every process on the machine, as a share

    @property
    def share(self) -> float:
        return self.cpu / self.seconds


class Meter:
    """Started over a list of PIDs (the server's processes, or the load generator's); `stop` reads the difference."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = self._read()

    def _read(self) -> tuple[int, float, float, list[tuple[int, int]]]:
        cpu = sum(cpu_seconds(pid) for pid in self.pids)
        return time.monotonic_ns(), cpu, _machine_cpu(), [_loop_ns(pid) for pid in self.pids]

    def stop(self) -> Spent:
        """What the processes spent since the meter started."""
        t0, cpu0, machine0, loops0 = self._start
        t1, cpu1, machine1, loops1 = self._read()
        seconds = max(1e-9, (t1 - t0) / 1e9)
        run_wait = [(r1 - r0, w1 - w0) for (r0, w0), (r1, w1) in zip(loops0, loops1, strict=True)]
        run, wait = max(run_wait, key=sum, default=(0, 0))
        busy = min(1.0, (run + wait) / 1e9 / seconds)
        return Spent(seconds, cpu1 - cpu0, busy, wait / 1e9 / seconds, (machine1 - machine0) / seconds)
