"""Wait for a quiet machine before each timed run, and say what load it ran at.

Wall-clock throughput on a shared 2-core machine partly measures the scheduler: a repeat
started while another process computes can be 2x slower. Benchmarks call `wait_for_quiet`
before every repeat and print the load each run started at beside its numbers, so a reader
can tell a quiet measurement from a loaded one (issue 25, item 6).

Quiet is judged from /proc/stat over a few seconds, not from the 1-minute load average:
the average still carries the previous repeat's own process for a minute after it exits,
so waiting on it would mostly wait for ourselves. The load average is still reported.
"""
from __future__ import annotations

import os
import sys
import time


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields), idle


def busy_fraction(sample_s: float = 3.0) -> float:
    """Share of all cores busy over the next `sample_s` seconds (0..1)."""
    total0, idle0 = _cpu_times()
    time.sleep(sample_s)
    total1, idle1 = _cpu_times()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def wait_for_quiet(max_busy: float = 0.1, max_wait_s: float = 600.0) -> dict:
    """Block until at most `max_busy` of the CPUs were busy over a 3 s sample (or `max_wait_s`).

    Returns {"busy": fraction, "load1": 1-min load average} measured just before the run. A
    machine that never quietens is not an error: the run goes ahead and its row says so.
    """
    deadline = time.time() + max_wait_s
    busy = busy_fraction()
    if busy > max_busy:
        print(f"    {busy:.0%} of the CPUs busy (> {max_busy:.0%}): waiting up to {max_wait_s:.0f} s for a quiet machine",
              file=sys.stderr, flush=True)
    while busy > max_busy and time.time() < deadline:
        busy = busy_fraction()
    return {"busy": busy, "load1": os.getloadavg()[0]}


def describe(q: dict) -> str:
    return f"{q['busy']:.0%} busy, load {q['load1']:.2f}"
