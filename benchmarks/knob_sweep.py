"""Greedy search of the SOMA network's matching settings (search radii, window sizes, iterations,
temperatures, the blend's scale) on chips of the *training* tile, fast enough on a GPU to try some
sixty settings in a few minutes.  The held-out tile is not touched: the setting found is scored on
it once, afterwards, with ``soma evaluate`` (model card, "Tried after 0.7.0" and "What changed in
0.9.0").

    # 1. here (rasterio): two 512 px chips of every training pair, lzma-packed (about 30 MB)
    python benchmarks/knob_sweep.py pack ../shared/data/s1s2_calif --split T11SMT --out .devcache/sweep/chips.npz.xz
    # 2. on a GPU machine (torch, numpy, scipy; no rasterio): the shipped setting, then one greedy
    #    pass over KNOBS, then more passes while time is left; results stream to OUT/sweep.jsonl.
    #    Carry .devcache/sweep and .devcache/pylib (the pure-Python `affine`).  The weights come
    #    from a `soma train` checkpoint copied beside the chips (that machine's older torch may
    #    not read a TorchScript file written by a newer one): cp runs/cert2/best.pt .devcache/sweep/cert2_best.pt
    PYTHONPATH=.:.devcache/pylib python3 benchmarks/knob_sweep.py search .devcache/sweep/chips.npz.xz --checkpoint .devcache/sweep/cert2_best.pt --out OUT --minutes 7 --batch 16
    #    or a list of settings, to OUT/grid.jsonl (benchmarks/knob_sweep_grid.json is the grid of the
    #    model card's "Tried after 0.7.0"; the code then had one radius, r_aff, for 1/8, 1/4 and 1/2,
    #    so the file sets r_aff8 too, and the logs in weights/logs/ say r_aff for both)
    PYTHONPATH=.:.devcache/pylib python3 benchmarks/knob_sweep.py grid .devcache/sweep/chips.npz.xz benchmarks/knob_sweep_grid.json --checkpoint .devcache/sweep/cert2_best.pt --out OUT --batch 16
    # a second bench of the same pairs, the other two chips of each, to confirm a choice:
    python benchmarks/knob_sweep.py pack ../shared/data/s1s2_calif --split T11SMT --other 1 --out .devcache/sweep2/chips.npz.xz
    # 3. score one setting anywhere (CPU: 8-10 min a setting for the 74 chips)
    python benchmarks/knob_sweep.py score .devcache/sweep/chips.npz.xz --set aggd2=41 --set shrink=0.05

The chips and deformations are those of ``soma evaluate`` (``evaluate.base_chip``,
``evaluate.deform_chip``, seed 0, both protocols): chips 0 and 3 of the even pairs, 1 and 2 of the
odd ones (74 chips, 148 deformed samples).  The score of a setting is the relative (self-
consistency) error of ``train.relative_rmse``, the torch twin of ``soma evaluate``'s: the number of
samples under 1 px, ties broken by the mean of ``min(error, 5 px)``.  A change is kept when it gains
at least 2 samples, or loses none and lowers that mean by at least 0.02 px.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import math
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np

CHIP = 512
SEED = 0
PROTOCOLS = ("geo", "paper")
# (knob, candidate values), coarse stages first; attributes of SomaNet, except temp_* (factors on
# the loaded correlation temperatures: temp_global on log_scale[0], temp_local on log_scale[1:])
KNOBS: List[Tuple[str, list]] = [
    ("rotation_step", [2.5, 5.0]),
    ("n_candidates", [2, 5]),
    ("r_global", [12]),
    ("min_overlap", [0.2, 0.5]),
    ("temp_global", [0.5, 2.0]),
    ("r_aff8", [3, 5]),
    ("r_aff", [2, 4]),
    ("agg8", [3, 7]),
    ("n_aff8", [2, 4]),
    ("agg4", [7, 13]),
    ("n_aff4", [1, 3]),
    ("agg2", [31, 95]),
    ("n_aff2", [1, 3]),
    ("aff_k", [0.5, 2.0]),
    ("temp_local", [0.5, 2.0]),
    ("r4", [2, 4]),
    ("aggd4", [11, 21]),
    ("smooth4", [41, 91]),
    ("r2", [2, 4]),
    ("aggd2", [21, 45]),
    ("smooth2", [41, 91, 121]),
    ("r1", [2]),
    ("aggd1", [41, 91]),
    ("smooth1", [61, 181]),
    ("shrink", [0.005, 0.05, 0.1]),
    ("edge_support", [0]),  # 0: 0.7.0's consensus support at the image border
    ("border_margin", [4, 12]),
    ("blend_k", [0.5, 2.0, 4.0]),
]
MIN_GAIN = 2
MIN_CLIP_GAIN = 0.02


# ----------------------------------------------------------------------------- packing (here)


def pack(a) -> None:
    from soma_cli import evaluate as E
    from soma_cli.io.dataset import list_pairs, read_pair
    from soma_cli.preprocess import optical_to_gray, select_bands

    cols: Dict[str, list] = {k: [] for k in ("opt3", "sar", "opt_valid", "sar_valid", "pair", "index")}
    for i, entry in enumerate(list_pairs(Path(a.data_dir), [a.split])[: a.limit]):
        arr = read_pair(entry)
        gray = optical_to_gray(select_bands(arr.opt))
        opt3 = np.rint(gray.astype(np.float64) * 3.0).astype(np.uint16)
        if not np.array_equal(opt3.astype(np.float32) / np.float32(3.0), gray):
            raise SystemExit(f"{entry.name}: the grey optical is not a mean of 8-bit bands")
        wins = E.chip_windows(*arr.sar.shape[-2:], CHIP)
        pick = (0, 3) if (i + a.other) % 2 == 0 else (1, 2)
        for k in pick:
            if k >= len(wins):
                continue
            r, c = wins[k]
            win = (slice(r, r + CHIP), slice(c, c + CHIP))
            cols["opt3"].append(opt3[win])
            cols["sar"].append(np.asarray(arr.sar[win], np.uint8))
            cols["opt_valid"].append(np.packbits(arr.opt_valid[win], axis=-1))
            cols["sar_valid"].append(np.packbits(arr.sar_valid[win], axis=-1))
            cols["pair"].append(entry.name)
            cols["index"].append(k)
    buf = io.BytesIO()
    np.savez(buf, **{k: np.array(v) for k, v in cols.items()}, split=np.array(a.split))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(lzma.compress(buf.getvalue(), preset=6))
    print(f"{len(cols['pair'])} chips of {len(set(cols['pair']))} pairs -> {out} ({out.stat().st_size / 1e6:.1f} MB)")


def load_samples(path: Path, limit: int = 0):
    """The packed chips as ``soma evaluate`` prepares them: (base chips, deformed samples)."""
    from soma_cli import evaluate as E

    with np.load(io.BytesIO(lzma.decompress(Path(path).read_bytes()))) as z:
        d = {k: z[k] for k in z.files}
    n = len(d["pair"]) if not limit else min(limit, len(d["pair"]))
    bases, samples = [], []
    for i in range(n):
        gray = d["opt3"][i].astype(np.float32) / np.float32(3.0)
        ov = np.unpackbits(d["opt_valid"][i], axis=-1, count=CHIP).astype(bool)
        sv = np.unpackbits(d["sar_valid"][i], axis=-1, count=CHIP).astype(bool)
        bc = E.base_chip(str(d["pair"][i]), int(d["index"][i]), gray, ov, d["sar"][i], sv)
        if bc is None:
            continue
        bases.append(bc)
        for p in PROTOCOLS:
            samples.append((len(bases) - 1, E.deform_chip(bc, p, SEED)))
    return bases, samples


# ----------------------------------------------------------------------------- scoring


class Bench:
    """Packed chips as tensors on ``device``; :meth:`errors` runs the model on all of them."""

    def __init__(self, path: Path, device, batch: int, limit: int = 0):
        import torch

        self.torch = torch
        self.device = device
        self.batch = batch
        bases, samples = load_samples(path, limit)
        f = torch.float32

        def t(arrs):
            return torch.from_numpy(np.stack(arrs)[:, None].astype(np.float32)).to(device, f)

        self.opt = t([b.opt for b in bases])
        self.opt_valid = t([b.opt_valid for b in bases])
        self.sar0 = t([b.sar for b in bases])
        self.sar0_valid = t([b.sar_valid for b in bases])
        self.idx = torch.tensor([i for i, _ in samples], device=device)
        self.sar = t([s.sar for _, s in samples])
        self.sar_valid = t([s.sar_valid for _, s in samples])
        self.gt = torch.from_numpy(np.stack([s.gt for _, s in samples]).astype(np.float32)).to(device)
        self.protocol = np.array([s.protocol for _, s in samples])
        pairs = sorted({b.pair for b in bases})
        self.half = np.array([pairs.index(bases[i].pair) % 2 for i, _ in samples])
        self.names = [f"{bases[i].pair}/{bases[i].index}/{s.protocol}" for i, s in samples]

    def outputs(self, model, opt, ov, sar, sv):
        """The model's (flow, certainty) on stacked chips, in batches (halved on CUDA OOM)."""
        flows, certs = [], []
        i = 0
        while i < len(opt):
            sl = slice(i, i + self.batch)
            try:
                f, c = model(opt[sl], sar[sl], ov[sl], sv[sl])
            except self.torch.cuda.OutOfMemoryError:
                if self.batch == 1:
                    raise
                self.batch //= 2
                self.torch.cuda.empty_cache()
                continue
            flows.append(f.float())
            certs.append(c.float())
            i += self.batch
        return self.torch.cat(flows), self.torch.cat(certs)

    def errors(self, model) -> np.ndarray:
        """Relative RMSE (px) of every deformed sample."""
        from soma_cli import train

        torch = self.torch
        with torch.inference_mode():
            f0 = self.outputs(model, self.opt, self.opt_valid, self.sar0, self.sar0_valid)[0]
            f1 = self.outputs(model, self.opt[self.idx], self.opt_valid[self.idx], self.sar, self.sar_valid)[0]
            rel = train.relative_rmse(f0[self.idx], f1, self.gt, self.opt_valid[self.idx])
        return rel.cpu().numpy().astype(np.float64)

    def summary(self, err: np.ndarray) -> dict:
        return summarise(err, self.protocol, self.half)


def summarise(err: np.ndarray, protocol: np.ndarray, half: np.ndarray) -> dict:
    """A setting's score from its per-sample relative errors (non-finite counts as a failure)."""
    e = np.where(np.isfinite(err), err, 1e9)
    s = {"n1": int((e < 1).sum()), "n3": int((e < 3).sum()), "n": int(e.size),
         "clip5": float(np.minimum(e, 5.0).mean()), "median": float(np.median(e))}
    for p in PROTOCOLS:
        s[f"n1_{p}"] = int((e[protocol == p] < 1).sum())
    for h in (0, 1):
        s[f"n1_half{h}"] = int((e[half == h] < 1).sum())
    return s


def load_model(weights: str, checkpoint: str = ""):
    """The shipped (or given) TorchScript weights' parameters in an eager SomaNet, whose settings
    can be changed (a TorchScript module's cannot); or a ``soma train`` checkpoint (which an older
    torch than the exporting one can read)."""
    from soma_cli.model import net
    from soma_cli.model.loader import load_weights

    if checkpoint:
        from soma_cli import train

        return train.load_model_checkpoint(Path(checkpoint)).eval()
    scripted, _ = load_weights(Path(weights) if weights else None)
    model = net.build()
    net.load_state(model, {k: v.detach().clone() for k, v in scripted.state_dict().items()})
    return model.eval()


def snapshot(model) -> dict:
    """The loaded model's knobs and correlation temperatures, which :func:`apply` starts from."""
    return {"knobs": {k: getattr(model, k) for k, _ in KNOBS if not k.startswith("temp_")},
            "log_scale": model.log_scale.detach().clone()}


def apply(model, settings: Dict[str, float], base: dict) -> None:
    """Set ``settings`` on ``model`` (see :data:`KNOBS`), every other knob back to ``base``
    (:func:`snapshot`); the temperatures are factors on the base ones."""
    import torch

    for k, v in base["knobs"].items():
        setattr(model, k, v)
    with torch.no_grad():
        model.log_scale.copy_(base["log_scale"])
        for k, v in settings.items():
            if k == "temp_global":
                model.log_scale[0] += math.log(v)
            elif k == "temp_local":
                model.log_scale[1:] += math.log(v)
            else:
                if not hasattr(model, k):
                    raise SystemExit(f"error: unknown setting {k!r}: not an attribute of SomaNet")
                cur = getattr(model, k)
                setattr(model, k, type(cur)(v))


def better(new: dict, cur: dict) -> bool:
    if new["n1"] >= cur["n1"] + MIN_GAIN:
        return True
    return new["n1"] >= cur["n1"] and new["clip5"] <= cur["clip5"] - MIN_CLIP_GAIN


def _setup(a):
    import torch

    dev = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = False  # the CPU's arithmetic, as far as a GPU allows
    torch.backends.cudnn.allow_tf32 = False
    if dev.type == "cpu":
        torch.set_num_threads(a.threads)
    model = load_model(a.weights, a.checkpoint).to(dev)
    t0 = time.time()
    bench = Bench(Path(a.chips), dev, a.batch, a.limit)
    print(f"device {dev} ({torch.cuda.get_device_name(0) if dev.type == 'cuda' else 'cpu'}), "
          f"{len(bench.names)} samples prepared in {time.time() - t0:.0f} s", flush=True)
    return model, bench, snapshot(model)


def trial(model, bench: Bench, base: dict, settings: Dict[str, float]) -> Tuple[dict, np.ndarray]:
    """Score one setting: (summary with the settings and seconds, per-sample relative RMSE)."""
    apply(model, settings, base)
    t = time.time()
    err = bench.errors(model)
    return {**bench.summary(err), "settings": settings, "seconds": round(time.time() - t, 1)}, err


def _parse_set(items) -> Dict[str, float]:
    """``["knob=value", ...]`` -> ``{knob: value}``; a malformed item exits with a one-line error."""
    out = {}
    for kv in items or []:
        k, sep, v = kv.partition("=")
        try:
            if not sep or not k.strip():
                raise ValueError
            out[k.strip()] = float(v)
        except ValueError:
            raise SystemExit(f"error: bad setting {kv!r}: expected knob=number, e.g. r_aff8=4") from None
    return out


def score(a) -> None:
    model, bench, base = _setup(a)
    s, err = trial(model, bench, base, _parse_set(a.set))
    print(json.dumps(s), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        np.savez(Path(a.out) / "score.npz", err=err, names=np.array(bench.names))


def _log(log, s: dict) -> None:
    log.write(json.dumps(s) + "\n")
    log.flush()
    print(json.dumps(s), flush=True)


def search(a) -> None:
    model, bench, base = _setup(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + 60.0 * a.minutes
    cur: Dict[str, float] = _parse_set(a.set)
    per_chip = {}
    with open(out / "sweep.jsonl", "a") as log:

        def run(settings: Dict[str, float], tag: str) -> dict:
            s, err = trial(model, bench, base, settings)
            s["tag"] = tag
            _log(log, s)
            per_chip[json.dumps(settings, sort_keys=True)] = err
            return s

        start = run(dict(cur), "start")
        best = start
        for p in range(a.passes):
            changed = False
            for knob, values in KNOBS:
                for v in values:
                    if time.time() > deadline:
                        break
                    if cur.get(knob) == v:
                        continue
                    candidate = {**cur, knob: v}
                    s = run(candidate, f"pass{p}:{knob}={v}")
                    if better(s, best):
                        best, cur, changed = s, candidate, True
                        print(f"KEEP {knob}={v}: n1 {s['n1']} clip5 {s['clip5']:.3f}", flush=True)
            if not changed or time.time() > deadline:
                break
    result = {"start": start, "best": best, "settings": cur, "knobs": KNOBS,
              "rule": {"min_gain": MIN_GAIN, "min_clip_gain": MIN_CLIP_GAIN}}
    (out / "best.json").write_text(json.dumps(result, indent=1))
    k0 = json.dumps(start["settings"], sort_keys=True)
    k1 = json.dumps(cur, sort_keys=True)
    np.savez(out / "per_chip.npz", names=np.array(bench.names), start=per_chip[k0], best=per_chip[k1])
    print("RESULT", json.dumps({"settings": cur, "start_n1": start["n1"], "best_n1": best["n1"],
                                "start_clip5": start["clip5"], "best_clip5": best["clip5"]}), flush=True)


def grid(a) -> None:
    """Score each setting of a JSON list (one object per setting), streaming to OUT/grid.jsonl."""
    model, bench, base = _setup(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    errs = {}
    with open(out / "grid.jsonl", "a") as log:
        for i, settings in enumerate(json.loads(Path(a.settings).read_text())):
            s, errs[f"s{i}"] = trial(model, bench, base, settings)
            _log(log, s)
    np.savez(out / "grid_per_chip.npz", names=np.array(bench.names), **errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("data_dir")
    p.add_argument("--split", default="T11SMT")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--other", type=int, choices=(0, 1), default=0,
                   help="1: the other two chips of every pair (a second bench, to confirm a choice)")
    for name in ("search", "score", "grid"):
        q = sub.add_parser(name)
        q.add_argument("chips")
        q.add_argument("--weights", default="", help="TorchScript weights (default: the shipped ones)")
        q.add_argument("--checkpoint", default="", help="a soma train checkpoint instead of --weights")
        q.add_argument("--device", default="auto")
        q.add_argument("--batch", type=int, default=16)
        q.add_argument("--threads", type=int, default=2)
        q.add_argument("--limit", type=int, default=0, help="first N packed chips only (a quick check)")
        q.add_argument("--set", action="append", help="knob=value, the starting setting")
        q.add_argument("--out", default="" if name == "score" else None, required=name != "score")
        if name == "grid":
            q.add_argument("settings", help="JSON file: a list of {knob: value} objects")
        if name == "search":
            q.add_argument("--minutes", type=float, default=7.0)
            q.add_argument("--passes", type=int, default=3)
    a = ap.parse_args()
    {"pack": pack, "search": search, "score": score, "grid": grid}[a.cmd](a)


if __name__ == "__main__":
    main()
