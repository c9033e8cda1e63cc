"""Weighted blending of tile flows into a scene flow, one strip of rows at a time, and the repair of
its outliers (numpy only).

Memory stays bounded by a strip of about two tile heights times the scene width: rows are handed
out (``flush``) as soon as no later tile can touch them, so scenes larger than RAM stream through.
:class:`FlowSamples` keeps a sparse sample of the strips for the scene-wide affine fit and the
:class:`FlowPrior` that repairs outliers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Tuple

import numpy as np
from scipy import ndimage

from . import coords
from .errors import MatchError
from .tiling import Tile, blend_weight

SAMPLE_STEP = 8  # px between the flow samples kept for the scene-wide fit and the summary


@dataclass
class Strip:
    """Finished rows ``[row0, row0 + flow.shape[1])`` of the area: flow (2,h,W), certainty (h,W)
    and ``valid`` (h,W) where at least one tile gave an estimate; ``error`` (h,W), when the tiles
    were checked, their estimated error in px (:mod:`soma_cli.check`; NaN where none)."""

    row0: int
    flow: np.ndarray
    certainty: np.ndarray
    valid: np.ndarray
    error: Optional[np.ndarray] = None


class StripStitcher:
    """Accumulate row-major tiles; yield finished strips.

    ``add(tile, flow, certainty, weight_mask, error)``: ``flow`` (2,h,w) and ``certainty`` (h,w) of a
    tile; the blend weight is the tile's border ramp times ``max(certainty, eps)``, so confident
    tiles win in overlaps.  With ``errors``, each tile also brings its estimated error (h,w; NaN
    where none), blended with the same weights over the tiles that have one.  ``flush(upto)``
    yields all rows ``< upto``, in strips of at most ``strip_rows`` rows; ``finish()`` yields the
    rest.
    """

    def __init__(self, height: int, width: int, overlap: int, eps: float = 1e-3, errors: bool = False,
                 strip_rows: int = 512):
        self.height, self.width, self.overlap, self.eps = height, width, overlap, eps
        self.strip_rows = max(1, int(strip_rows))
        self.row0 = 0  # first row held in the buffer
        self.rows = 0  # rows of the buffer in use (from row0)
        # accumulators, each (rows, width) per channel: flow (2), certainty, weight, and with
        # ``errors`` the weighted error and the weight of the tiles with an error; the buffer grows
        # to the tallest span of unfinished rows (a tile row) and is reused from then on.  float32:
        # a pixel sums at most four tiles, and the buffer is the largest array of a wide scene
        self.acc = np.zeros((6 if errors else 4, 0, width), np.float32)

    def _ensure(self, last_row: int) -> None:
        need = last_row - self.row0
        if need > self.acc.shape[1]:
            grown = np.zeros((self.acc.shape[0], need, self.width), self.acc.dtype)
            grown[:, :self.rows] = self.acc[:, :self.rows]
            self.acc = grown
        self.rows = max(self.rows, need)

    def add(self, tile: Tile, flow: np.ndarray, certainty: np.ndarray, mask: Optional[np.ndarray] = None,
            error: Optional[np.ndarray] = None) -> None:
        if tile.row < self.row0:
            raise ValueError("tiles must arrive in row-major order")
        self._ensure(tile.row + tile.height)
        w = blend_weight(tile.height, tile.width, self.overlap) * np.maximum(certainty, self.eps)
        ok = np.isfinite(flow).all(axis=0)
        if mask is not None:
            ok &= mask
        w = np.where(ok, w, 0.0)
        acc = self.acc[:, tile.row - self.row0:tile.row - self.row0 + tile.height, tile.cols]
        acc[:2] += np.where(ok, flow, 0.0) * w
        acc[2] += np.where(ok, certainty, 0.0) * w
        acc[3] += w
        if len(acc) > 4:
            we = np.where(np.isfinite(error), w, 0.0)
            acc[4] += np.nan_to_num(error) * we
            acc[5] += we

    def flush(self, upto: int) -> Iterator[Strip]:
        upto = min(upto, self.height)
        n = upto - self.row0
        if n <= 0:
            return
        self._ensure(upto)
        for a in range(0, n, self.strip_rows):
            acc = self.acc[:, a:min(a + self.strip_rows, n)]
            valid = acc[3] > 0
            flow = _quotient(acc[:2], acc[3], valid, np.nan)
            cert = _quotient(acc[2], acc[3], valid, 0.0)
            error = _quotient(acc[4], acc[5], valid & (acc[5] > 0), np.nan) if len(acc) > 4 else None
            yield Strip(self.row0 + a, flow, cert, valid, error)
        rest = self.rows - n  # unfinished rows move to the top of the buffer, the rest is cleared
        self.acc[:, :rest] = self.acc[:, n:self.rows]
        self.acc[:, rest:self.rows] = 0.0
        self.rows, self.row0 = rest, upto

    def finish(self) -> Iterator[Strip]:
        yield from self.flush(self.height)


def _quotient(num: np.ndarray, den: np.ndarray, where: np.ndarray, fill: float) -> np.ndarray:
    """``num / den`` as float32 where ``where`` (over the last two axes), else ``fill``."""
    out = np.empty(num.shape, np.float32)
    np.divide(num, np.where(where, den, 1.0), out=out, casting="same_kind")
    out[..., ~where] = fill
    return out


class FlowSamples:
    """Flow samples every :data:`SAMPLE_STEP` pixels (absolute reference pixels), gathered strip by
    strip, for the scene-wide affine fit, the repair prior and the run summary.  Each sample
    remembers whether it lies in a trusted tile (one with evidence, :mod:`soma_cli.verdict`): the
    fit uses those only; and its estimated error, when the strips carry one.  Coordinates are kept
    as int32 and values as float32 (about 30 bytes a sample: 60 MB for a 10980 px scene), and the
    strips' parts are merged into one array each on first use."""

    _FIELDS = {"x": np.int32, "y": np.int32, "dx": np.float32, "dy": np.float32, "cert": np.float32,
               "trusted": bool, "error": np.float32}

    def __init__(self) -> None:
        self._parts: dict = {name: [] for name in self._FIELDS}

    def add(self, strip: Strip, row_abs0: int, col_abs0: int, trusted: Optional[np.ndarray] = None) -> None:
        """Sample a strip of an area whose origin is absolute pixel ``(col_abs0, row_abs0)``;
        ``trusted`` (like ``strip.valid``) marks the pixels of trusted tiles (default: all)."""
        rows = coords.stride_offsets(strip.row0, strip.flow.shape[1], SAMPLE_STEP)
        if not rows.size:
            return
        f = strip.flow[:, rows, ::SAMPLE_STEP]
        ok = np.isfinite(f).all(0)
        yy, xx = np.meshgrid(rows + strip.row0 + row_abs0,
                             np.arange(0, strip.flow.shape[2], SAMPLE_STEP) + col_abs0, indexing="ij")
        n = int(ok.sum())
        parts = {"x": xx[ok], "y": yy[ok], "dx": f[0][ok], "dy": f[1][ok],
                 "cert": strip.certainty[rows, ::SAMPLE_STEP][ok],
                 "trusted": np.ones(n, bool) if trusted is None else trusted[rows, ::SAMPLE_STEP][ok],
                 "error": np.full(n, np.nan) if strip.error is None else strip.error[rows, ::SAMPLE_STEP][ok]}
        for name, kind in self._FIELDS.items():
            self._parts[name].append(np.asarray(parts[name], kind))

    def _merged(self, name: str) -> np.ndarray:
        parts = self._parts[name]
        if len(parts) != 1:
            parts[:] = [np.concatenate(parts) if parts else np.zeros(0, self._FIELDS[name])]
        return parts[0]

    def arrays(self) -> Tuple[np.ndarray, ...]:
        """``(x, y, dx, dy, certainty)`` of every sample."""
        return tuple(self._merged(name) for name in ("x", "y", "dx", "dy", "cert"))

    def certainties(self) -> np.ndarray:
        """Per sample (in :meth:`arrays` order): its certainty."""
        return self._merged("cert")

    def errors(self) -> np.ndarray:
        """Per sample (in :meth:`arrays` order): its estimated error (NaN where none)."""
        return self._merged("error")

    def trusted_mask(self) -> np.ndarray:
        """Per sample (in :meth:`arrays` order): does it lie in a trusted tile?"""
        return self._merged("trusted")

    def fit(self) -> Tuple[np.ndarray, dict]:
        """Robust, certainty-weighted global affine of the samples in trusted tiles: ``(2x3, stats)``."""
        x, y, dx, dy, cert = (a[self.trusted_mask()] for a in self.arrays())
        if x.size < 6:
            raise MatchError("no valid flow estimate in the overlap")
        x, y = x.astype(np.float64), y.astype(np.float64)
        return coords.fit_affine_points_np(x, y, x + dx, y + dy, np.maximum(cert, 1e-3))


class FlowPrior:
    """A smooth, certainty-weighted flow over the area, used to repair outliers.

    ``prior = A + NC(F - A)``: the global affine ``A`` plus a normalised convolution (Gaussian,
    ``sigma_px``) of the certainty-weighted residual, computed on a coarse grid of ``block`` px
    from flow samples.  Working on the residual keeps large rotations exact (a normalised
    convolution of a linear field is biased wherever the weights are uneven).
    """

    def __init__(self, x, y, dx, dy, cert, affine, height: int, width: int, row0: int, col0: int,
                 sigma_px: float = 256.0, block: int = 16, max_dev: float = 5.0):
        self.affine = coords.to3x3(affine)
        self.row0, self.col0, self.block = row0, col0, block
        self.sigma = sigma_px / block
        self.shape = (-(-height // block), -(-width // block))
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        gh, gw = self.shape
        by = np.clip(((y - row0) // block).astype(int), 0, gh - 1)
        bx = np.clip(((x - col0) // block).astype(int), 0, gw - 1)
        self._idx = by * gw + bx
        ax, ay = self._affine(x, y)
        rx, ry = np.asarray(dx) - ax, np.asarray(dy) - ay
        w = np.asarray(cert, np.float64)
        self.res = self._smooth(rx, ry, w)
        # robust second pass: samples far from the first prior do not shape the final one
        px, py = self._residual_at(x, y)
        self.res = self._smooth(rx, ry, np.where(np.hypot(rx - px, ry - py) <= max_dev, w, 0.0))
        del self._idx

    def _smooth(self, rx: np.ndarray, ry: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Normalised convolution of the weighted residual on the coarse grid: ``(2, gh, gw)``."""
        gh, gw = self.shape
        n = gh * gw
        wsum = np.bincount(self._idx, weights=w, minlength=n).reshape(gh, gw)
        den = ndimage.gaussian_filter(wsum, self.sigma, mode="constant")
        ok = den > 1e-9 * max(float(wsum.sum()), 1e-12)
        out = []
        for v in (rx, ry):
            num = ndimage.gaussian_filter(np.bincount(self._idx, weights=w * v, minlength=n).reshape(gh, gw),
                                          self.sigma, mode="constant")
            out.append(np.where(ok, num / np.where(ok, den, 1.0), 0.0))
        return np.stack(out)

    def _coarse(self, pos: np.ndarray, origin: int) -> np.ndarray:
        """Absolute pixel positions along one axis (``origin``: the area's first pixel on it) as
        positions on the coarse grid: block b covers pixels [b*B, (b+1)*B) and is centred at
        b*B + (B-1)/2 (coords' level convention)."""
        return (pos - origin - (self.block - 1) / 2.0) / self.block

    def _residual_at(self, xx: np.ndarray, yy: np.ndarray):
        u = self._coarse(xx, self.col0)
        v = self._coarse(yy, self.row0)
        return (ndimage.map_coordinates(self.res[0], [v, u], order=1, mode="nearest"),
                ndimage.map_coordinates(self.res[1], [v, u], order=1, mode="nearest"))

    def _affine(self, x: np.ndarray, y: np.ndarray):
        return coords.affine_flow_points_np(self.affine, x, y)

    def field(self, row_abs: int, col_abs: int, h: int, w: int) -> np.ndarray:
        """The prior flow ``(2, h, w)`` for the block of absolute reference pixels at (row, col):
        :meth:`_residual_at` plus the affine at every pixel, computed separably as the grid is
        regular: along the coarse rows in reach with the affine's column term, then down the
        columns (whose weights sum to 1) in float32, plus its row term."""
        rows = np.arange(row_abs, row_abs + h, dtype=np.float64)
        cols = np.arange(col_abs, col_abs + w, dtype=np.float64)
        v0, v1, tv = _linear_weights(self._coarse(rows, self.row0), self.shape[0])
        u0, u1, tu = _linear_weights(self._coarse(cols, self.col0), self.shape[1])
        lo, hi = int(v0.min()), int(v1.max()) + 1
        coarse = self.res[:, lo:hi]
        # the affine flow is affine in (x, y): its value at (x, 0) plus at (0, y) less at (0, 0)
        at_col = np.stack(self._affine(cols, np.zeros_like(cols)))
        at_row = np.stack(self._affine(np.zeros_like(rows), rows)) - np.stack(self._affine(0.0, 0.0))[:, None]
        across = (coarse[:, :, u0] * (1.0 - tu) + coarse[:, :, u1] * tu + at_col[:, None]).astype(np.float32)
        out = across[:, v0 - lo]
        out *= (1.0 - tv).astype(np.float32)[:, None]
        out += across[:, v1 - lo] * tv.astype(np.float32)[:, None]
        out += at_row.astype(np.float32)[:, :, None]
        return out

    def repair(self, strip: Strip, row_abs: int, col_abs: int, max_dev: float = 5.0, min_cert: float = 0.1,
               trust_cert: float = 0.5) -> Strip:
        """Blend unreliable pixels towards the prior: weight ``clip(c / min_cert, 0, 1)``, and 0 where
        the flow deviates from the prior by more than ``max_dev`` px while ``c < trust_cert``.  The
        certainty is scaled by the same weight (repaired pixels carry no evidence of their own)."""
        f, c = strip.flow, strip.certainty
        prior = self.field(row_abs, col_abs, f.shape[1], f.shape[2])
        dev = np.hypot(f[0] - prior[0], f[1] - prior[1])
        wgt = np.clip(c / min_cert, 0.0, 1.0)
        wgt = np.where((dev > max_dev) & (c < trust_cert), 0.0, wgt)
        wgt = np.where(np.isfinite(dev), wgt, 1.0)
        out = np.where(strip.valid, wgt * np.nan_to_num(f) + (1 - wgt) * prior, np.nan).astype(np.float32)
        return replace(strip, flow=out, certainty=(c * wgt).astype(np.float32))

    def fill(self, strip: Strip, row_abs: int, col_abs: int) -> Strip:
        """Only the pixels without any certainty (the tiles without evidence among them) take the
        prior; every other pixel keeps its flow (``--no-repair``)."""
        none = strip.valid & (strip.certainty <= 0)
        if not none.any():
            return strip
        prior = self.field(row_abs, col_abs, strip.flow.shape[1], strip.flow.shape[2])
        return replace(strip, flow=np.where(none, prior, strip.flow).astype(np.float32))


def _linear_weights(pos: np.ndarray, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation at the positions ``pos`` along an axis of ``n`` samples, the nearest
    sample beyond either end (as ``ndimage.map_coordinates(order=1, mode="nearest")``):
    ``(i0, i1, t)``, the value being ``(1 - t) a[i0] + t a[i1]``."""
    p = np.clip(pos, 0.0, n - 1.0)
    i0 = np.floor(p).astype(np.intp)
    return i0, np.minimum(i0 + 1, n - 1), p - i0
