"""Library calls that Ctrl-C stops at once (the ``soma`` commands run theirs through
:func:`run_interruptibly`)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

from .atomic import discard_own_temps

T = TypeVar("T")

#: the name of the thread :func:`run_interruptibly` runs library calls in
WORKER = "soma-work"
#: the name prefix of the library's own threads (reading, matching, warping beside the calling
#: thread); an interrupted call does not wait for them either
HELPER_THREADS = "soma-io"
#: how long an interrupted library call gets to stop at its next progress report
GRACE_S = 1.0


def run_interruptibly(call: Callable[[Callable], T], progress: Callable, outputs: Sequence[Optional[Path]] = ()) -> T:
    """``call(progress)`` in a worker thread while this (main) thread only waits, so that Ctrl-C is
    handled at once: Python runs signal handlers between bytecodes of the main thread, and the
    network's TorchScript forward is one native call of seconds that releases the GIL.

    On Ctrl-C the call is stopped at its next progress report (a KeyboardInterrupt raised there, so
    its own cleanup runs) if that comes within ``GRACE_S``; otherwise it is abandoned inside the
    native call, the temporary files of this process beside ``outputs`` are removed here, and the
    caller exits without waiting for it (:func:`worker_running`). The KeyboardInterrupt is raised
    again either way."""
    stop, done = threading.Event(), threading.Event()
    box: dict = {}

    def report(*args) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        progress(*args)

    def work() -> None:
        try:
            box["result"] = call(report)
        except BaseException as exc:  # handed to the main thread
            box["error"] = exc
        finally:
            done.set()

    # waits on an Event, not Thread.join: Python 3.11 marks a thread whose join() Ctrl-C interrupted
    # as stopped while it still runs
    threading.Thread(target=work, name=WORKER, daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        stop.set()
        if not done.wait(GRACE_S):
            discard_own_temps({Path(p) if Path(p).is_dir() else Path(p).parent for p in outputs if p is not None})
        raise
    if "error" in box:
        raise box["error"]
    return box["result"]


def worker_running() -> bool:
    """Whether a call :func:`run_interruptibly` abandoned, or a thread of the library's that an
    interrupted call left, is still running (the interpreter's shutdown would wait for it or tear
    it down mid-call)."""
    return any(t.name == WORKER or t.name.startswith(HELPER_THREADS) for t in threading.enumerate())
