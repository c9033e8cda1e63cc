"""Training of the SOMA network, in two phases.

1. :func:`prepare` (needs rasterio through :mod:`soma_cli.io.dataset`, imported lazily): reads the
   pairs, makes the optical gray, removes each training pair's residual misregistration (a robust
   matcher's flow, reduced to a smooth quadratic field, clipped, applied to the SAR with
   :func:`coords.warp_np`) and stores centre crops as a compact uint8 ``.npz`` cache.
2. :func:`fit` (torch, numpy, scipy only: runs where rasterio is absent): random crops of the cache,
   synthetic deformations from a mixture of the paper- and geo-like protocols (:mod:`soma_cli.synth`),
   photometric and speckle augmentation, multi-level robust losses, seeded validation chips of the
   held-out tile (CMR@1px, median RMSE), resumable checkpoints, progress through a callback.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import coords
from .model import geometry
from . import synth
from .infer import resolve_device
from .errors import ConfigError, DataError, OutputError, WeightsError
from .model import net as netmod
from . import preprocess

Progress = Callable[[int, int, dict], None]

TRAIN_GROUPS = ("T11SMT",)
VAL_GROUPS = ("T11SLT",)

#: Training deformation mixture: (weight, params). Paper-like large motions, geo-like small affine
#: plus local field, and near-identity chips that teach the sub-pixel end.
MIXTURE: Tuple[Tuple[float, synth.DeformParams], ...] = (
    (0.35, synth.PAPER),
    (0.40, synth.GEO),
    (0.25, synth.DeformParams(rot_deg=1.0, trans_px=4.0, scale=0.01, local_px=2.0)),
)


# ============================================================================ phase 1: prepare


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def smooth_residual(flow: np.ndarray, weight: np.ndarray, clip_px: float = 4.0, step: int = 8) -> np.ndarray:
    """Reduce a noisy residual flow to a smooth field: robust weighted quadratic fit per component
    (2 IRLS rounds), clipped to ``+-clip_px``. Returns ``(2, H, W)`` float32."""
    h, w = flow.shape[-2:]
    g = coords.base_grid_np(h, w, np.float64)
    xs = (g[0] - (w - 1) / 2.0) / max(w, 1)
    ys = (g[1] - (h - 1) / 2.0) / max(h, 1)
    basis = np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys])  # (6, H, W)
    bs = basis[:, ::step, ::step].reshape(6, -1).T
    fs = flow[:, ::step, ::step].reshape(2, -1).T.astype(np.float64)
    ws = np.asarray(weight, np.float64)[::step, ::step].ravel()
    ok = np.isfinite(fs).all(1) & np.isfinite(ws) & (ws > 0)
    if ok.sum() < 24:
        return np.zeros((2, h, w), np.float32)
    bs, fs, ws = bs[ok], fs[ok], ws[ok]
    rw = np.ones_like(ws)
    coef = np.zeros((6, 2))
    for _ in range(3):
        sw = np.sqrt(ws * rw)[:, None]
        coef, *_ = np.linalg.lstsq(bs * sw, fs * sw, rcond=None)
        res = np.hypot(*(bs @ coef - fs).T)
        c = max(3.0 * 1.4826 * float(np.median(res)), 0.5)
        rw = 1.0 / (1.0 + (res / c) ** 2)
    field_ = np.einsum("khw,kc->chw", basis, coef)
    return np.clip(field_, -clip_px, clip_px).astype(np.float32)


def _tiles(n: int, size: int) -> List[int]:
    if n <= size:
        return [0]
    k = int(math.ceil(n / size))
    return [int(round(i * (n - size) / (k - 1))) for i in range(k)]


def estimate_residual(matcher, opt_std: np.ndarray, sar_std: np.ndarray, valid: np.ndarray,
                      tile: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """Residual flow and certainty of a whole pair by matching ``tile``-sized tiles (averaged where
    tiles overlap)."""
    h, w = opt_std.shape
    flow = np.zeros((2, h, w), np.float64)
    cert = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.float64)
    th, tw = min(tile, h), min(tile, w)
    for r0 in _tiles(h, th):
        for c0 in _tiles(w, tw):
            sl = (slice(r0, r0 + th), slice(c0, c0 + tw))
            v = valid[sl][None]
            f, c = matcher.match(opt_std[sl][None], sar_std[sl][None], v, v)
            flow[(slice(None),) + sl] += f[0]
            cert[sl] += c[0]
            cnt[sl] += 1.0
    cnt = np.maximum(cnt, 1.0)
    return (flow / cnt).astype(np.float32), (cert / cnt).astype(np.float32)


def _centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[-2:]
    s = min(size, h, w)
    r0, c0 = (h - s) // 2, (w - s) // 2
    return a[..., r0:r0 + s, c0:c0 + s]


def prepare(
    data_dir: Path,
    out_path: Path,
    train_groups: Sequence[str] = TRAIN_GROUPS,
    val_groups: Sequence[str] = VAL_GROUPS,
    clean: str = "gradient",
    clean_val: bool = True,
    crop: int = 704,
    val_crop: int = 512,
    max_val_pairs: int = 8,
    max_train_pairs: int = 0,
    matcher=None,
    max_residual_px: float = 5.0,
    min_support: float = 0.25,
    overwrite: bool = False,
    progress: Optional[Progress] = None,
) -> dict:
    """Build the training cache (``.npz``, uint8) from a dataset directory; returns its summary.

    ``clean``: ``gradient`` (remove each training pair's residual misregistration, estimated with
    the gradient matcher, or ``matcher`` when given) or ``none``; ``clean_val`` cleans the
    validation pairs the same way (so that the absolute validation metric against the synthetic
    deformation is not floored by the pairs' own residual).  Training pairs are stored as
    ``crop`` centre crops and at most ``max_val_pairs`` validation pairs as ``val_crop`` crops, so that
    the 37 training pairs of s1s2_calif fit in about 35 MB.
    """
    from .io.dataset import list_pairs, read_pair  # rasterio only here

    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise OutputError(f"{out_path} exists (use --overwrite)")
    if not out_path.parent.is_dir():
        raise OutputError(f"{out_path.parent}: output folder does not exist")
    if clean not in ("gradient", "none"):
        raise ConfigError(f"unknown cleaning {clean!r}; expected gradient or none")
    train = list_pairs(data_dir, list(train_groups))
    val = list_pairs(data_dir, list(val_groups))
    if max_train_pairs:
        train = train[:max_train_pairs]
    val = val[:max_val_pairs] if max_val_pairs else val
    if clean == "gradient" and matcher is None:
        from .matchers import get_matcher

        matcher = get_matcher("gradient")
    total = len(train) + len(val)
    arrays: Dict[str, list] = {k: [] for k in ("train_opt", "train_sar", "train_valid", "val_opt", "val_sar",
                                               "val_valid")}
    names: Dict[str, list] = {"train": [], "val": []}
    shifts: Dict[str, Optional[float]] = {}
    done = 0
    for split, entries, size in (("train", train, crop), ("val", val, val_crop)):
        for e in entries:
            p = read_pair(e)
            gray = preprocess.optical_to_gray(preprocess.select_bands(p.opt))
            valid = p.opt_valid & p.sar_valid & np.isfinite(gray) & np.isfinite(p.sar)
            sar = np.asarray(p.sar, np.float32)
            if clean == "gradient" and (split == "train" or clean_val):
                o = preprocess.standardise(gray, valid)
                s = preprocess.standardise(preprocess.sar_to_log(sar, "auto", valid), valid)
                f, c = estimate_residual(matcher, o, s, valid)
                # residuals are a few px at most: larger matches are outliers; too little support
                # (the matcher failed on this pair) leaves the pair as it is
                wgt = c * valid * (np.hypot(f[0], f[1]) < max_residual_px)
                if (wgt > 0.05).mean() >= min_support:
                    sm = smooth_residual(f, wgt)
                    sar = coords.warp_np(sar, sm, order=1, edge=True)
                    vw = coords.warp_np(valid.astype(np.float32), sm, order=1, cval=0.0) > 0.99
                    valid = valid & vw
                    shifts[e.name] = float(np.hypot(sm[0], sm[1]).mean())
                else:
                    shifts[e.name] = None
            if sar.dtype != np.uint8 and np.nanmax(sar) > 255:
                raise DataError(f"pair {e.name}: SAR is not 8-bit; the cache stores uint8 (scale it first)")
            arrays[f"{split}_opt"].append(_centre_crop(np.clip(np.round(gray), 0, 255).astype(np.uint8), size))
            arrays[f"{split}_sar"].append(_centre_crop(np.clip(np.round(np.nan_to_num(sar)), 0, 255).astype(np.uint8), size))
            arrays[f"{split}_valid"].append(np.packbits(_centre_crop(valid, size), axis=-1))
            names[split].append(e.name)
            done += 1
            if progress is not None:
                progress(done, total, {"pair": e.name, "split": split})
    meta = {
        "data_dir": str(data_dir), "train_groups": list(train_groups), "val_groups": list(val_groups),
        "clean": clean, "clean_val": bool(clean == "gradient" and clean_val), "crop": crop, "val_crop": val_crop, "clean_mean_shift_px": shifts,
        "train_names": names["train"], "val_names": names["val"],
    }
    buf = io.BytesIO()
    np.savez_compressed(
        buf, **{k: np.stack(v) for k, v in arrays.items()},
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    _atomic_write_bytes(out_path, buf.getvalue())
    meta["bytes"] = out_path.stat().st_size
    return meta


def load_cache(path: Path) -> dict:
    """Read a cache written by :func:`prepare` (no rasterio needed)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: training cache not found (run the prepare phase)")
    try:
        with np.load(path) as z:
            out = {k: z[k] for k in z.files}
    except Exception as exc:  # corrupt archive
        raise DataError(f"{path}: unreadable training cache ({exc})") from None
    for k in ("train_opt", "train_sar", "train_valid", "val_opt", "val_sar", "val_valid", "meta"):
        if k not in out:
            raise DataError(f"{path}: not a training cache (missing {k})")
    n = out["train_opt"].shape[-1]
    out["train_valid"] = np.unpackbits(out["train_valid"], axis=-1, count=n).astype(bool)
    nv = out["val_opt"].shape[-1]
    out["val_valid"] = np.unpackbits(out["val_valid"], axis=-1, count=nv).astype(bool)
    out["meta"] = json.loads(bytes(out["meta"]).decode())
    return out


# ============================================================================ samples


def _standardise_pair(opt: np.ndarray, sar_amp: np.ndarray, vo: np.ndarray, vs: np.ndarray):
    o = preprocess.standardise(opt, vo)
    s = preprocess.standardise(preprocess.sar_to_log(np.where(vs, sar_amp, 0.0), "amplitude", vs), vs)
    return o, s


def make_sample(opt: np.ndarray, sar: np.ndarray, valid: np.ndarray, defo: synth.Deformation,
                rng: Optional[np.random.Generator] = None) -> Dict[str, np.ndarray]:
    """One training/validation sample from co-registered crops: the SAR is deformed by ``defo``;
    with ``rng``, photometric (optical) and speckle (SAR) augmentation are applied.

    The undeformed SAR (``sar0``, same augmentation) comes along, for the self-consistency loss and
    the relative validation metric: the flow on the deformed pair should be the flow on the
    undeformed pair followed by the deformation, whatever the pair's own residual misregistration."""
    opt = opt.astype(np.float32)
    sar = sar.astype(np.float32)
    if rng is not None:
        x = np.clip(opt / 255.0, 0, 1) ** float(np.exp(rng.uniform(-0.4, 0.4)))
        x = x * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
        x = x + rng.normal(0, rng.uniform(0, 0.02), x.shape)
        opt = (x * 255.0).astype(np.float32)
        if rng.random() < 0.7:  # multiplicative speckle: amplitude * sqrt(Gamma(L, 1/L))
            looks = rng.uniform(3.0, 30.0)
            sar = sar * np.sqrt(rng.gamma(looks, 1.0 / looks, sar.shape)).astype(np.float32)
    gt = defo.forward()
    back = defo.backward()
    sar_d = coords.warp_np(sar, back, order=1, cval=np.nan)
    vs = coords.warp_np(valid.astype(np.float32), back, order=1, cval=0.0) > 0.99
    vs &= np.isfinite(sar_d)
    sar_d = np.nan_to_num(sar_d)
    o, s = _standardise_pair(opt, sar_d, valid, vs)
    _, s0 = _standardise_pair(opt, sar, valid, valid)
    f = np.float32
    return {"opt": o[None], "sar": s[None], "opt_valid": valid[None].astype(f), "sar_valid": vs[None].astype(f),
            "gt": gt.astype(f), "sar0": s0[None], "sar0_valid": valid[None].astype(f)}


def draw_mixture(rng: np.random.Generator, h: int, w: int) -> synth.Deformation:
    weights = np.array([m[0] for m in MIXTURE])
    k = int(rng.choice(len(MIXTURE), p=weights / weights.sum()))
    return synth.draw(rng, h, w, MIXTURE[k][1])


class TrainSamples(torch.utils.data.Dataset):
    """Deterministic random samples: sample ``i`` depends only on ``(seed, i)`` (resumable)."""

    def __init__(self, opt: np.ndarray, sar: np.ndarray, valid: np.ndarray, crop: int, seed: int,
                 length: int = 10**9):
        self.opt, self.sar, self.valid = opt, sar, valid
        self.crop, self.seed, self.length = crop, seed, length
        n = opt.shape[-1]
        if crop > min(opt.shape[-2:]):
            raise ConfigError(f"crop {crop} larger than the cached images ({n} px)")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        rng = synth.rng_for(self.seed, "train", int(i))
        k = int(rng.integers(len(self.opt)))
        hh, ww = self.opt.shape[-2:]
        c = self.crop
        r0 = int(rng.integers(0, hh - c + 1))
        c0 = int(rng.integers(0, ww - c + 1))
        sl = (k, slice(r0, r0 + c), slice(c0, c0 + c))
        o, s, v = self.opt[sl], self.sar[sl], self.valid[sl]
        rot = int(rng.integers(4))
        if rot:
            o, s, v = np.rot90(o, rot), np.rot90(s, rot), np.rot90(v, rot)
        if rng.random() < 0.5:
            o, s, v = o[:, ::-1], s[:, ::-1], v[:, ::-1]
        smp = make_sample(np.ascontiguousarray(o), np.ascontiguousarray(s), np.ascontiguousarray(v),
                          draw_mixture(rng, c, c), rng)
        return {k2: torch.from_numpy(np.ascontiguousarray(v2)) for k2, v2 in smp.items()}


def val_chips(cache: dict, chip: int, seed: int = 0, protocols: Sequence[str] = ("paper", "geo"),
              max_pairs: int = 12) -> List[Dict[str, np.ndarray]]:
    """Fixed, seeded validation chips (centre ``chip`` crop of each held-out pair, per protocol)."""
    out = []
    names = cache["meta"].get("val_names", [str(i) for i in range(len(cache["val_opt"]))])
    for i in range(min(len(cache["val_opt"]), max_pairs)):
        o = _centre_crop(cache["val_opt"][i], chip)
        s = _centre_crop(cache["val_sar"][i], chip)
        v = _centre_crop(cache["val_valid"][i], chip)
        for p in protocols:
            d = synth.draw_for(p, seed, names[i], 0, o.shape[0], o.shape[1])
            smp = make_sample(o, s, v, d, None)
            smp["protocol"] = p
            out.append(smp)
    return out


# ============================================================================ losses and metrics


def _charb(d: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return torch.sqrt((d * d).sum(1, keepdim=True) + eps * eps)


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp(min=1.0)


def gt_mask(gt: torch.Tensor, opt_valid: torch.Tensor, sar_valid: torch.Tensor) -> torch.Tensor:
    """Where the ground truth is usable: optical valid, and its match inside the valid SAR."""
    h, w = gt.shape[-2:]
    sv = geometry.warp(sar_valid, gt)
    return opt_valid * geometry.inside_mask(gt, h, w) * (sv > 0.99).to(gt.dtype)


def global_target(model: netmod.SomaNet, gt: torch.Tensor, mask: torch.Tensor,
                  scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index into the flattened global scores ``(B, K * n * n)`` of the (rotation, translation)
    hypothesis nearest to the ground truth, and whether it lies inside the hypothesis set.

    The ground truth is reduced to a weighted affine at stride 8; its rotation picks the hypothesis
    ``k``, and the translation is the one that, after that rotation, maps the level centre where
    the ground-truth affine does."""
    b, k, n, _ = scores.shape
    g8 = geometry.downsample_flow(gt, 8)
    h8, w8 = g8.shape[-2:]
    m8 = (F.avg_pool2d(mask, 8) > 0.99).to(gt.dtype).flatten(1)
    pts = netmod.grid_points(b, h8, w8, gt.device, gt.dtype)
    a = geometry.fit_affine(pts, pts + g8.flatten(2).transpose(1, 2), m8)
    theta = torch.atan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1]) * (180.0 / math.pi)
    kk = torch.round((theta + model.max_rotation) / model.rotation_step).long()
    ok = (kk >= 0) & (kk < k)
    kk = kk.clamp(0, k - 1)
    rot = model.rotation_affines(b, h8, w8, gt.device, gt.dtype).view(b, k, 2, 3)[torch.arange(b, device=gt.device), kk]
    c = torch.tensor([(w8 - 1) / 2.0, (h8 - 1) / 2.0], device=gt.device, dtype=gt.dtype).expand(b, 2)
    p = torch.bmm(a[:, :, :2], c.unsqueeze(-1)).squeeze(-1) + a[:, :, 2]  # where the centre goes
    s = torch.linalg.solve(rot[:, :, :2], (p - rot[:, :, 2]).unsqueeze(-1)).squeeze(-1) - c
    r = (n - 1) // 2
    ix = torch.round(s[:, 0]).long() + r
    iy = torch.round(s[:, 1]).long() + r
    ok = ok & (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (m8.sum(1) > 0.25 * m8.shape[1])
    idx = kk * n * n + iy.clamp(0, n - 1) * n + ix.clamp(0, n - 1)
    return idx, ok


def match_ce(model: netmod.SomaNet, fo: torch.Tensor, fs: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor,
             stride: int, temp: int, r: int = 3, agg: int = 7) -> torch.Tensor:
    """Descriptor matching loss at one level: with the SAR descriptors warped by the ground truth,
    the window correlation the network matches with (:func:`net.window_zncc`) should peak at zero
    displacement (cross-entropy)."""
    g = geometry.downsample_flow(gt, stride)
    m = (F.avg_pool2d(mask, stride) > 0.99).to(gt.dtype)
    corr = netmod.window_zncc(fo, geometry.warp(fs, g), r, agg) * model.log_scale[temp].exp()
    target = torch.full(corr[:, 0].shape, r * (2 * r + 1) + r, dtype=torch.long, device=gt.device)
    ce = F.cross_entropy(corr.float(), target, reduction="none").unsqueeze(1)
    return _masked_mean(ce, m)


def compute_loss(out: Dict[str, torch.Tensor], gt: torch.Tensor, mask: torch.Tensor,
                 opt_valid: torch.Tensor, model: netmod.SomaNet) -> Tuple[torch.Tensor, Dict[str, float]]:
    """Multi-level robust loss (see module doc). Returns the total and its parts."""
    parts: Dict[str, torch.Tensor] = {}
    parts["flow"] = _masked_mean(_charb(out["flow"] - gt), mask)
    for s, key in ((2, "flow2"), (4, "flow4")):
        g = geometry.downsample_flow(gt, s)
        m = (F.avg_pool2d(mask, s) > 0.99).to(gt.dtype)
        parts[key] = _masked_mean(_charb((out[key] - g) * s), m)
    g8 = geometry.downsample_flow(gt, 8)
    m8 = (F.avg_pool2d(mask, 8) > 0.99).to(gt.dtype)
    h8, w8 = g8.shape[-2:]
    for key in ("affine_global", "affine8", "affine4"):
        af = geometry.affine_to_flow(geometry.scale_affine(out[key], 8.0), h8, w8)
        parts[key] = _masked_mean(_charb((af - g8) * 8.0, 1.0), m8)
    # global hypotheses: cross-entropy towards the ground-truth (rotation, translation) bin
    scores = out["global_scores"]
    idx, ok = global_target(model, gt, mask, scores)
    ce = F.cross_entropy(scores.flatten(1).float(), idx, reduction="none")
    okf = ok.to(ce.dtype)
    parts["global_ce"] = (ce * okf).sum() / okf.sum().clamp(min=1.0)
    # descriptor matching at strides 4 and 2
    parts["match4"] = match_ce(model, out["desc_opt4"], out["desc_sar4"], gt, mask, 4, 3)
    parts["match2"] = match_ce(model, out["desc_opt2"], out["desc_sar2"], gt, mask, 2, 4)
    # certainty: BCE towards "error < 1 px" (0 where there is no valid match)
    target = certainty_target(out["flow"], gt, mask)
    bce = F.binary_cross_entropy_with_logits(out["logit"].float(), target.float(), reduction="none")
    parts["cert"] = _masked_mean(bce, opt_valid)
    weights = {"flow": 1.0, "flow2": 1.0, "flow4": 1.0, "affine_global": 0.1, "affine8": 0.3, "affine4": 0.3,
               "global_ce": 0.3, "match4": 0.5, "match2": 0.5, "cert": 0.3}
    total = sum(weights[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def chip_rmse(flow: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-chip RMSE (px) of the flow error over the mask: ``(B,)``."""
    e2 = ((flow - gt) ** 2).sum(1, keepdim=True)
    return torch.sqrt((e2 * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1.0))


def _consistency_target(flow0: torch.Tensor, gt: torch.Tensor,
                        opt_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a self-consistent flow on the deformed pair is, ``flow0`` followed by ``D`` (``gt``),
    and where that is defined (both displaced positions inside the chip, optical valid)."""
    h, w = gt.shape[-2:]
    expected = geometry.compose_flow(gt, flow0)
    mask = opt_valid * geometry.inside_mask(flow0, h, w) * geometry.inside_mask(expected, h, w)
    return expected, mask


def consistency_loss(flow0: torch.Tensor, flow1: torch.Tensor, gt: torch.Tensor,
                     opt_valid: torch.Tensor) -> torch.Tensor:
    """Self-consistency (the relative metric of ``soma evaluate``, as a loss): the flow ``flow1`` on
    the deformed pair should equal ``flow0 + D(q + flow0)``, the flow on the undeformed pair followed
    by the known deformation ``D`` (``gt``).  Independent of the pair's own misregistration."""
    expected, mask = _consistency_target(flow0, gt, opt_valid)
    return _masked_mean(_charb(flow1 - expected), mask)


def relative_rmse(flow0: torch.Tensor, flow1: torch.Tensor, gt: torch.Tensor, opt_valid: torch.Tensor) -> torch.Tensor:
    """Per-chip self-consistency RMSE ``(B,)`` (see :func:`consistency_loss`)."""
    expected, mask = _consistency_target(flow0, gt, opt_valid)
    return chip_rmse(flow1, expected, mask)


def certainty_target(flow: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the certainty should say: 1 where the flow is within 1 px of ``ref`` (and ``mask`` is
    set), else 0.  ``ref`` is the synthetic ground truth (:func:`compute_loss`), or, for
    ``only="certainty"`` and the validation, the self-consistent flow of :func:`_consistency_target`,
    which the pair's own residual misregistration does not pollute."""
    err = torch.sqrt(((flow.detach() - ref) ** 2).sum(1, keepdim=True))
    return mask * (err < 1.0).to(ref.dtype)


def consistency_certainty_target(flow0: torch.Tensor, flow: torch.Tensor, gt: torch.Tensor,
                                 opt_valid: torch.Tensor, match: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(target, defined): the target is 1 where the flow on the deformed pair is within 1 px of the
    undeformed pair's flow followed by the deformation, else 0; ``defined`` is where that comparison
    exists (:func:`_consistency_target`'s mask times ``match``, the caller's :func:`gt_mask`)."""
    expected, cmask = _consistency_target(flow0, gt, opt_valid)
    defined = cmask * match
    return certainty_target(flow, expected, defined), defined


def certainty_params(model: netmod.SomaNet) -> List[torch.nn.Parameter]:
    """Freeze the network except its certainty calibration (:attr:`SomaNet.cert_w`, 4 numbers): the
    flow, and every other output, stay exactly as they are.  Returns the trainable parameters.

    (Before 0.7.0 this trained the certainty row of the final head's last convolution, a readout
    of 16 learnt features; it learnt a constant, see the model card.  The calibration reads the
    dense stages' consensus supports, which rank right and wrong pixels well.)"""
    for p in model.parameters():
        p.requires_grad_(False)
    model.cert_w.requires_grad_(True)
    return [model.cert_w]


@torch.no_grad()
def validate(model: torch.nn.Module, chips: List[Dict[str, np.ndarray]], device: torch.device,
             batch_size: int = 4) -> dict:
    """Per protocol and overall: the relative (self-consistency) CMR@1px and median RMSE, which
    select checkpoints, and the absolute ones against the synthetic deformation."""
    was = model.training
    model.eval()
    rmses: List[float] = []
    rel: List[float] = []
    protos: List[str] = []
    bce_sum, n_px = 0.0, 0.0
    hits = np.zeros((2, 2))  # [certainty > 0.5, target] pixel counts
    for i in range(0, len(chips), batch_size):
        group = chips[i:i + batch_size]
        t = {k: torch.from_numpy(np.stack([c[k] for c in group])).to(device)
             for k in ("opt", "sar", "opt_valid", "sar_valid", "gt", "sar0", "sar0_valid")}
        flow, cert = model(t["opt"], t["sar"], t["opt_valid"], t["sar_valid"])
        flow0, _ = model(t["opt"], t["sar0"], t["opt_valid"], t["sar0_valid"])
        m = gt_mask(t["gt"], t["opt_valid"], t["sar_valid"])
        tgt, _ = consistency_certainty_target(flow0.float(), flow.float(), t["gt"], t["opt_valid"], m)
        c = cert.float().clamp(1e-6, 1.0 - 1e-6)
        ov = t["opt_valid"]
        bce_sum += float((-(tgt * c.log() + (1.0 - tgt) * (1.0 - c).log()) * ov).sum())
        n_px += float(ov.sum())
        sure = (c > 0.5).to(ov.dtype)
        for a in (0, 1):
            for b in (0, 1):
                sa = sure if a else 1.0 - sure
                tb = tgt if b else 1.0 - tgt
                hits[a, b] += float((sa * tb * ov).sum())
        rmses += chip_rmse(flow.float(), t["gt"], m).cpu().tolist()
        rel += relative_rmse(flow0.float(), flow.float(), t["gt"], t["opt_valid"]).cpu().tolist()
        protos += [c["protocol"] for c in group]
    model.train(was)
    r = np.array(rmses)
    q = np.array(rel)
    res = {"rel_cmr1": float((q < 1.0).mean()) if q.size else float("nan"),
           "rel_median_rmse": float(np.median(q)) if q.size else float("nan"),
           "cmr1": float((r < 1.0).mean()) if r.size else float("nan"),
           "median_rmse": float(np.median(r)) if r.size else float("nan"), "n": int(r.size),
           # the certainty against "within 1 px of the self-consistent flow" (consistency_certainty_target):
           # binary cross-entropy (0.693 for a constant 0.5), the share of valid pixels above 0.5, and
           # how often those (and the others) are within 1 px
           "cert_bce": bce_sum / max(n_px, 1.0),
           "cert_coverage": float(hits[1].sum() / max(hits.sum(), 1.0)),
           "cert_precision": float(hits[1, 1] / hits[1].sum()) if hits[1].sum() > 0 else float("nan"),
           "uncertain_within_1px": float(hits[0, 1] / hits[0].sum()) if hits[0].sum() > 0 else float("nan")}
    for p in sorted(set(protos)):
        sel = np.array(protos) == p
        res[f"rel_cmr1_{p}"] = float((q[sel] < 1.0).mean())
        res[f"rel_median_rmse_{p}"] = float(np.median(q[sel]))
        res[f"cmr1_{p}"] = float((r[sel] < 1.0).mean())
        res[f"median_rmse_{p}"] = float(np.median(r[sel]))
    return res


# ============================================================================ fit


@dataclass
class FitConfig:
    steps: int = 20000
    time_budget_min: float = 0.0  # 0: no time limit
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    device: str = "auto"
    workers: int = 0
    val_chip: int = 256
    val_pairs: int = 12
    val_every: int = 200
    ckpt_every_s: float = 120.0
    warmup: float = 0.03
    init: str = ""  # start from this checkpoint's model weights (fresh optimizer and schedule)
    consistency: float = 1.0  # weight of the self-consistency loss (0: off, one forward pass per step)
    absolute: float = 0.3  # weight of the losses against the synthetic deformation
    only: str = ""  # "certainty": train only the certainty calibration (the flow stays exactly as it is)


def _lr_at(frac: float, cfg: FitConfig) -> float:
    if frac < cfg.warmup:
        return cfg.lr * max(frac / cfg.warmup, 0.02)
    t = min((frac - cfg.warmup) / max(1.0 - cfg.warmup, 1e-6), 1.0)
    return cfg.lr * (0.03 + 0.97 * 0.5 * (1.0 + math.cos(math.pi * t)))


def _atomic_torch_save(obj, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write_bytes(path, buf.getvalue())


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _score(val: dict, only: str) -> Tuple[float, float]:
    """What selects ``best.pt`` (higher first, then lower second): the relative CMR@1px and median
    RMSE, or, when only the certainty trains, the negated certainty cross-entropy."""
    if only == "certainty":
        return -val["cert_bce"], 0.0
    return val["rel_cmr1"], val["rel_median_rmse"]


def _better(val: dict, best: float, best_rmse: float, only: str = "") -> bool:
    """Best checkpoint: higher relative CMR@1px, ties broken by a lower relative median RMSE (or a
    lower certainty cross-entropy when only the certainty trains)."""
    score, rmse = _score(val, only)
    if score != best:
        return score > best
    return not (rmse > best_rmse)


def check_only(only: str) -> None:
    """``FitConfig.only`` / ``soma train --only``: empty (train everything) or ``certainty``."""
    if only not in ("", "certainty"):
        raise ConfigError(f"unknown --only {only!r}; expected certainty")


def fit(cache_path: Path, out_dir: Path, cfg: FitConfig, progress: Optional[Progress] = None) -> dict:
    """Train (or resume) into ``out_dir``: ``ckpt.pt`` (resumable), ``model.pt`` (latest weights),
    ``best.pt`` (best validation CMR@1px, ties broken by median RMSE), ``log.jsonl``.  With
    ``cfg.init`` and no ``ckpt.pt`` yet, the model starts from that checkpoint's weights (fine-tuning:
    fresh optimizer and schedule); an existing ``ckpt.pt`` is resumed instead. Returns the final summary."""
    check_only(cfg.only)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cache = load_cache(cache_path)
    data = TrainSamples(cache["train_opt"], cache["train_sar"], cache["train_valid"], cfg.crop, cfg.seed)
    chips = val_chips(cache, cfg.val_chip, seed=cfg.seed, max_pairs=cfg.val_pairs)

    torch.manual_seed(cfg.seed)
    model = netmod.build().to(device)
    if cfg.only == "certainty":  # no weight decay: it would pull the calibration towards zero
        opt = torch.optim.AdamW(certainty_params(model), lr=cfg.lr, weight_decay=0.0)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed_before, best, best_rmse = 0, 0.0, -1.0, math.inf
    history: List[dict] = []
    ckpt_path = out_dir / "ckpt.pt"
    if ckpt_path.is_file():  # resume (takes precedence over cfg.init)
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        netmod.load_state(model, ck["model"])
        try:
            opt.load_state_dict(ck["optimizer"])
        except ValueError:
            raise WeightsError(f"{ckpt_path}: written by an older SOMA whose parameters differ; "
                               "start a new run folder with --init instead of resuming") from None
        step, elapsed_before, best = int(ck["step"]), float(ck["elapsed"]), float(ck.get("best", -1.0))
        best_rmse = float(ck.get("best_rmse", math.inf))
        history = list(ck.get("history", []))
        torch.set_rng_state(ck["torch_rng"])
    elif cfg.init:
        model.load_state_dict(load_model_checkpoint(Path(cfg.init)).state_dict())  # cert_w filled there
        model.to(device)
    budget_s = cfg.time_budget_min * 60.0
    total_s = elapsed_before + budget_s if budget_s > 0 else 0.0

    def state(val: Optional[dict]) -> dict:
        return {"config": asdict(cfg), "step": step, "val": val, "arch": "SomaNet",
                "params": netmod.n_params(model)}

    def save(val: Optional[dict]) -> None:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _atomic_torch_save({"model": sd, "optimizer": opt.state_dict(), "step": step,
                            "elapsed": elapsed_before + (time.time() - t0), "best": best,
                            "best_rmse": best_rmse, "history": history, "torch_rng": torch.get_rng_state(), "config": asdict(cfg)},
                           ckpt_path)
        _atomic_torch_save({"model": sd, **state(val)}, out_dir / "model.pt")

    def save_best(val: dict) -> None:
        nonlocal best, best_rmse
        best, best_rmse = _score(val, cfg.only)
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        _atomic_torch_save({"model": sd, **state(val)}, out_dir / "best.pt")

    def log(rec: dict) -> None:
        with open(out_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    loader = torch.utils.data.DataLoader(
        data, batch_size=cfg.batch_size, sampler=range(step * cfg.batch_size, cfg.steps * cfg.batch_size),
        num_workers=cfg.workers, worker_init_fn=_worker_init if cfg.workers > 0 else None,
        persistent_workers=False, pin_memory=device.type == "cuda", drop_last=True,
    )
    t0 = time.time()
    last_ckpt = t0
    val: Optional[dict] = history[-1]["val"] if history and history[-1].get("val") else None
    if step == 0 and not history:
        # the starting point is a candidate too: training must beat it to replace best.pt
        val = validate(model, chips, device)
        history.append({"step": 0, "val": val})
        save_best(val)
        log({"step": 0, "val": val})
    # the network has no dropout or batch statistics: eval mode only skips the training-only
    # descriptors, which certainty training does not use
    model.train(cfg.only != "certainty")
    ema: Optional[float] = None
    stop_reason = "steps"
    for batch in (loader if step < cfg.steps else []):
        now = time.time()
        frac = step / max(cfg.steps, 1)
        if total_s > 0:
            frac = max(frac, (elapsed_before + now - t0) / total_s)
            if now - t0 >= budget_s:
                stop_reason = "time budget"
                break
        lr = _lr_at(frac, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model.run(b["opt"], b["sar"], b["opt_valid"], b["sar_valid"])
        mask = gt_mask(b["gt"], b["opt_valid"], b["sar_valid"])
        if cfg.only == "certainty":
            with torch.no_grad():
                flow0 = model.run(b["opt"], b["sar0"], b["opt_valid"], b["sar0_valid"])["flow"]
            tgt, _ = consistency_certainty_target(flow0, out["flow"], b["gt"], b["opt_valid"], mask)
            loss = _masked_mean(F.binary_cross_entropy_with_logits(out["logit"].float(), tgt.float(),
                                                                   reduction="none"), b["opt_valid"])
            parts = {"cert": float(loss.detach())}
        else:
            loss, parts = compute_loss(out, b["gt"], mask, b["opt_valid"], model)
        if cfg.consistency > 0 and cfg.only != "certainty":
            out0 = model.run(b["opt"], b["sar0"], b["opt_valid"], b["sar0_valid"])
            cons = consistency_loss(out0["flow"], out["flow"], b["gt"], b["opt_valid"])
            parts["consistency"] = float(cons.detach())
            loss = cfg.absolute * loss + cfg.consistency * cons
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
        step += 1
        lv = float(loss.detach())
        ema = lv if ema is None or not math.isfinite(ema) else 0.95 * ema + 0.05 * lv
        rec = {"step": step, "loss": lv, "lr": lr, **parts, "t": elapsed_before + time.time() - t0}
        if step % cfg.val_every == 0 or step == cfg.steps:
            val = validate(model, chips, device)
            rec["val"] = val
            history.append({"step": step, "val": val})
            if _better(val, best, best_rmse, cfg.only):
                save_best(val)
        log(rec)
        if time.time() - last_ckpt >= cfg.ckpt_every_s or "val" in rec:
            save(val)
            last_ckpt = time.time()
        if progress is not None:
            info = {"loss": ema, "lr": lr, "elapsed": elapsed_before + time.time() - t0}
            if val is not None:
                info["val_cmr1"] = val["rel_cmr1"]
                info["val_median_rmse"] = val["rel_median_rmse"]
            progress(step, cfg.steps, info)
    final_val = validate(model, chips, device)
    history.append({"step": step, "val": final_val})
    if _better(final_val, best, best_rmse, cfg.only):
        save_best(final_val)
    save(final_val)
    log({"step": step, "final_val": final_val, "stop": stop_reason})
    return {"step": step, "val": final_val, "best_cmr1": best, "stop": stop_reason,
            "elapsed_s": elapsed_before + time.time() - t0, "out_dir": str(out_dir),
            "device": str(device), "params": netmod.n_params(model)}


def load_model_checkpoint(path: Path) -> torch.nn.Module:
    """Eager model from ``model.pt``/``best.pt``/``ckpt.pt`` written by :func:`fit`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        model = netmod.build()
        netmod.load_state(model, ck["model"])
    except Exception as exc:
        raise WeightsError(f"{path}: not a SOMA training checkpoint ({type(exc).__name__}: {exc})") from None
    model.eval()
    return model


def export(checkpoint: Path, out_path: Path, overwrite: bool = False, training_data: str = "",
           training_command: str = "") -> dict:
    """TorchScript-compile a checkpoint (on CPU), write ``out_path`` atomically plus its metadata
    JSON (sha256, version, tile sizes, preprocessing, training provenance), verify by reloading."""
    import datetime

    from . import __version__
    from .model import loader

    out_path = Path(out_path)
    meta_path = loader.metadata_path(out_path)
    if out_path.suffix != ".pt":
        raise ConfigError(f"{out_path}: the weights file name must end in .pt")
    if not out_path.parent.is_dir():
        raise OutputError(f"{out_path.parent}: output folder does not exist")
    if (out_path.exists() or meta_path.exists()) and not overwrite:
        raise OutputError(f"{out_path} exists (use --overwrite)")
    model = load_model_checkpoint(checkpoint).cpu().eval()
    ck = torch.load(Path(checkpoint), map_location="cpu", weights_only=False)
    scripted = torch.jit.script(model)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    data = buf.getvalue()
    import hashlib

    meta = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "version": __version__,
        "arch": "SomaNet",
        "params": netmod.n_params(model),
        "tile_multiple": netmod.TILE_MULTIPLE,
        "recommended_tile": 512,
        "preprocessing": preprocess.PREPROCESSING,
        "training_data": training_data,
        "training_command": training_command,
        "training_step": ck.get("step"),
        "validation": ck.get("val"),
        "date": datetime.date.today().isoformat(),
    }
    _atomic_write_bytes(out_path, data)
    _atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    loaded, _ = loader.load_weights(out_path, device="cpu")  # verify
    x = torch.zeros(1, 1, 64, 64)
    loaded(x, x)
    return meta
