"""How much of the absolute error is the data's: the pairs' own residual, where two matchers agree.

The absolute metrics of ``soma evaluate`` score a flow against the synthetic deformation ``D``
alone, as if each real pair were perfectly co-registered.  It is not: a pair carries its own
residual field ``R`` (the SAR's misregistration on the optical grid, terrain included, since the S1
GRD product is not terrain-corrected).  A matcher that finds the *true* flow of the deformed
sample, ``R + D o (id + R)`` (:func:`soma_cli.evaluate.expected_flow`), is still scored with the
error ``R + D o (id + R) - D``, about ``R``.

``R`` is unknown, so this script estimates it where two unrelated matchers agree: ``gradient``
(classical) and ``soma`` (the network) are run on each *undeformed* chip; at the pixels where
their flows are within ``--agree`` px of each other, ``R`` is taken as their mean.  For each chip
and protocol it reports the absolute RMSE that flow-perfect matching would score on those pixels,
and a lower bound for the whole chip, ``sqrt(share) * RMSE`` (the other pixels counted as zero
error).  Chips whose bound is at or above 3 px cannot count towards absolute CMR@3px for any method
that finds the true flow, unless both matchers are wrong together in the same way.

    python benchmarks/residual_floor.py ../shared/data/s1s2_calif --split T11SLT --json OUT.json

The chips and deformations are those of ``soma evaluate`` (seed 0, 512 px chips).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from soma_cli import evaluate as E
from soma_cli.io.dataset import list_pairs, read_pair
from soma_cli.matchers import get_matcher


def chip_floor(fg: np.ndarray, fs: np.ndarray, valid: np.ndarray, d: np.ndarray, radii) -> dict:
    """Floor statistics of one chip under one deformation ``d`` (2, H, W), from the undeformed flows
    ``fg`` and ``fs`` (2, H, W) of the two matchers and the optical validity ``valid`` (H, W), for
    each agreement radius in ``radii``: ``{str(radius): {share, rmse_agreed, bound}}``."""
    n = int(valid.sum())
    scored = valid & np.isfinite(fg).all(0) & np.isfinite(fs).all(0) & E.eval_mask(d, valid)
    gap = np.hypot(*(fg - fs))
    r = 0.5 * (np.nan_to_num(fg) + np.nan_to_num(fs))
    err = E.expected_flow(r, d).astype(np.float64) - d  # what flow-perfect matching is scored with
    out = {}
    for agree in radii:
        mask = scored & (gap < agree)
        share = float(mask.sum()) / max(n, 1)
        if not mask.any():
            out[str(agree)] = {"share": 0.0, "rmse_agreed": float("nan"), "bound": 0.0}
            continue
        rmse = E.error_metrics(err, mask)["rmse"]
        out[str(agree)] = {"share": share, "rmse_agreed": rmse, "bound": float(np.sqrt(share) * rmse)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--split", default="T11SLT")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--agree", type=float, action="append", default=None,
                    help="agreement radius of the two flows, px (repeat for several; default 1 and 2)")
    ap.add_argument("--json", type=Path, default=None, help="write every chip's numbers here")
    a = ap.parse_args()
    radii = a.agree or [1.0, 2.0]
    grad = get_matcher("gradient")
    soma = get_matcher("soma")
    rows = []
    t0 = time.time()
    for entry in list_pairs(a.data_dir, [a.split])[: a.limit]:
        chips, _ = E.base_chips(read_pair(entry), a.chip)
        for c in chips:
            args = (c.opt[None], c.sar[None], c.opt_valid[None], c.sar_valid[None])
            fg = np.asarray(grad.match(*args)[0][0], np.float64)
            fs = np.asarray(soma.match(*args)[0][0], np.float64)
            diff = np.hypot(*(fg - fs))[c.opt_valid]
            row = {"pair": entry.name, "chip": c.index, "median_disagreement": float(np.median(diff))}
            for p in ("geo", "paper"):
                s = E.deform_chip(c, p, a.seed)
                row[p] = chip_floor(fg, fs, c.opt_valid, s.gt.astype(np.float64), radii)
            rows.append(row)
            g = row["geo"][str(radii[0])]
            print(f"{entry.name} chip {c.index}: agreed within {radii[0]} px on {g['share']:.2f} of the chip, "
                  f"residual RMSE there {g['rmse_agreed']:.2f} px, chip bound {g['bound']:.2f} px (geo)", flush=True)
    n = len(rows)
    print(f"{n} chips of {a.chip} px from {a.split} in {time.time() - t0:.0f} s")
    summary = {}
    for k in radii:
        for p in ("geo", "paper"):
            b = np.array([r[p][str(k)]["bound"] for r in rows])
            sh = np.array([r[p][str(k)]["share"] for r in rows])
            s = {
                "chips": n,
                "bound_ge_3px": int((b >= 3.0).sum()),
                "bound_ge_1px": int((b >= 1.0).sum()),
                "max_abs_cmr3": float(np.mean(b < 3.0)),
                "median_share": float(np.median(sh)),
                "median_bound": float(np.median(b)),
            }
            summary[f"{p} agree {k}"] = s
            print(f"{p:6s} agree {k} px: chips whose bound is >= 3 px: {s['bound_ge_3px']} of {n} "
                  f"(>= 1 px: {s['bound_ge_1px']}), so absolute CMR@3px <= {100 * s['max_abs_cmr3']:.1f} % "
                  f"for flow-perfect matching; median agreed share {s['median_share']:.2f}, "
                  f"median bound {s['median_bound']:.2f} px")
    if a.json:
        a.json.write_text(json.dumps({"split": a.split, "chip": a.chip, "seed": a.seed, "agree": radii,
                                      "summary": summary, "chips": rows}, indent=1))


if __name__ == "__main__":
    main()
