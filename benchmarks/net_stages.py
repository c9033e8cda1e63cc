"""Stage-by-stage accuracy of the SOMA network on `soma evaluate` chips.

For every chip and protocol, the eager network (a `soma train` checkpoint, or the untrained
architecture with ``--init``) is run on the undeformed and on the deformed pair; each GLAM stage
(global affine, affine at 1/8, 1/4 and 1/2, dense flow at 1/4, 1/2 and full resolution) is scored with
the relative (self-consistency) RMSE and the absolute RMSE of `soma evaluate`.  This is how the
network's design was checked: a stage that does not lower the relative error does not help.

    python benchmarks/net_stages.py ../shared/data/s1s2_calif --split T11SMT --limit 4 --init
    python benchmarks/net_stages.py ../shared/data/s1s2_calif --split T11SLT --limit 6 --checkpoint runs/x/best.pt
    python benchmarks/net_stages.py ../shared/data/s1s2_calif --split T11SMT --limit 37 --init --set smooth4=31 --per-chip

``--set NAME=VALUE`` overrides a numeric or boolean attribute of the network (a window size, a
radius, an iteration count, ``cone_fit=false``, ...) for an ablation; ``--per-chip`` prints every chip's final relative RMSE, and the summary adds the
CMR@2px and the mean of the relative RMSE clipped at 5 px (less noisy than a median on few chips).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from soma_cli.model import geometry
from soma_cli import evaluate as E
from soma_cli.io.dataset import list_pairs, read_pair
from soma_cli.model import net as netmod
from soma_cli.train import load_model_checkpoint

STAGES = ("affine_global", "affine8", "affine4", "affine2", "flow4", "flow2", "flow")


def stage_flows(model: netmod.SomaNet, opt, sar, opt_valid, sar_valid) -> dict:
    def t(a):
        return torch.from_numpy(np.nan_to_num(np.asarray(a, np.float32)))[None, None]

    with torch.inference_mode():
        out = model.run(t(opt), t(sar), t(opt_valid), t(sar_valid))
    h, w = opt.shape
    flows = {k: geometry.affine_to_flow(out[k], h, w) for k in STAGES[:4]}
    flows["flow4"] = geometry.upsample_flow(out["flow4"], 4)
    flows["flow2"] = geometry.upsample_flow(out["flow2"], 2)
    flows["flow"] = out["flow"]
    return {k: v[0].numpy() for k, v in flows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--split", default="T11SLT")
    ap.add_argument("--limit", type=int, default=4)
    ap.add_argument("--chip", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", type=Path, help="a soma train checkpoint (model.pt, best.pt)")
    g.add_argument("--init", action="store_true", help="the untrained architecture (torch seed 0)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a numeric or boolean network attribute (repeatable)")
    ap.add_argument("--per-chip", action="store_true", help="print each chip's final relative RMSE")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.init:
        torch.manual_seed(0)
        model = netmod.build().eval()
    else:
        model = load_model_checkpoint(a.checkpoint)
    for item in a.set:
        name, _, value = item.partition("=")
        current = getattr(model, name, None)
        if isinstance(current, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                ap.error(f"--set {item}: {name!r} takes true or false")
            setattr(model, name, value.lower() in ("true", "1"))
        elif isinstance(current, (int, float)):
            setattr(model, name, type(current)(value))
        else:
            ap.error(f"--set {item}: the network has no numeric or boolean attribute {name!r}")
    res: dict = {}
    t0 = time.time()
    n = 0
    for entry in list_pairs(a.data_dir, [a.split])[: a.limit]:
        chips, _ = E.base_chips(read_pair(entry), a.chip)
        for c in chips:
            n += 1
            f0 = stage_flows(model, c.opt, c.sar, c.opt_valid, c.sar_valid)
            for p in ("geo", "paper"):
                s = E.deform_chip(c, p, a.seed)
                f1 = stage_flows(model, c.opt, s.sar, c.opt_valid, s.sar_valid)
                for k in STAGES:
                    err, mask = E.relative_error(f0[k], f1[k], s.gt)
                    rel = E.error_metrics(err, mask & c.opt_valid)["rmse"]
                    ab = E.chip_metrics(f1[k], s.gt, E.eval_mask(s.gt, c.opt_valid))["rmse"]
                    res.setdefault((p, k), []).append((rel, ab))
            if a.per_chip:
                print(f"{entry.name} chip {c.index}: relative RMSE geo {res[('geo', 'flow')][-1][0]:.2f} "
                      f"paper {res[('paper', 'flow')][-1][0]:.2f} px", flush=True)
    print(f"{n} chips of {a.chip} px from {a.split} (limit {a.limit}, seed {a.seed}) in {time.time() - t0:.0f} s")
    print("protocol stage          rel RMSE median  rel CMR@1  rel CMR@2  rel CMR@3  rel mean(min(.,5))  abs RMSE median")
    for p in ("geo", "paper"):
        for k in STAGES:
            v = np.array(res[(p, k)])
            print(f"{p:8s} {k:14s} {np.median(v[:, 0]):15.2f} {np.mean(v[:, 0] < 1):10.3f} "
                  f"{np.mean(v[:, 0] < 2):10.3f} {np.mean(v[:, 0] < 3):10.3f} "
                  f"{np.minimum(v[:, 0], 5).mean():18.3f} {np.median(v[:, 1]):16.2f}")


if __name__ == "__main__":
    main()
