"""Per-chip flows of a checkpoint on `soma evaluate` chips, and their relative scores under
certainty-based post-processes: how the global-local blend of 0.7.0 was chosen (model card, "What
changed in 0.7.0").

    # 1. dump flow and certainty of every chip (undeformed, geo, paper; seed 0, as soma evaluate)
    python benchmarks/blend_study.py dump runs/cert2/best.pt --split T11SMT --out /tmp/blend/smt
    # 2. score them as they are ("raw") and post-processed
    python benchmarks/blend_study.py score /tmp/blend/smt --modes raw,repair,soft:1.0:256,hard:0.5:256

The checkpoint is an eager `soma train` checkpoint, run with the current network code (so a
checkpoint with a trained calibration is dumped *with* the blend; to study the blend as a
post-process, dump with the blend switched off: ``--no-blend``).  ``gradient`` instead of a
checkpoint dumps the gradient matcher.

Modes (each applied to the undeformed and the deformed flow before the relative error):
  raw             the flow as dumped
  repair          the pipeline's outlier repair (stitch.FlowPrior.repair) on the chip
  soft:T:S        ``a * flow + (1 - a) * prior`` with ``a = clip(c / T, 0, 1)``; the prior is the
                  pipeline's (robust certainty-weighted affine plus a Gaussian, sigma S px,
                  normalised convolution of the residual); T = 1 is the 0.7.0 blend's rule
  hard:T:S        the prior where ``c < T``
  pow:K:S         ``a = c ** K``
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np


def dump(a) -> None:
    import torch

    from soma_cli import evaluate as E
    from soma_cli import infer, train
    from soma_cli.io.dataset import list_pairs, read_pair
    from soma_cli.matchers import get_matcher

    torch.set_num_threads(a.threads)
    if a.checkpoint == "gradient":
        g = get_matcher("gradient")

        def match(o, s, vo, vs):
            f, c = g.match(o[None], s[None], vo[None], vs[None])
            return f[0], c[0]
    else:
        model = train.load_model_checkpoint(Path(a.checkpoint))
        model.blend = not a.no_blend

        def match(o, s, vo, vs):
            f, c = infer.run_model(model, o[None], s[None], vo[None], vs[None])
            return f[0], c[0]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for entry in list_pairs(Path(a.data_dir), [a.split])[: a.limit]:
        chips, _ = E.base_chips(read_pair(entry), a.chip)
        for c in chips:
            d = {"ov": c.opt_valid}
            d["f0"], d["c0"] = match(c.opt, c.sar, c.opt_valid, c.sar_valid)
            for p in ("geo", "paper"):
                s = E.deform_chip(c, p, a.seed)
                d["f_" + p], d["c_" + p] = match(c.opt, s.sar, c.opt_valid, s.sar_valid)
                d["gt_" + p] = s.gt
            np.savez(out / f"{entry.name}_{c.index}.npz", **d)
            print(entry.name, c.index, flush=True)


def _prior(f, c, sigma):
    from soma_cli import coords
    from soma_cli.stitch import FlowPrior

    h, w = c.shape
    yy, xx = np.mgrid[0:h:8, 0:w:8]
    fs, cs = f[:, ::8, ::8], c[::8, ::8]
    ok = np.isfinite(fs).all(0) & (cs > 0)
    x, y, dx, dy, cc = xx[ok], yy[ok], fs[0][ok], fs[1][ok], cs[ok]
    if x.size < 6:
        return None
    aff, _ = coords.fit_affine_points_np(x, y, x + dx, y + dy, np.maximum(cc, 1e-3))
    return FlowPrior(x, y, dx, dy, cc, aff, h, w, 0, 0, sigma_px=sigma)


def post(f: np.ndarray, c: np.ndarray, mode: str) -> np.ndarray:
    from soma_cli.stitch import Strip

    if mode == "raw":
        return f
    if mode == "repair":
        p = _prior(f, c, 256.0)
        return f if p is None else p.repair(Strip(0, f, c, np.ones(c.shape, bool)), 0, 0).flow
    kind, t, sig = mode.split(":")
    p = _prior(f, c, float(sig))
    if p is None:
        return f
    pr = p.field(0, 0, c.shape[0], c.shape[1])
    if kind == "soft":
        w = np.clip(c / float(t), 0, 1)
    elif kind == "hard":
        w = (c >= float(t)).astype(np.float32)
    elif kind == "pow":
        w = c ** float(t)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return w * f + (1 - w) * pr


def score(a) -> None:
    from soma_cli import evaluate as E

    modes = a.modes.split(",")
    rel = {m: {"geo": [], "paper": []} for m in modes}
    files = sorted(glob.glob(str(Path(a.dump_dir) / "*.npz")))
    for fn in files:
        d = np.load(fn)
        for m in modes:
            f0 = post(d["f0"], d["c0"], m)
            for p in ("geo", "paper"):
                err, mask = E.relative_error(f0, post(d["f_" + p], d["c_" + p], m), d["gt_" + p])
                rel[m][p].append(E.error_metrics(err, mask & d["ov"])["rmse"])
    print(f"{len(files)} chips from {a.dump_dir}: relative CMR@1, CMR@3 (%), median RMSE (px)")
    for m in modes:
        line = []
        for p in ("geo", "paper"):
            v = np.array(rel[m][p])
            line.append(f"{p} {100 * np.mean(v < 1):5.1f} {100 * np.mean(v < 3):5.1f} {np.median(v):.3f}")
        print(f"{m:16s} " + " | ".join(line))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("checkpoint")
    d.add_argument("--data-dir", default="../shared/data/s1s2_calif")
    d.add_argument("--split", default="T11SMT")
    d.add_argument("--limit", type=int, default=None)
    d.add_argument("--chip", type=int, default=512)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--no-blend", action="store_true", help="switch the global-local blend off")
    d.add_argument("--out", required=True)
    s = sub.add_parser("score")
    s.add_argument("dump_dir")
    s.add_argument("--modes", default="raw")
    a = ap.parse_args()
    dump(a) if a.cmd == "dump" else score(a)


if __name__ == "__main__":
    main()
