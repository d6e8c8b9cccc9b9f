"""How many CPU threads torch uses: the one rule for `tempspec generate`, `tempspec sweep`, `tempspec-train` and the
benchmarks.

torch's default is one thread per core. When another process keeps a core busy, those threads wait on each other at
every parallel region and a forward pass can run 20x slower than on one thread. So the default counts the cores this
process may run on, minus the ones other processes keep busy right now, with at least one thread. "Busy right now" is
the number of runnable tasks other than this one in /proc/loadavg, the smallest of a few readings 10 ms apart (a
process that keeps a core busy is in every reading, a passing one is not; the load averages lag by a minute and would
count this project's own previous run).
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def busy_cores(loadavg_path: str = "/proc/loadavg", readings: int = 5) -> int:
    """Cores kept busy by other processes (see the module docstring); 0 where the OS does not say."""
    counts = []
    try:
        for i in range(readings):
            if i:
                time.sleep(0.01)
            with open(loadavg_path) as f:
                counts.append(int(f.read().split()[3].split("/")[0]) - 1)  # this process runs while it reads
    except (OSError, IndexError, ValueError):
        return 0
    return max(min(counts), 0)


def default_threads() -> int:
    return max(1, usable_cores() - busy_cores())


def set_threads(requested: Optional[int]) -> int:
    """Sets torch's intra-op threads: `requested` when > 0, else OMP_NUM_THREADS when set, else default_threads().
    Returns the number set; ValueError for a negative request."""
    if requested is not None and requested < 0:
        raise ValueError(f"--threads must be >= 0 (0: pick the free cores), got {requested}")
    if not requested and os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        requested = int(os.environ["OMP_NUM_THREADS"])
    n = requested if requested else default_threads()
    torch.set_num_threads(n)
    return n
