"""Time one tile through a TorchScript weights file, as `soma register` runs it.

    python benchmarks/tile_speed.py ../shared/data/s1s2_calif --weights weights/soma-0.12.0.pt [--weights OTHER.pt]
        [--split T11SMT] [--pair 3] [--size 512] [--threads 2] [--repeats 6] [--no-allocator-tuning] [--older]

Loads each file with the project's loader (with ``--older``, files whose metadata this version no
longer reads, such as an earlier release's weights, are loaded by ``torch.jit.load`` alone), takes the first ``--size`` px chip of one pair (the optical
reference and its SAR), and times ``infer.run_model`` after one warm-up call; prints the best and
the median of ``--repeats`` calls.  ``--no-allocator-tuning`` leaves glibc's allocator as it is
(the `soma` matcher otherwise calls ``cpu.tune_allocator``; the setting is process-wide, so
compare the two cases in separate runs).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from soma_cli import cpu, evaluate, infer
from soma_cli.errors import WeightsError
from soma_cli.io.dataset import list_pairs, read_pair
from soma_cli.model.loader import load_weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--weights", type=Path, action="append", required=True)
    ap.add_argument("--split", default="T11SMT")
    ap.add_argument("--pair", type=int, default=3)
    ap.add_argument("--size", type=int, default=512, help="tile size in pixels (672: soma register's larger tiles)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--no-allocator-tuning", action="store_true")
    ap.add_argument("--older", action="store_true", help="load files the loader refuses with torch.jit.load")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not a.no_allocator_tuning:
        cpu.tune_allocator()
    entry = list_pairs(a.data_dir, [a.split])[a.pair]
    chip = evaluate.base_chips(read_pair(entry), a.size)[0][0]

    def batch(x) -> np.ndarray:
        return np.nan_to_num(np.asarray(x, np.float32))[None]

    args = (batch(chip.opt), batch(chip.sar), batch(chip.opt_valid) > 0, batch(chip.sar_valid) > 0)
    tuning = "off" if a.no_allocator_tuning else "on"
    print(f"pair {entry.name}, chip 0 ({a.size} px), {a.threads} thread(s), allocator tuning {tuning}")
    for w in a.weights:
        try:
            model, meta = load_weights(w, device="cpu")
        except WeightsError:
            if not a.older:
                raise
            model, meta = torch.jit.load(str(w), map_location="cpu").eval(), {}
        mult = int(meta.get("tile_multiple", infer.TILE_MULTIPLE))
        infer.run_model(model, *args, multiple=mult)
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            infer.run_model(model, *args, multiple=mult)
            times.append(time.perf_counter() - t0)
        print(f"{w}: best {min(times):.3f} s, median {statistics.median(times):.3f} s")


if __name__ == "__main__":
    main()
