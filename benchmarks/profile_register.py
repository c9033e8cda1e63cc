"""Where the time of one `soma register` goes: a per-stage breakdown from cProfile.

    python benchmarks/profile_register.py SAR OPT [--method soma] [--threads 1] [--device cpu] [--qa]

Runs the library's register() once under cProfile (the CLI runs it in a worker thread, which
cProfile does not follow) and prints the cumulative seconds of each stage's entry point. Stages
nest only where stated, so the rows add up to about the total.  Reading and warping run in the
calling thread here (``--io-threads 0``: cProfile sees one thread only), and the network takes
one tile at a time on all its threads, not two tiles at once as ``soma register`` does on the
CPU, so the rows are the work of each stage, not its share of a run that overlaps them; the QA overview's images are read in a
thread of their own during the repair, which cProfile does not see.  On CUDA the peak device memory that
torch allocated is printed too.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from soma_cli.matchers import get_matcher
from soma_cli.pipeline import RegisterOptions, register


class OneAtATime:
    """The matcher, called from one thread one tile at a time (cProfile sees that thread only)."""

    def __init__(self, matcher):
        object.__setattr__(self, "matcher", matcher)

    def __getattr__(self, name):
        return getattr(self.matcher, name)

    def __setattr__(self, name, value):  # the scene's rotation, set for the run, reaches the matcher
        setattr(self.matcher, name, value)

    def concurrency(self) -> int:
        return 1

#: stage -> (module file suffix, function name) of its entry points
STAGES = {
    "read and align tiles (VRT/warp onto the reference grid)": [("io/pair.py", "read_tile")],
    "preprocess": [("preprocess.py", "prepare")],
    "scene rotation (seed tiles)": [("matchers/soma.py", "seed_rotations")],
    "match (matcher.match)": [("matchers/soma.py", "match"), ("matchers/gradient.py", "match")],
    "stitch": [("stitch.py", "add"), ("stitch.py", "flush"), ("stitch.py", "finish")],
    "scratch write/read-back": [("io/sinks.py", "write"), ("io/sinks.py", "read")],
    "repair": [("stitch.py", "repair")],
    "final warp (reads the moving image)": [("warp.py", "__call__")],
    "QA": [("register_qa.py", "write_qa")],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sar", type=Path)
    ap.add_argument("opt", type=Path)
    ap.add_argument("--method", default="soma")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--qa", action="store_true")
    ap.add_argument("--tile-size", type=int, default=None, help="default: the one soma register picks")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        opts = RegisterOptions(sar=a.sar, opt=a.opt, out=t / "a.tif", flow_out=t / "f.tif", method=a.method,
                               threads=a.threads, device=a.device, io_threads=0, tile_size=a.tile_size,
                               qa_out=t / "qa" if a.qa else None)
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        matcher = OneAtATime(get_matcher(a.method, device=a.device, threads=a.threads))
        prof.runcall(register, opts, None, matcher)
        total = time.perf_counter() - t0
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    print(f"{'stage':58s} {'s':>8s} {'share':>6s}")
    for stage, points in STAGES.items():
        ct = sum(v[3] for (f, _, n), v in stats.items() for suf, name in points if f.endswith(suf) and n == name)
        print(f"{stage:58s} {ct:8.2f} {100 * ct / total:5.1f}%")
    print(f"{'total (register)':58s} {total:8.2f}")
    import torch

    if torch.cuda.is_available() and a.device != "cpu":
        print(f"peak device memory allocated by torch: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
