"""How well the run-time error estimate (soma_cli.check) ranks chips by their true error, and what
``--method auto`` gains, on soma evaluate's chips.

``run``: for every 512 px chip of the pairs (soma_cli.evaluate's chips, deformations and relative
error) and both protocols, each matcher (network, gradient) matches the undeformed chip (F0) and
the deformed one (F1), and each answer is checked as ``soma register`` checks a tile
(soma_cli.check.estimate); one JSON line per chip: the true relative RMSE of every pairing of
F0 and F1 between the matchers, the check's tile errors, and the seconds per pass.  Resumable
(pairs already in the output are skipped).

``report``: ROC AUC of the network's estimated error (soma_cli.check.tile_error of F1's check)
for "relative RMSE > 1 px" and "> 3 px", a calibration table and plot (estimated error bins
against the mean true error, errors capped at 50 px), and ``--method auto`` replayed from the records with the decisions
of soma_cli.matchers.auto (exactly what AutoMatcher does chip by chip): relative CMR@1/@3 and its
time against the network's.

    PYTHONPATH=. python benchmarks/check_validation.py run /work/shared/data/s1s2_calif T11SLT slt.jsonl
    PYTHONPATH=. python benchmarks/check_validation.py report slt.jsonl --plot calibration.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from soma_cli import check
from soma_cli.evaluate import base_chips, deform_chip
from soma_cli.io.dataset import list_pairs, read_pair
from soma_cli.matchers import get_matcher
from soma_cli.matchers.auto import RETRY_PX, choose, needs_fallback
from soma_cli.metrics import error_metrics, relative_error

METHODS = ("soma", "gradient")
PROTOCOLS = ("geo", "paper")


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


STATISTICS = {"median": np.median, "mean": np.mean, "p75": lambda v: np.percentile(v, 75),
              "p90": lambda v: np.percentile(v, 90)}


def _statistics(est: np.ndarray) -> dict:
    """Candidate tile errors of an estimate map; ``mean`` is check.tile_error (chosen on T11SMT)."""
    v = est[np.isfinite(est)]
    return {k: float(f(v)) if v.size else None for k, f in STATISTICS.items()}


def _checked(matcher, opt, sar, ov, sv):
    """Flow, tile error statistics and the seconds of the match and of the check."""
    (flow, _), t_match = _timed(matcher.match, opt, sar, ov, sv)
    flow = np.asarray(flow, np.float32)
    est, t_check = _timed(check.estimate, matcher.match, opt, sar, ov, sv, flow)
    return flow, [_statistics(e) for e in est], t_match, t_check


def run(data: Path, split: str, out: Path, limit, seed: int, methods=METHODS) -> None:
    torch.set_num_threads(1)
    matchers = {m: get_matcher(m, threads=1, batch_size=4) for m in methods}
    done = set()
    if out.exists():
        done = {json.loads(line)["pair"] for line in out.read_text().splitlines() if line.strip()}
    entries = list_pairs(data, [split])[:limit]
    for n, entry in enumerate(entries):
        if entry.name in done:
            continue
        chips, _ = base_chips(read_pair(entry), 512)
        if not chips:
            continue
        opt, ov = np.stack([c.opt for c in chips]), np.stack([c.opt_valid for c in chips])
        inputs = {"f0": (np.stack([c.sar for c in chips]), np.stack([c.sar_valid for c in chips]))}
        samples = {p: [deform_chip(c, p, seed) for c in chips] for p in PROTOCOLS}
        for p in PROTOCOLS:
            inputs[p] = (np.stack([s.sar for s in samples[p]]), np.stack([s.sar_valid for s in samples[p]]))
        res = {m: {k: _checked(matchers[m], opt, *inputs[k][:1], ov, inputs[k][1]) for k in inputs} for m in methods}
        lines = []
        for i, c in enumerate(chips):
            rec = {"pair": entry.name, "chip": c.index, "seconds": {}, "protocols": {}}
            for m in methods:
                # seconds per chip of a match and of a check, averaged over the three inputs
                rec["seconds"][m] = [sum(res[m][k][2] for k in inputs) / 3 / len(chips),
                                     sum(res[m][k][3] for k in inputs) / 3 / len(chips)]
            for p in PROTOCOLS:
                s = samples[p][i]
                rmse = {}
                for a in methods:
                    for b in methods:
                        err, mask = relative_error(res[a]["f0"][0][i], res[b][p][0][i], s.gt)
                        rmse[f"{a}>{b}"] = error_metrics(err, mask & c.opt_valid)["rmse"]
                rec["protocols"][p] = {"rel_rmse": rmse,
                                       "est_f0": {m: res[m]["f0"][1][i] for m in methods},
                                       "est_f1": {m: res[m][p][1][i] for m in methods}}
            lines.append(json.dumps(rec))
        with out.open("a") as f:
            f.write("\n".join(lines) + "\n")
        print(f"{n + 1}/{len(entries)} {entry.name}", flush=True)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney rank sum (ties share their mean rank); NaN scores rank highest."""
    s = np.where(np.isfinite(scores), scores, np.inf)
    from scipy.stats import rankdata

    r = rankdata(s)
    npos, nneg = int(positive.sum()), int((~positive).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    return float((r[positive].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def _score(pr: dict, key: str, method: str, statistic: str) -> float:
    v = pr[key][method][statistic]
    return float("nan") if v is None else float(v)


def _auto(pr: dict, statistic: str, retry_px: float) -> tuple:
    """(pairing key, fallback tried on F0, on F1) of --method auto on one chip under one protocol."""
    pick = []
    tried = []
    for key in ("est_f0", "est_f1"):
        net, grad = _score(pr, key, "soma", statistic), _score(pr, key, "gradient", statistic)
        t = needs_fallback(net, retry_px)
        tried.append(t)
        pick.append("gradient" if t and choose(net, grad) else "soma")
    return f"{pick[0]}>{pick[1]}", tried[0], tried[1]


def report(records: Path, plot, statistic: str = "mean", retry_px: float = RETRY_PX) -> dict:
    """The figures of the module docstring; ``statistic``: the tile error (check.tile_error is the
    mean), ``retry_px``: auto's threshold."""
    recs = [json.loads(line) for line in records.read_text().splitlines() if line.strip()]
    out = {"chips": len(recs), "statistic": statistic, "retry_px": retry_px, "protocols": {}}
    all_est, all_true = [], []
    for p in PROTOCOLS:
        prs = [r["protocols"][p] for r in recs]
        true = np.array([x["rel_rmse"]["soma>soma"] for x in prs])
        est = np.array([_score(x, "est_f1", "soma", statistic) for x in prs])
        all_est.append(est), all_true.append(true)
        out["protocols"][p] = {
            "auc_over_1px": auc(est, true > 1), "auc_over_3px": auc(est, true > 3),
            "chips_over_1px": int((true > 1).sum()), "chips_over_3px": int((true > 3).sum()),
            "soma_rel_cmr1": float(np.mean(true < 1)), "soma_rel_cmr3": float(np.mean(true < 3)),
            "soma_seconds_match_check": np.mean([r["seconds"]["soma"] for r in recs], axis=0).tolist()}
        if "gradient>gradient" not in prs[0]["rel_rmse"]:  # run with the network only: no auto
            continue
        auto = [_auto(x, statistic, retry_px) for x in prs]
        auto_rmse = np.array([x["rel_rmse"][a[0]] for x, a in zip(prs, auto)])
        grad = np.array([x["rel_rmse"]["gradient>gradient"] for x in prs])
        t_net = np.mean([r["seconds"]["soma"][0] for r in recs])
        t_auto = np.mean([r["seconds"]["soma"][0] + r["seconds"]["soma"][1]
                          + a[2] * (r["seconds"]["gradient"][0] + r["seconds"]["gradient"][1])
                          for r, a in zip(recs, auto)])
        out["protocols"][p].update({
            "gradient_rel_cmr1": float(np.mean(grad < 1)), "gradient_rel_cmr3": float(np.mean(grad < 3)),
            "auto_rel_cmr1": float(np.mean(auto_rmse < 1)), "auto_rel_cmr3": float(np.mean(auto_rmse < 3)),
            "auto_tried_f1": float(np.mean([a[2] for a in auto])),
            "auto_gradient_f1": float(np.mean([a[0].endswith("gradient") for a in auto])),
            "auto_time_over_network": float(t_auto / t_net),
        })
    est, true = np.concatenate(all_est), np.concatenate(all_true)
    edges = [0, 0.25, 0.5, 1, 2, 3, 5, np.inf]
    table = []
    for lo, hi in itertools.pairwise(edges):
        m = (est >= lo) & (est < hi)
        table.append({"est_from": lo, "est_to": hi if np.isfinite(hi) else None, "chips": int(m.sum()),
                      "mean_true_rmse": float(np.mean(np.minimum(true[m], 50))) if m.any() else None,
                      "median_true_rmse": float(np.median(true[m])) if m.any() else None,
                      "share_over_3px": float(np.mean(true[m] > 3)) if m.any() else None})
    out["calibration"] = table
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.5))
        for p, e, t in zip(PROTOCOLS, all_est, all_true):
            ax.scatter(np.maximum(e, 0.05), np.clip(t, 0.05, 50), s=10, alpha=0.6, label=p)
        ax.plot([0.05, 50], [0.05, 50], "k:", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="estimated error (chip mean, px)",
               ylabel="true relative RMSE (px)",
               title=f"Run-time check vs. truth\n{len(recs)} chips per protocol ({records.stem})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=110)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("data", type=Path)
    r.add_argument("split")
    r.add_argument("out", type=Path)
    r.add_argument("--limit", type=int, default=None, help="first N pairs of the split")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="matchers to run (auto's figures need both)")
    q = sub.add_parser("report")
    q.add_argument("records", type=Path)
    q.add_argument("--plot", type=Path, default=None)
    q.add_argument("--statistic", default="mean", choices=sorted(STATISTICS))
    q.add_argument("--retry-px", type=float, default=RETRY_PX)
    a = ap.parse_args()
    if a.cmd == "run":
        run(a.data, a.split, a.out, a.limit, a.seed, tuple(a.methods))
    else:
        print(json.dumps(report(a.records, a.plot, a.statistic, a.retry_px), indent=2))


if __name__ == "__main__":
    main()
