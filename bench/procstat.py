"""Readings from /proc: a process's CPU time and memory, a thread's run and run-queue time, the machine's CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    """utime + stime of a whole process (every thread) from /proc/PID/stat, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces and parentheses: the fields that count come after the last ')'.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size (VmRSS) of a process, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise OSError(f"/proc/{pid}/status has no VmRSS")


@dataclass(frozen=True)
class Sched:
    """How long one thread ran on a CPU and how long it was runnable but waited for one, in ns."""

    run_ns: int
    wait_ns: int

    def __sub__(self, other: Sched) -> Sched:
        return Sched(self.run_ns - other.run_ns, self.wait_ns - other.wait_ns)


def sched(pid: int | str = "self") -> Sched:
    """The scheduler statistics of a process's main thread (the one running its event loop)."""
    with open(f"/proc/{pid}/schedstat") as schedstat:
        run, wait, _ = schedstat.read().split()
    return Sched(int(run), int(wait))


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all CPUs, neither idle nor waiting for I/O)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / CLOCK_TICKS
