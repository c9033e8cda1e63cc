"""Training data: the cache of co-registered pairs, and the samples drawn from it.

:func:`prepare` (needs rasterio through :mod:`soma_cli.io.dataset`, imported lazily) reads the
pairs, makes the optical gray, removes each training pair's residual misregistration (a robust
matcher's flow, reduced to a smooth quadratic field, clipped, applied to the SAR with
:func:`coords.warp_np`) and stores centre crops as a compact uint8 ``.npz`` cache.
:class:`TrainSamples` draws random crops of it with synthetic deformations from a mixture of the
paper- and geo-like protocols (:mod:`soma_cli.synth`), photometric and speckle augmentation;
:func:`val_chips` makes the fixed validation chips of the held-out pairs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import atomic, coords, preprocess, synth, tiling
from ..errors import ConfigError, DataError, OutputError

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

CACHE_ARRAYS = ("train_opt", "train_sar", "train_valid", "val_opt", "val_sar", "val_valid")


# ----------------------------------------------------------------------------- the cache


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


def estimate_residual(matcher, opt_std: np.ndarray, sar_std: np.ndarray, valid: np.ndarray,
                      tile: int = 512) -> Tuple[np.ndarray, np.ndarray]:
    """Residual flow and certainty of a whole pair by matching ``tile``-sized tiles
    (:func:`tiling.layout`, averaged where tiles overlap)."""
    h, w = opt_std.shape
    flow = np.zeros((2, h, w), np.float64)
    cert = np.zeros((h, w), np.float64)
    cnt = np.zeros((h, w), np.float64)
    for t in tiling.layout(h, w, tile, 0):
        sl = (t.rows, t.cols)
        v = valid[sl][None]
        f, c = matcher.match(opt_std[sl][None], sar_std[sl][None], v, v)
        flow[(slice(None),) + sl] += f[0]
        cert[sl] += c[0]
        cnt[sl] += 1.0
    cnt = np.maximum(cnt, 1.0)
    return (flow / cnt).astype(np.float32), (cert / cnt).astype(np.float32)


def centre_crop(a: np.ndarray, size: int) -> np.ndarray:
    h, w = a.shape[-2:]
    s = min(size, h, w)
    r0, c0 = (h - s) // 2, (w - s) // 2
    return a[..., r0:r0 + s, c0:c0 + s]


def _cleaned(matcher, gray: np.ndarray, sar: np.ndarray, valid: np.ndarray, max_residual_px: float,
             min_support: float) -> Tuple[np.ndarray, np.ndarray, Optional[float]]:
    """The SAR resampled to remove the pair's smooth residual misregistration, its validity, and
    the mean shift applied (``None``: too little support, the pair is left as it is)."""
    o = preprocess.standardise(gray, valid)
    s = preprocess.standardise(preprocess.sar_to_log(sar, "auto", valid), valid)
    f, c = estimate_residual(matcher, o, s, valid)
    # residuals are a few px at most: larger matches are outliers
    wgt = c * valid * (np.hypot(f[0], f[1]) < max_residual_px)
    if (wgt > 0.05).mean() < min_support:
        return sar, valid, None
    sm = smooth_residual(f, wgt)
    sar = coords.warp_np(sar, sm, order=1, edge=True)
    valid = valid & (coords.warp_np(valid.astype(np.float32), sm, order=1, cval=0.0) > 0.99)
    return sar, valid, float(np.hypot(sm[0], sm[1]).mean())


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
    from ..io.dataset import list_pairs, read_pair  # rasterio only here

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
        from ..matchers import get_matcher

        matcher = get_matcher("gradient")
    total = len(train) + len(val)
    arrays: Dict[str, list] = {k: [] for k in CACHE_ARRAYS}
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
                sar, valid, shifts[e.name] = _cleaned(matcher, gray, sar, valid, max_residual_px, min_support)
            if sar.dtype != np.uint8 and np.nanmax(sar) > 255:
                raise DataError(f"pair {e.name}: SAR is not 8-bit; the cache stores uint8 (scale it first)")
            arrays[f"{split}_opt"].append(centre_crop(np.clip(np.round(gray), 0, 255).astype(np.uint8), size))
            arrays[f"{split}_sar"].append(centre_crop(np.clip(np.round(np.nan_to_num(sar)), 0, 255).astype(np.uint8), size))
            arrays[f"{split}_valid"].append(np.packbits(centre_crop(valid, size), axis=-1))
            names[split].append(e.name)
            done += 1
            if progress is not None:
                progress(done, total, {"pair": e.name, "split": split})
    meta = {
        "data_dir": str(data_dir), "train_groups": list(train_groups), "val_groups": list(val_groups),
        "clean": clean, "clean_val": bool(clean == "gradient" and clean_val), "crop": crop, "val_crop": val_crop,
        "clean_mean_shift_px": shifts, "train_names": names["train"], "val_names": names["val"],
    }
    buf = io.BytesIO()
    np.savez_compressed(
        buf, **{k: np.stack(v) for k, v in arrays.items()},
        meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
    )
    atomic.write_bytes(out_path, buf.getvalue())
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
    for k in CACHE_ARRAYS + ("meta",):
        if k not in out:
            raise DataError(f"{path}: not a training cache (missing {k})")
    for split in ("train", "val"):
        n = out[f"{split}_opt"].shape[-1]
        out[f"{split}_valid"] = np.unpackbits(out[f"{split}_valid"], axis=-1, count=n).astype(bool)
    out["meta"] = json.loads(bytes(out["meta"]).decode())
    return out


# ----------------------------------------------------------------------------- samples


def _standardised_sar(amplitude: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return preprocess.standardise(preprocess.sar_to_log(amplitude, "amplitude", valid), valid)


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
    f = np.float32
    return {"opt": preprocess.standardise(opt, valid)[None],
            "sar": _standardised_sar(np.nan_to_num(sar_d), vs)[None],
            "opt_valid": valid[None].astype(f), "sar_valid": vs[None].astype(f), "gt": gt.astype(f),
            "sar0": _standardised_sar(sar, valid)[None], "sar0_valid": valid[None].astype(f)}


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
        if crop > min(opt.shape[-2:]):
            raise ConfigError(f"crop {crop} larger than the cached images ({opt.shape[-1]} px)")

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
        o = centre_crop(cache["val_opt"][i], chip)
        s = centre_crop(cache["val_sar"][i], chip)
        v = centre_crop(cache["val_valid"][i], chip)
        for p in protocols:
            d = synth.draw_for(p, seed, names[i], 0, o.shape[0], o.shape[1])
            smp = make_sample(o, s, v, d, None)
            smp["protocol"] = p
            out.append(smp)
    return out
