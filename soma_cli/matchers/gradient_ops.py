"""The numerical pieces of the gradient matcher (:class:`soma_cli.matchers.gradient.GradientMatcher`):
the oriented-gradient descriptor, FFT cross-correlation (masked global NCC with a parabolic peak
fit), the window grid and its matching, window quality and consistency checks, smoothing on the
window grid, and the small affine helpers. All conventions are those of :mod:`soma_cli.coords`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .. import coords

_TINY = 1e-9


# ----------------------------------------------------------------------------- descriptor


def _fill_invalid(img: np.ndarray, valid: np.ndarray, sigma: float = 4.0) -> np.ndarray:
    """Replace invalid pixels by a normalised-convolution average of nearby valid ones."""
    if valid.all():
        return img.astype(np.float32, copy=False)
    m = valid.astype(np.float32)
    num = ndimage.gaussian_filter(np.where(valid, img, 0).astype(np.float32), sigma, mode="constant")
    den = ndimage.gaussian_filter(m, sigma, mode="constant")
    fill = np.where(den > 1e-3, num / np.maximum(den, 1e-3), 0.0)
    return np.where(valid, img, fill).astype(np.float32)


def descriptor(
    img: np.ndarray,
    valid: Optional[np.ndarray] = None,
    presmooth: float = 1.0,
    sigma: float = 2.0,
    n_orient: int = 9,
) -> np.ndarray:
    """Dense oriented-gradient descriptor ``(n_orient, H, W)`` float32, L2-normalised per pixel.

    Pixels within reach of an invalid pixel (pre-smoothing + gradient + smoothing support) are 0.
    """
    x = np.asarray(img, dtype=np.float32)
    if valid is None:
        valid = np.isfinite(x)
    x = _fill_invalid(np.where(valid, x, 0), valid)
    if presmooth > 0:
        x = ndimage.gaussian_filter(x, presmooth, mode="reflect")
    gx = ndimage.sobel(x, axis=1, mode="reflect")
    gy = ndimage.sobel(x, axis=0, mode="reflect")
    th = np.arange(n_orient) * (np.pi / n_orient)
    cos, sin = np.cos(th).astype(np.float32), np.sin(th).astype(np.float32)
    d = np.abs(cos[:, None, None] * gx[None] + sin[:, None, None] * gy[None])
    d = ndimage.gaussian_filter(d, (0, sigma, sigma), mode="reflect")
    # across orientations (circular over 180 degrees): [1, 2, 1] / 4
    d = 0.5 * d + 0.25 * (np.roll(d, 1, axis=0) + np.roll(d, -1, axis=0))
    norm = np.sqrt((d * d).sum(0))
    ok = valid
    if not ok.all():
        reach = int(np.ceil(presmooth * 2 + sigma * 2.5)) + 2
        ok = ndimage.minimum_filter(valid, size=2 * reach + 1, mode="constant", cval=False)
    ref = float(np.mean(norm[ok])) if ok.any() else 1.0
    d = d / (norm + 0.1 * ref + _TINY)[None]
    d *= ok[None]
    return d.astype(np.float32)


# ----------------------------------------------------------------------------- correlation


def _xcorr_fft(a: np.ndarray, b: np.ndarray, shape) -> np.ndarray:
    """Circular cross-correlation ``c[s] = sum_q a(q) b(q + s)`` summed over leading channels."""
    fa = sfft.rfft2(a, s=shape, axes=(-2, -1))
    fb = sfft.rfft2(b, s=shape, axes=(-2, -1))
    prod = np.conj(fa) * fb
    if prod.ndim == 3:
        prod = prod.sum(0)
    return sfft.irfft2(prod, s=shape, axes=(-2, -1))


def global_ncc(
    a: np.ndarray, ma: np.ndarray, b: np.ndarray, mb: np.ndarray, max_shift: int, min_overlap: float = 0.4
) -> Tuple[float, np.ndarray, np.ndarray]:
    """Masked NCC of descriptors ``a`` (reference) and ``b`` (moving) over shifts ``|s| <= max_shift``.

    Returns ``(peak score, (dx, dy) sub-pixel shift, score surface)``: reference ``q`` matches
    ``b`` at ``q + s``.
    """
    k, h, w = a.shape
    ma = ma.astype(np.float32)
    mb = mb.astype(np.float32)
    na, nb = max(ma.sum(), 1.0), max(mb.sum(), 1.0)
    a = (a - (a * ma).sum((1, 2), keepdims=True) / na) * ma
    b = (b - (b * mb).sum((1, 2), keepdims=True) / nb) * mb
    shape = (sfft.next_fast_len(h + max_shift + 1), sfft.next_fast_len(w + max_shift + 1))
    num = _xcorr_fft(a, b, shape)
    ea = _xcorr_fft((a * a).sum(0), mb, shape)
    eb = _xcorr_fft(ma, (b * b).sum(0), shape)
    n = _xcorr_fft(ma, mb, shape)
    idx_y = np.arange(-max_shift, max_shift + 1) % shape[0]
    idx_x = np.arange(-max_shift, max_shift + 1) % shape[1]
    sel = np.ix_(idx_y, idx_x)
    num, ea, eb, n = num[sel], ea[sel], eb[sel], n[sel]
    score = num / np.sqrt(np.maximum(ea, _TINY) * np.maximum(eb, _TINY))
    score[n < min_overlap * min(na, nb)] = -1.0
    iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
    sy, sx = _parabolic(score, iy, ix)
    return float(score[iy, ix]), np.array([ix + sx - max_shift, iy + sy - max_shift]), score


def _parabolic(c: np.ndarray, iy: int, ix: int) -> Tuple[float, float]:
    """Sub-pixel offsets (dy, dx) of a peak from 1-D parabolas (0 at the surface border)."""
    def one(m, z, p):
        den = m - 2.0 * z + p
        return float(np.clip(0.5 * (m - p) / den, -0.5, 0.5)) if den < -_TINY else 0.0

    h, w = c.shape
    dy = one(c[iy - 1, ix], c[iy, ix], c[iy + 1, ix]) if 0 < iy < h - 1 else 0.0
    dx = one(c[iy, ix - 1], c[iy, ix], c[iy, ix + 1]) if 0 < ix < w - 1 else 0.0
    return dy, dx


@dataclass
class WindowGrid:
    """Top-left corners of square windows tiling an ``h x w`` image."""

    y0: np.ndarray
    x0: np.ndarray
    win: int

    @classmethod
    def make(cls, h: int, w: int, win: int, stride: int) -> "WindowGrid":
        win = int(min(win, h, w))
        ny = int(np.ceil(max(h - win, 0) / stride)) + 1
        nx = int(np.ceil(max(w - win, 0) / stride)) + 1
        y0 = np.round(np.linspace(0, h - win, ny)).astype(int)
        x0 = np.round(np.linspace(0, w - win, nx)).astype(int)
        return cls(y0, x0, win)

    @property
    def cy(self) -> np.ndarray:
        """Window centroids (continuous pixel coordinates), rows."""
        return self.y0 + (self.win - 1) / 2.0

    @property
    def cx(self) -> np.ndarray:
        return self.x0 + (self.win - 1) / 2.0

    def to_pixels(self, values: np.ndarray, h: int, w: int) -> np.ndarray:
        """Bilinear interpolation of ``(C, ny, nx)`` window values to ``(C, h, w)`` pixels."""
        fy = np.interp(np.arange(h), self.cy, np.arange(len(self.cy)))
        fx = np.interp(np.arange(w), self.cx, np.arange(len(self.cx)))
        rr, cc = np.meshgrid(fy, fx, indexing="ij")
        return np.stack([
            ndimage.map_coordinates(v.astype(np.float64), [rr, cc], order=1, mode="nearest") for v in values
        ]).astype(np.float32)


def _gather(arr: np.ndarray, y0: np.ndarray, x0: np.ndarray, size: int) -> np.ndarray:
    """``(N, K, size, size)`` patches of ``arr (K, H, W)`` at the top-left corners (y0, x0)."""
    view = np.lib.stride_tricks.sliding_window_view(arr, (size, size), axis=(1, 2))
    return np.ascontiguousarray(view[:, y0, x0].transpose(1, 0, 2, 3))


def match_windows(
    ref: np.ndarray,
    mov: np.ndarray,
    ref_valid: np.ndarray,
    mov_valid: np.ndarray,
    grid: WindowGrid,
    radius: int,
    exclude: int = 2,
    chunk: int = 48,
) -> dict:
    """ZNCC window matching of descriptors ``ref`` and ``mov`` (both ``(K, H, W)``, same grid).

    For every window of ``grid`` the reference window is searched in ``mov`` over shifts
    ``|dx|, |dy| <= radius``.  Returns arrays shaped ``(ny, nx)``: ``dx``, ``dy`` (sub-pixel, ref
    ``q`` matches ``mov`` at ``q + d``), ``peak`` (ZNCC), ``second`` (best ZNCC outside the peak's
    neighbourhood), ``border`` (peak on the search border), ``frac`` (valid share of the window).
    """
    k, h, w = ref.shape
    win, r = grid.win, int(radius)
    yy, xx = np.meshgrid(grid.y0, grid.x0, indexing="ij")
    yy, xx = yy.ravel(), xx.ravel()
    movp = np.pad(mov, ((0, 0), (r, r), (r, r)))
    n_pix = float(win * win)
    size = win + 2 * r
    shape = (size, size)
    ns = 2 * r + 1
    out = {key: np.zeros(len(yy), np.float32) for key in ("dx", "dy", "peak", "second")}
    out["border"] = np.zeros(len(yy), bool)
    # valid shares of the windows from integral images
    vr = _box_means(ref_valid, grid)
    vm = _box_means(mov_valid, grid)
    # box sums of the moving descriptor (per channel) and of its energy, for every window position
    b1 = _box_sums(movp, win)  # (K, Hp-win+1, Wp-win+1)
    b2 = _box_sums((movp * movp).sum(0)[None], win)[0]
    for s in range(0, len(yy), chunk):
        ys, xs = yy[s:s + chunk], xx[s:s + chunk]
        t = _gather(ref, ys, xs, win).astype(np.float32)
        t -= t.mean(axis=(2, 3), keepdims=True)
        et = (t * t).sum(axis=(1, 2, 3))
        srch = _gather(movp, ys, xs, size).astype(np.float32)
        ft = sfft.rfft2(t, s=shape, axes=(2, 3))
        fs = sfft.rfft2(srch, axes=(2, 3))
        num = sfft.irfft2((np.conj(ft) * fs).sum(1), s=shape, axes=(1, 2))[:, :ns, :ns]
        s1 = _gather(b1, ys, xs, ns)
        s2 = _gather(b2[None], ys, xs, ns)[:, 0]
        var = s2 - (s1 * s1).sum(1) / n_pix
        score = num / np.sqrt(np.maximum(et[:, None, None], _TINY) * np.maximum(var, _TINY))
        score[var < 1e-6 * n_pix] = -1.0
        # local maxima (3x3) of the surface: the second peak is the best one away from the first
        locmax = score >= ndimage.maximum_filter(score, size=(1, 3, 3), mode="nearest")
        for j in range(score.shape[0]):
            c = score[j]
            iy, ix = np.unravel_index(int(np.argmax(c)), c.shape)
            dy, dx = _parabolic(c, iy, ix)
            i = s + j
            out["dx"][i] = ix + dx - r
            out["dy"][i] = iy + dy - r
            out["peak"][i] = c[iy, ix]
            out["border"][i] = iy in (0, ns - 1) or ix in (0, ns - 1)
            others = np.where(locmax[j], c, -1.0)
            others[max(iy - exclude, 0):iy + exclude + 1, max(ix - exclude, 0):ix + exclude + 1] = -1.0
            out["second"][i] = max(float(others.max()), -1.0)
    shape2 = (len(grid.y0), len(grid.x0))
    res = {key: v.reshape(shape2) for key, v in out.items()}
    res["frac"] = np.minimum(vr, vm)
    return res


def _integral(x: np.ndarray) -> np.ndarray:
    """Zero-padded 2-D integral image over the last two axes (float64)."""
    c = np.cumsum(np.cumsum(x, axis=-2, dtype=np.float64), axis=-1)
    pad = [(0, 0)] * (x.ndim - 2) + [(1, 0), (1, 0)]
    return np.pad(c, pad)


def _box_sums(x: np.ndarray, win: int) -> np.ndarray:
    """``(K, H-win+1, W-win+1)`` sums of ``x (K, H, W)`` over every ``win x win`` window."""
    c = _integral(x)
    return (c[:, win:, win:] - c[:, :-win, win:] - c[:, win:, :-win] + c[:, :-win, :-win]).astype(np.float32)


def _box_means(mask: np.ndarray, grid: WindowGrid) -> np.ndarray:
    c = _integral(mask.astype(np.float32))
    y0, x0, wn = grid.y0[:, None], grid.x0[None, :], grid.win
    s = c[y0 + wn, x0 + wn] - c[y0, x0 + wn] - c[y0 + wn, x0] + c[y0, x0]
    return (s / float(wn * wn)).astype(np.float32)


def window_quality(m: dict, min_frac: float = 0.5) -> np.ndarray:
    """Per-window weight in [0, 1] from peak height, distinctiveness and valid share."""
    peak = np.clip((m["peak"] - 0.05) / 0.35, 0.0, 1.0)
    margin = np.clip((m["peak"] - m["second"]) / 0.1, 0.0, 1.0)
    frac = np.clip((m["frac"] - min_frac) / (1.0 - min_frac), 0.0, 1.0)
    q = peak * margin * np.sqrt(frac)
    q[m["border"]] = 0.0
    return q.astype(np.float32)


def _median_consistency(dx: np.ndarray, dy: np.ndarray, wt: np.ndarray, tol: float) -> np.ndarray:
    """Zero the weight of windows whose shift departs by more than ``tol`` from the weighted
    median of their 3x3 neighbourhood (the window itself included)."""
    ny, nx = dx.shape
    keep = wt.copy()
    for i in range(ny):
        for j in range(nx):
            if wt[i, j] <= 0:
                continue
            sl = (slice(max(i - 1, 0), i + 2), slice(max(j - 1, 0), j + 2))
            ok = wt[sl] > 0
            if ok.sum() < 3:
                continue
            mx, my = np.median(dx[sl][ok]), np.median(dy[sl][ok])
            if np.hypot(dx[i, j] - mx, dy[i, j] - my) > tol:
                keep[i, j] = 0.0
    return keep


def _smooth_grid(values: np.ndarray, wt: np.ndarray, sigma: float, prior: float) -> Tuple[np.ndarray, np.ndarray]:
    """Normalised Gaussian convolution of ``(C, ny, nx)`` values with weights; ``prior`` pulls
    towards 0 where weights are missing.  Returns smoothed values and the smoothed weight."""
    den = ndimage.gaussian_filter(wt.astype(np.float64), sigma, mode="nearest")
    out = np.stack([ndimage.gaussian_filter(v * wt, sigma, mode="nearest") for v in values])
    return (out / (den + prior)[None]).astype(np.float32), den.astype(np.float32)


# ----------------------------------------------------------------------------- affine helpers


def _pool(x: np.ndarray, f: int) -> np.ndarray:
    """``f x f`` block mean (the coords.py pyramid convention); drops incomplete blocks."""
    if f == 1:
        return x.astype(np.float32)
    hc, wc = x.shape[0] // f, x.shape[1] // f
    return x[: hc * f, : wc * f].reshape(hc, f, wc, f).mean((1, 3)).astype(np.float32)


def _rotation_about_centre(theta_deg: float, h: int, w: int) -> np.ndarray:
    t = np.deg2rad(theta_deg)
    lin = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    return np.concatenate([lin, (c - lin @ c)[:, None]], axis=1)


def _translation(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def _fit_window_affine(m: dict, wt: np.ndarray, grid: WindowGrid, h: int, w: int) -> Tuple[np.ndarray, dict]:
    """Robust affine of window shifts via :func:`coords.fit_affine_np` on a sparse field whose
    samples sit at the window centroids (``col0 = row0 = -0.5`` puts index ``x0 + win/2`` at the
    centroid ``x0 + (win-1)/2`` for even windows; odd windows use offset 0)."""
    off = -0.5 if grid.win % 2 == 0 else 0.0
    iy = (grid.y0 + grid.win // 2)[:, None]
    ix = (grid.x0 + grid.win // 2)[None, :]
    field = np.full((2, h + 1, w + 1), np.nan, np.float32)
    weight = np.zeros((h + 1, w + 1), np.float32)
    iy, ix = np.broadcast_arrays(iy, ix)
    field[0, iy, ix] = m["dx"]
    field[1, iy, ix] = m["dy"]
    weight[iy, ix] = wt
    return coords.fit_affine_np(field, weight, step=1, col0=off, row0=off)


def _affine_ok(a: np.ndarray, max_scale_dev: float = 0.25) -> bool:
    lin = np.asarray(a)[:, :2]
    sv = np.linalg.svd(lin, compute_uv=False)
    return bool(np.all(np.isfinite(a)) and sv.min() > 1 - max_scale_dev and sv.max() < 1 + max_scale_dev
                and np.linalg.det(lin) > 0)
