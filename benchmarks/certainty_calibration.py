"""How well the SOMA network's certainty predicts where its flow is right.

On the validation chips of a training cache (`train.val_chips`: the held-out pairs' centre crops,
both protocols), every valid pixel gets a label, "the flow on the deformed pair is within 1 px of
the undeformed pair's flow followed by the deformation" (`train.consistency_certainty_target`, the
target of `soma train --only certainty`), and the certainty is binned against it: per bin the share
of pixels and the share of them that are right, plus the binary cross-entropy, the Brier score and
the ROC AUC (how well the certainty ranks right pixels above wrong ones).

    python benchmarks/certainty_calibration.py runs/clean/cache.npz --checkpoint runs/cert1/best.pt [--checkpoint OTHER]
    python benchmarks/certainty_calibration.py runs/clean/cache.npz --weights weights/soma-0.6.0.pt

Only valid pixels with a defined label count (optical valid, a valid match in both passes).

``--head-inputs`` (eager checkpoints only) also prints the AUC of each input of the three dense
heads (the peak displacement, the consensus, the peak confidence, the consensus support and their
disagreement), upsampled to full resolution: what a certainty could be built from.

    python benchmarks/certainty_calibration.py runs/clean/cache.npz --checkpoint runs/v2c/best.pt --head-inputs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from soma_cli import train
from soma_cli.model import loader

BINS = (0.0, 0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0001)


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """ROC AUC from ranks (ties averaged)."""
    from scipy.stats import rankdata

    pos = label.sum()
    neg = label.size - pos
    if pos == 0 or neg == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[label].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


HEADS = (("head4", 4), ("head2", 2), ("head1", 1))


def collect(model, chips, batch: int = 4, head_inputs: bool = False):
    """Certainty and label of every defined pixel; with ``head_inputs``, also the dense heads' inputs
    there (``{head: (N, C)}``)."""
    cs, ls = [], []
    seen: dict = {}
    feats: dict = {name: [] for name, _ in HEADS}
    if head_inputs:
        for name, _ in HEADS:
            getattr(model, name).register_forward_hook(
                lambda mod, inp, out, n=name: seen.__setitem__(n, inp[0].detach()))
    with torch.no_grad():
        for i in range(0, len(chips), batch):
            g = chips[i:i + batch]
            t = {k: torch.from_numpy(np.stack([c[k] for c in g]))
                 for k in ("opt", "sar", "opt_valid", "sar_valid", "gt", "sar0", "sar0_valid")}
            flow, cert = model(t["opt"], t["sar"], t["opt_valid"], t["sar_valid"])
            x = dict(seen)  # the deformed pair's head inputs, before the second pass replaces them
            flow0, _ = model(t["opt"], t["sar0"], t["opt_valid"], t["sar0_valid"])
            match = train.gt_mask(t["gt"], t["opt_valid"], t["sar_valid"])
            right, defined = train.consistency_certainty_target(flow0.float(), flow.float(), t["gt"],
                                                                t["opt_valid"], match)
            right, defined = right > 0, defined > 0
            cs.append(cert[defined].numpy())
            ls.append(right[defined].numpy())
            for name, s in (HEADS if head_inputs else ()):
                f = x[name] if s == 1 else F.interpolate(x[name], scale_factor=float(s), mode="bilinear",
                                                          align_corners=False)
                feats[name].append(f.permute(0, 2, 3, 1)[defined[:, 0]].numpy())
    return np.concatenate(cs), np.concatenate(ls), {k: np.concatenate(v) for k, v in feats.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cache")
    ap.add_argument("--checkpoint", action="append", default=[], help="a soma train checkpoint (eager)")
    ap.add_argument("--weights", action="append", default=[], help="an exported TorchScript weights file")
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--head-inputs", action="store_true", help="AUC of the dense heads' inputs (eager checkpoints)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    chips = train.val_chips(train.load_cache(Path(a.cache)), a.chip, max_pairs=a.pairs)
    models = [(c, train.load_model_checkpoint(Path(c))) for c in a.checkpoint]
    models += [(w, loader.load_weights(Path(w), device="cpu")[0]) for w in a.weights]
    for name, model in models:
        c, lab, feats = collect(model, chips, head_inputs=a.head_inputs and name in a.checkpoint)
        c = np.clip(c.astype(np.float64), 1e-6, 1 - 1e-6)
        bce = float(-(lab * np.log(c) + (~lab) * np.log(1 - c)).mean())
        print(f"{name}: {len(chips)} chips, {c.size} pixels, {100 * lab.mean():.1f} % right (within 1 px); "
              f"BCE {bce:.3f}, Brier {float(((c - lab) ** 2).mean()):.3f}, AUC {auc(c, lab):.3f}")
        print("  certainty bin   share of pixels   right   mean certainty")
        for lo, hi in zip(BINS[:-1], BINS[1:]):
            sel = (c >= lo) & (c < hi)
            if sel.any():
                print(f"  [{lo:.2f}, {min(hi, 1.0):.2f})   {100 * sel.mean():6.1f} %        {100 * lab[sel].mean():5.1f} %   "
                      f"{c[sel].mean():.3f}")
        for head, x in feats.items():  # channels: disp (2), consensus (2), confidence, support[, logit]
            res = {"confidence": auc(x[:, 4], lab), "support": auc(x[:, 5], lab),
                   "-|peak - consensus|": auc(-np.hypot(x[:, 0] - x[:, 2], x[:, 1] - x[:, 3]), lab)}
            print(f"  {head} inputs, AUC: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
