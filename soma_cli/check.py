"""The run-time error estimate: a self-consistency check that needs no ground truth (numpy only).

A matcher gave the flow ``F0`` for a batch of tiles (optical, SAR on the optical grid).  The SAR
tile is deformed by a known smooth deformation ``D`` (:func:`deformation`: a drawn
:class:`~soma_cli.synth.Deformation` of a few pixels, a small rotation and scale and a smooth local
field, the same for every tile of a size) and matched again: ``F1``.  A matcher that is right
predicts ``F1 = F0 + D o (id + F0)`` (:func:`soma_cli.metrics.expected_flow`); the endpoint length
of the difference (:func:`soma_cli.metrics.relative_error`, the self-consistency error that
``soma evaluate`` reports as ``rel_``) at each optical pixel is the raw estimate.  It is made a
local value (:func:`local_error`): the median over :data:`BLOCK` px blocks, then the median of
those over :data:`WINDOW_BLOCKS` x :data:`WINDOW_BLOCKS` blocks (48 px), so it marks regions, not
pixels; NaN where there is no estimate (no valid optical pixel, or a match leaving the tile).

What it sees: a matcher whose answer moves when the content moves by a few pixels, the way its
errors do on untextured ground, water and steep terrain.  What it cannot see: an error that follows
the content (a wrong answer given again, moved with ``D``).  It costs one more matcher pass.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from . import synth
from .metrics import relative_error
from .preprocess import standardise

#: the check's deformation: up to 4 px shift, 1 degree, 1 % scale, a 2 px smooth local field
PARAMS = synth.DeformParams(rot_deg=1.0, trans_px=4.0, scale=0.01, local_px=2.0)
SEED = 0
BLOCK = 16  # px: the raw estimate's median is taken per block
WINDOW_BLOCKS = 3  # blocks: the local value is the median of the block medians around a block
MIN_BLOCK_SHARE = 0.25  # a block with fewer pixels with an estimate has none
CAP_PX = 50.0  # px: a non-finite or larger error counts as this

MatchFn = Callable[..., Tuple[np.ndarray, np.ndarray]]


def deformation(h: int, w: int) -> synth.Deformation:
    """The check's deformation of an ``h x w`` tile (seeded: the same on every run and machine)."""
    return synth.draw(synth.rng_for(SEED, "check", h, w), h, w, PARAMS)


def deform(sar: np.ndarray, sar_valid: Optional[np.ndarray], d: synth.Deformation) -> Tuple[np.ndarray, np.ndarray]:
    """The SAR tile (B, H, W) deformed by ``d`` and standardised again, and where it is valid."""
    sar = np.asarray(sar, np.float32)
    valid = np.ones(sar.shape, bool) if sar_valid is None else np.asarray(sar_valid, bool)
    moved = d.apply(np.where(valid, sar, np.nan))
    ok = np.isfinite(moved)
    return np.stack([standardise(m, v) for m, v in zip(moved, ok)]), ok


def pixel_error(f0: np.ndarray, f1: np.ndarray, d: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Endpoint length of the self-consistency error (H, W), capped at :data:`CAP_PX`; NaN where
    it is not defined or not ``valid``."""
    err, mask = relative_error(f0, f1, d)
    e = np.hypot(err[0], err[1])
    e = np.where(np.isfinite(e), np.minimum(e, CAP_PX), CAP_PX)
    if valid is not None:
        mask &= np.asarray(valid, bool)
    return np.where(mask, e, np.nan).astype(np.float32)


def local_error(e: np.ndarray) -> np.ndarray:
    """The robust local value of a raw estimate ``e`` (H, W) (module docstring); NaN where none."""
    h, w = e.shape
    gh, gw = -(-h // BLOCK), -(-w // BLOCK)
    pad = np.full((gh * BLOCK, gw * BLOCK), np.nan, np.float32)
    pad[:h, :w] = e
    blocks = pad.reshape(gh, BLOCK, gw, BLOCK).transpose(0, 2, 1, 3).reshape(gh, gw, BLOCK * BLOCK)
    r = WINDOW_BLOCKS // 2
    with warnings.catch_warnings():  # all-NaN blocks and windows give NaN, as they should
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(blocks, axis=2)
        med[np.isfinite(blocks).mean(axis=2) < MIN_BLOCK_SHARE] = np.nan
        around = sliding_window_view(np.pad(med, r, constant_values=np.nan), (WINDOW_BLOCKS, WINDOW_BLOCKS))
        grid = np.nanmedian(around.reshape(gh, gw, -1), axis=2)
    return np.repeat(np.repeat(grid, BLOCK, 0), BLOCK, 1)[:h, :w].astype(np.float32)


def estimate(match: MatchFn, opt: np.ndarray, sar: np.ndarray, opt_valid: Optional[np.ndarray],
             sar_valid: Optional[np.ndarray], flow: np.ndarray) -> np.ndarray:
    """The estimated error (B, H, W), px, of ``flow`` (B, 2, H, W), the answer of ``match`` (a
    matcher's ``match``) to the batch ``opt``, ``sar`` (the matcher contract); one more call."""
    b, h, w = np.asarray(opt).shape
    d = deformation(h, w)
    sar_d, valid_d = deform(sar, sar_valid, d)
    f1, _ = match(opt, sar_d, opt_valid, valid_d)
    gt = d.forward()
    ov = [None] * b if opt_valid is None else opt_valid
    return np.stack([local_error(pixel_error(f0, f, gt, v)) for f0, f, v in zip(flow, np.asarray(f1), ov)])


def checked_match(matcher, opt, sar, opt_valid=None, sar_valid=None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(flow, certainty, estimated error)`` of ``matcher`` on a batch: its own ``checked_match``
    where it has one (a matcher that checks as it matches), else its ``match`` and :func:`estimate`."""
    own = getattr(matcher, "checked_match", None)
    if own is not None:
        return own(opt, sar, opt_valid, sar_valid)
    flow, cert = matcher.match(opt, sar, opt_valid, sar_valid)
    flow = np.asarray(flow, np.float32)
    return flow, np.asarray(cert, np.float32), estimate(matcher.match, opt, sar, opt_valid, sar_valid, flow)


def tile_error(est: np.ndarray) -> float:
    """One number for a tile's estimated error map (H, W): the mean over the pixels with an
    estimate (NaN without any).  Of the mean, median and 75th and 90th percentiles, it ranked the
    network's 512 px chips of T11SMT by their true relative RMSE best (benchmarks/check_validation.py)."""
    v = np.asarray(est)[np.isfinite(est)]
    return float(np.mean(v)) if v.size else float("nan")


def summary(est: np.ndarray) -> dict:
    """Scene numbers of an estimated error map (or a sample of one): ``median_px``, the shares of
    the pixels with an estimate above 1 px and above 3 px, and ``estimated_share``, the share of
    the values that have an estimate (NaN statistics without any)."""
    est = np.asarray(est, np.float64).ravel()
    v = est[np.isfinite(est)]
    nan = float("nan")
    return {"median_px": float(np.median(v)) if v.size else nan,
            "share_over_1px": float(np.mean(v > 1.0)) if v.size else nan,
            "share_over_3px": float(np.mean(v > 3.0)) if v.size else nan,
            "estimated_share": float(v.size / est.size) if est.size else nan}
