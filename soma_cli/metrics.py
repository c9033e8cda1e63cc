"""Flow accuracy metrics shared by ``soma evaluate`` and training's validation (numpy only).

Per chip, :func:`error_metrics` of an error flow over a mask: RMSE and mean of the endpoint error
and the share of pixels under 1 px.  Absolute errors compare a predicted flow with the ground truth
``D`` over :func:`eval_mask`; relative (self-consistency) errors compare the flow ``F1`` of the
deformed pair with ``F0(q) + D(q + F0(q))`` (:func:`relative_error`), which the residual
misregistration of real "co-registered" pairs does not affect.  :func:`aggregate` summarises chips
(``cmrK``: the share of chips with RMSE < K px), :func:`certainty_metrics` scores a certainty map
against "within 1 px".
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import coords

CMR_THRESHOLDS = (1, 2, 3, 5)


def error_metrics(err: np.ndarray, valid: np.ndarray) -> Dict[str, float]:
    """Per-chip statistics of an error flow ``err`` (2, H, W) over the bool mask ``valid`` (H, W).

    Returns ``rmse`` (root mean squared endpoint error), ``aepe`` (mean endpoint error), ``px1``
    (share of pixels with endpoint error < 1 px) and ``n_px``.  Non-finite errors count as infinite;
    no valid pixel gives NaN statistics.
    """
    err = np.asarray(err, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    n = int(valid.sum())
    if n == 0:
        return {"rmse": math.nan, "aepe": math.nan, "px1": math.nan, "n_px": 0}
    epe = np.hypot(err[0][valid], err[1][valid])
    epe = np.where(np.isfinite(epe), epe, np.inf)
    return {
        "rmse": float(np.sqrt(np.mean(epe**2))),
        "aepe": float(np.mean(epe)),
        "px1": float(np.mean(epe < 1.0)),
        "n_px": n,
    }


def chip_metrics(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> Dict[str, float]:
    """:func:`error_metrics` of ``pred - gt`` (flows (2, H, W)) over ``valid``."""
    return error_metrics(np.asarray(pred, np.float64) - np.asarray(gt, np.float64), valid)


def eval_mask(gt: np.ndarray, opt_valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Pixels scored against the ground truth ``gt``: ``q + gt(q)`` inside the chip, optical valid."""
    h, w = gt.shape[-2:]
    mask = coords.inside_mask_np(gt, h, w)
    if opt_valid is not None:
        mask &= np.asarray(opt_valid, bool)
    return mask


def expected_flow(f0: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Flow a consistent method predicts on the deformed pair: ``F0(q) + D(q + F0(q))``.

    ``D`` is sampled bilinearly at the displaced position (nearest edge value beyond the chip).
    """
    f0 = np.nan_to_num(np.asarray(f0, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return coords.compose_flow_np(np.asarray(d, np.float32), f0)


def relative_error(f0: np.ndarray, f1: np.ndarray, d: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Self-consistency error ``F1 - (F0 + D o (id + F0))`` (2, H, W) and where it is defined.

    The mask (H, W) holds the pixels where both ``q + F0(q)`` and the expected ``q + F1(q)`` lie inside
    the chip; non-finite ``F0``/``F1`` stay in the mask and so count as infinite errors.
    """
    f0 = np.asarray(f0, np.float32)
    f1 = np.asarray(f1, np.float32)
    h, w = f0.shape[-2:]
    exp = expected_flow(f0, d)
    f0_finite = np.nan_to_num(f0, nan=0.0, posinf=0.0, neginf=0.0)
    mask = coords.inside_mask_np(f0_finite, h, w) & coords.inside_mask_np(exp, h, w)
    return (f1.astype(np.float64) - exp.astype(np.float64)), mask


def aggregate(records: Sequence[Mapping[str, float]], prefix: str = "") -> Dict[str, float]:
    """Aggregate per-chip :func:`error_metrics` records (chips without valid pixels are dropped).

    ``cmrK`` share of chips with RMSE < K px (K in 1, 2, 3, 5), ``rmse_mean``, ``rmse_median``,
    ``aepe`` and ``px1`` (means over chips), ``n`` (chips).  Keys get ``prefix`` (e.g. ``rel_``).
    """
    recs = [r for r in records if r.get("n_px", 0) > 0]
    out: Dict[str, float] = {}
    if not recs:
        for k in CMR_THRESHOLDS:
            out[f"{prefix}cmr{k}"] = math.nan
        for k in ("rmse_mean", "rmse_median", "aepe", "px1"):
            out[prefix + k] = math.nan
        out[prefix + "n"] = 0
        return out
    rmse = np.array([r["rmse"] for r in recs], np.float64)
    for k in CMR_THRESHOLDS:
        out[f"{prefix}cmr{k}"] = float(np.mean(rmse < k))
    with np.errstate(invalid="ignore"):
        out[prefix + "rmse_mean"] = float(np.mean(rmse))
        out[prefix + "rmse_median"] = float(np.median(rmse))
        out[prefix + "aepe"] = float(np.mean([r["aepe"] for r in recs]))
    out[prefix + "px1"] = float(np.mean([r["px1"] for r in recs]))
    out[prefix + "n"] = len(recs)
    return out


def certainty_metrics(cert: np.ndarray, correct: np.ndarray, valid: np.ndarray) -> Dict[str, float]:
    """A certainty in [0, 1] against the boolean ``correct`` (the flow is within 1 px), over the
    pixels of ``valid`` (arrays of one shape): ``cert_bce``, the mean binary cross-entropy (0.693
    for a constant 0.5); ``cert_coverage``, the share of pixels with certainty above 0.5;
    ``cert_precision``, the share of those that are correct; ``uncertain_within_1px``, the share of
    the others that are correct anyway (NaN where a share has no pixels)."""
    valid = np.asarray(valid, bool)
    c = np.clip(np.asarray(cert, np.float64)[valid], 1e-6, 1.0 - 1e-6)
    ok = np.asarray(correct, bool)[valid]
    sure = c > 0.5

    def share(x: np.ndarray) -> float:
        return float(np.mean(x)) if x.size else math.nan

    return {
        "cert_bce": share(-np.where(ok, np.log(c), np.log(1.0 - c))),
        "cert_coverage": share(sure),
        "cert_precision": share(ok[sure]),
        "uncertain_within_1px": share(ok[~sure]),
    }
