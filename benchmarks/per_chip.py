"""Per-chip relative (self-consistency) RMSE of any matcher on `soma evaluate` chips.

`soma evaluate` reports shares over chips; this prints every chip, so that two methods (or two
versions of one) can be compared chip by chip on many chips, for example a whole training tile:

    python benchmarks/per_chip.py ../shared/data/s1s2_calif --split T11SMT --method gradient
    python benchmarks/per_chip.py ../shared/data/s1s2_calif --split T11SMT --method soma --limit 10

Each chip is matched undeformed and under both protocols (seed 0, as `soma evaluate`); the
relative RMSE is that of `soma evaluate` (`evaluate.relative_error`, then `evaluate.error_metrics`
over the optical validity). The summary gives the relative CMR@1, @2, @3 px and the mean of the RMSE clipped at
5 px.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from soma_cli import evaluate as E
from soma_cli.io.dataset import list_pairs, read_pair
from soma_cli.matchers import get_matcher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--split", default="T11SMT")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--method", default="gradient")
    a = ap.parse_args()
    matcher = get_matcher(a.method)
    rel: dict = {"geo": [], "paper": []}
    t0 = time.time()
    for entry in list_pairs(a.data_dir, [a.split])[: a.limit]:
        chips, _ = E.base_chips(read_pair(entry), a.chip)
        for c in chips:
            f0 = matcher.match(c.opt[None], c.sar[None], c.opt_valid[None], c.sar_valid[None])[0][0]
            line = []
            for p in ("geo", "paper"):
                s = E.deform_chip(c, p, a.seed)
                f1 = matcher.match(c.opt[None], s.sar[None], c.opt_valid[None], s.sar_valid[None])[0][0]
                err, mask = E.relative_error(f0, f1, s.gt)
                r = E.error_metrics(err, mask & c.opt_valid)["rmse"]
                rel[p].append(r)
                line.append(f"{p} {r:.2f}")
            print(f"{entry.name} chip {c.index}: relative RMSE {' '.join(line)} px", flush=True)
    n = len(rel["geo"])
    print(f"{a.method}: {n} chips of {a.chip} px from {a.split} in {time.time() - t0:.0f} s")
    for p in ("geo", "paper"):
        v = np.array(rel[p])
        print(f"{p:6s} rel CMR@1 {np.mean(v < 1):.3f}  @2 {np.mean(v < 2):.3f}  @3 {np.mean(v < 3):.3f}  "
              f"mean(min(RMSE, 5)) {np.minimum(v, 5).mean():.3f}  median {np.median(v):.2f}")


if __name__ == "__main__":
    main()
