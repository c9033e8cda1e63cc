"""Which dense-stage quantities predict where the SOMA network's flow is right: logistic fits on
training crops (how the 0.7.0 certainty calibration's inputs were chosen; model card, "What
changed in 0.7.0").

    python benchmarks/certainty_features.py runs/clean/cache.npz --checkpoint runs/v2c/best.pt

Draws ``--fit-samples`` training samples (seed 101) and ``--test-samples`` more (seed 202) from the
cache's *training* pairs (`train.TrainSamples`: 512 px crops, the training deformation mixture and
augmentation), runs the network on the deformed and undeformed SAR, and labels every defined pixel
(every second row and column) "within 1 px of the self-consistent flow"
(`train.consistency_certainty_target`).  Per dense stage (1/4, 1/2, full resolution) the features
are the peak confidence, the consensus support and |peak - consensus|, upsampled to full
resolution.  It prints each feature's ROC AUC on the test samples, then logistic regressions
(L-BFGS) fitted on the first set and scored (cross-entropy, AUC) on the second.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from soma_cli import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certainty_calibration import HEADS, auc  # noqa: E402

NAMES = ["conf4", "sup4", "dev4", "conf2", "sup2", "dev2", "conf1", "sup1", "dev1"]


def collect(model, cache, seed: int, n: int):
    ds = train.TrainSamples(cache["train_opt"], cache["train_sar"], cache["train_valid"], 512, seed=seed)
    seen: dict = {}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, k=name: seen.__setitem__(k, i[0].detach()))
             for name, _ in HEADS]
    xs, ys = [], []
    with torch.no_grad():
        for i in range(n):
            b = {k: v[None] for k, v in ds[i].items()}
            flow, _ = model(b["opt"], b["sar"], b["opt_valid"], b["sar_valid"])
            x = dict(seen)
            flow0, _ = model(b["opt"], b["sar0"], b["opt_valid"], b["sar0_valid"])
            match = train.gt_mask(b["gt"], b["opt_valid"], b["sar_valid"])
            right, defined = train.consistency_certainty_target(flow0, flow, b["gt"], b["opt_valid"], match)
            d = defined[0, 0] > 0
            d[:, 1::2] = False
            d[1::2] = False
            fs = []
            for name, s in HEADS:
                f = x[name] if s == 1 else F.interpolate(x[name], scale_factor=float(s), mode="bilinear",
                                                          align_corners=False)
                f = f[0]
                fs += [f[4], f[5], torch.hypot(f[0] - f[2], f[1] - f[3])]
            xs.append(torch.stack(fs, -1)[d].numpy().astype(np.float64))
            ys.append(right[0, 0][d].numpy() > 0)
    for h in hooks:
        h.remove()
    return np.concatenate(xs), np.concatenate(ys)


def logistic(xa, ya, xb, yb):
    a = np.concatenate([xa, np.ones((len(xa), 1))], 1)
    y = ya.astype(float)

    def f(w):
        z = a @ w
        return (np.logaddexp(0, z) - y * z).mean(), a.T @ (1 / (1 + np.exp(-z)) - y) / len(y)

    w = minimize(f, np.zeros(a.shape[1]), jac=True, method="L-BFGS-B").x
    z = np.concatenate([xb, np.ones((len(xb), 1))], 1) @ w
    return w, float((np.logaddexp(0, z) - yb * z).mean()), auc(z, yb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--fit-samples", type=int, default=60)
    ap.add_argument("--test-samples", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cache = train.load_cache(Path(a.cache))
    model = train.load_model_checkpoint(Path(a.checkpoint))
    xa, ya = collect(model, cache, 101, a.fit_samples)
    xb, yb = collect(model, cache, 202, a.test_samples)
    rng = np.random.default_rng(0)
    keep = rng.choice(len(ya), min(400000, len(ya)), replace=False)
    xa, ya = xa[keep], ya[keep]
    p = yb.mean()
    print(f"test: {len(yb)} pixels, {100 * p:.1f} % right; a constant scores cross-entropy "
          f"{-(p * np.log(p) + (1 - p) * np.log(1 - p)):.3f}")
    print("feature AUC: " + ", ".join(f"{n} {auc(xb[:, j], yb):.3f}" for j, n in enumerate(NAMES)))
    for cols in ([4], [1, 4, 7], [0, 1, 3, 4, 6, 7], list(range(9))):
        w, bce, au = logistic(xa[:, cols], ya, xb[:, cols], yb)
        print(f"logistic on {', '.join(NAMES[c] for c in cols)}: weights {np.round(w, 2).tolist()}, "
              f"cross-entropy {bce:.3f}, AUC {au:.3f}")


if __name__ == "__main__":
    main()
