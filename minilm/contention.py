"""Was anything else running while we timed, how much memory did we take, and how much is there? Read
from Linux's /proc and getrusage; standard library only, so a benchmark process of any framework can
use it without importing JAX."""

from __future__ import annotations

import os
import resource
import time


def cpu_times():
    """(wall s, CPU s busy on the whole machine, CPU s used by this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system [idle iowait] irq softirq steal
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


def other_cpu_fraction(before, after) -> float | None:
    """Share of the machine's CPU time that other processes used between two cpu_times()."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    wall = after[0] - before[0]
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (wall * os.cpu_count()))


def available_memory_bytes() -> int | None:
    """Memory the kernel could give this process now (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
