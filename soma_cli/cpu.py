"""How many CPU threads a run should use right now.

Torch's CPU kernels run on an OpenMP team of N threads and every parallel region waits for its
slowest thread. When another process occupies a core, one of the N threads is descheduled for a
whole time slice at every region, so on a busy machine N = all cores runs several times slower
than N = 1 (the network runs thousands of small regions per tile). Shared machines (HPC nodes,
laptops) are the normal case, so the default thread count follows the cores that are free:

    free = usable cores - (busy cores of the whole machine - busy cores of this process)

measured from the CPU times since the previous call (``psutil``), and re-read before every batch
of tiles, so a competitor that starts or stops mid-run is followed. A thread count given by the
user (``--threads``) is used as is.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Tuple

import psutil

#: First reading: the busy share of the machine over this many seconds.
FIRST_SAMPLE_S = 0.1


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class CpuShare:
    """Threads to use: ``pinned`` when given, else the cores other processes leave free."""

    def __init__(self, pinned: Optional[int] = None):
        self.pinned = int(pinned) if pinned else None
        self.cores = usable_cores()
        self._proc = psutil.Process()
        self._last: Optional[tuple] = None

    def _times(self) -> tuple:
        sys_t = psutil.cpu_times()
        busy = sum(sys_t) - sys_t.idle - getattr(sys_t, "iowait", 0.0)
        own = self._proc.cpu_times()
        return time.monotonic(), busy, own.user + own.system

    def others_busy(self) -> float:
        """Cores kept busy by other processes since the previous call (first call: a short sample)."""
        if self._last is None:
            self._last = self._times()
            time.sleep(FIRST_SAMPLE_S)
        now = self._times()
        wall = max(now[0] - self._last[0], 1e-6)
        busy = (now[1] - self._last[1]) / wall
        own = (now[2] - self._last[2]) / wall
        self._last = now
        return max(0.0, busy - own)

    def threads(self) -> int:
        if self.pinned:
            return self.pinned
        if self.cores == 1:
            return 1
        free = self.cores - self.others_busy()
        return int(min(self.cores, max(1, round(free))))


def io_threads(gpu: bool) -> Tuple[int, int]:
    """Default ``(read, warp)`` threads beside the matcher (``--io-threads``): one per four usable
    cores, from 1 to 4, for warping the next strips while one is written (the matcher is done by
    then), and as many for reading the next tiles while the matcher works, but only beside a GPU
    matcher: beside a CPU matcher a busy reading thread deschedules one of torch's OpenMP threads,
    whose parallel regions then all wait (the module doc)."""
    n = max(1, min(4, usable_cores() // 4))
    return (n if gpu else 0), n
