"""The CPU resources of a run: how many threads to use right now, and the C allocator.

Threads
-------

Torch's CPU kernels run on an OpenMP team of N threads and every parallel region waits for its
slowest thread. When another process occupies a core, one of the N threads is descheduled for a
whole time slice at every region, so on a busy machine N = all cores runs several times slower
than N = 1 (the network runs thousands of small regions per tile). Shared machines (HPC nodes,
laptops) are the normal case, so the default thread count follows the cores that are free:

    free = usable cores - (busy cores of the whole machine - busy cores of this process)

measured from the CPU times since the previous call (``psutil``), and re-read before every batch
of tiles, so a competitor that starts or stops mid-run is followed. A thread count given by the
user (``--threads``) is used as is.

Even on idle cores a team of N threads waits at every region for its slowest member, so
``soma register`` matches two tiles at once on the CPU, each on half the threads
(:func:`soma_cli.matchers.sharing_cores`): on 2 idle cores a 4096 px scene took 55 s instead
of 70 s (the same tiles), at the memory of a second tile.

Allocator
---------
The network allocates and frees many 4-50 MB tensors per tile; :func:`tune_allocator` lets glibc
keep them for reuse (10 % faster per tile on the 2-core machine), which keeps about 1 GB resident
while tiles are matched; :func:`release_heap` hands that back once matching is done, so the passes
after it (repair, warping, writing, QA) do not stack their memory on top.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
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
    then), and as many for reading the next tiles while the matcher works.  Beside a CPU matcher
    a busy reading thread would deschedule one of torch's OpenMP threads, whose parallel regions
    then all wait (the module doc): there the readers run at the lowest priority
    (:func:`background_priority`), and only where a thread can have a priority of its own (Linux)."""
    n = max(1, min(4, usable_cores() // 4))
    return (n if gpu or _thread_priorities() else 0), n


def _thread_priorities() -> bool:
    return sys.platform.startswith("linux")


def background_priority() -> None:
    """Run the calling thread at the lowest priority (nice 19) where threads have priorities of their
    own (Linux; elsewhere nothing): a thread reading tiles beside a CPU matcher then takes a core
    when torch's threads leave it idle instead of taking turns with them (the 4096 px benchmark
    scene matched 2 % sooner with one such reader than with none, and 3 % later with one at normal
    priority)."""
    if _thread_priorities():
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def _glibc():
    """glibc's ``libc.so.6``, or None where the C library is another."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (glibc has both)
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> bool:
    """Let glibc keep freed memory for reuse instead of handing every large block back to the OS.

    By default glibc serves each block above its mmap threshold (at most 32 MB) with a fresh
    ``mmap`` and unmaps it on ``free``, so every large tensor of the network pays its page faults
    again (a 768 px tile's 16-channel full-resolution maps are 38 MB).  With this setting every
    block comes from the heap (no ``mmap``), and up to 1 GiB of free heap is kept for the next
    tile; :func:`release_heap` hands it back.  Every thread allocates from that one heap (one
    arena): a tile reader's own arena would keep what it freed beside it (the 4096 px benchmark
    scene peaked at 1.26-1.32 GB with one arena, 1.44-1.67 GB without).  Process-wide and
    idempotent, like ``torch.set_num_threads``; a no-op (returns False) where the C library is not
    glibc."""
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and ok
    ok = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1 and ok
    ok = libc.mallopt(_M_TOP_PAD, 64 << 20) == 1 and ok
    return ok


def release_heap() -> bool:
    """Return the free memory glibc keeps (``malloc_trim``) to the OS; False where there is no glibc."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
