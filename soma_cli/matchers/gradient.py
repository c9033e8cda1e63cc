"""Training-free structural-gradient matcher (``--method gradient``), in the spirit of CFOG/HOPC.

Both images get the same dense descriptor: oriented gradient magnitudes ``|gx cos t + gy sin t|``
for ``n_orient`` orientations over 180 degrees (polarity-free, so SAR and optical edges compare),
smoothed in space and across orientations, then L2-normalised per pixel.  Matching is
zero-normalised cross-correlation (ZNCC) of these descriptors, always computed with FFTs:

1. **Coarse global search** at about 128 px: the SAR is rotated by a set of hypotheses
   (``-max_rotation_deg .. +max_rotation_deg``); each is correlated against the optical over the
   whole tile (masked NCC); the best peaks of distinct rotations are kept as candidates.
2. **Verification and affine refinement**: each candidate is checked at ~256 px by window
   matching (the one whose robust affine fit has the most inlier window weight wins and is refined
   by that fit), then once more at full resolution: the SAR is warped by the current affine, a grid
   of large windows is matched within a search radius, and a robust weighted affine
   (:func:`coords.fit_affine_np`) of the window shifts is composed onto the current one.
3. **Local field**: a denser grid of smaller windows gives sub-pixel residual shifts (parabolic peak
   fit); outliers are rejected (peak quality, distinctiveness, median consistency), the shifts are
   smoothed by normalised Gaussian convolution on the window grid (shrinking towards the affine
   where data are missing), interpolated to pixels and composed onto the flow (twice).

Certainty comes from the window peak height and its margin over the second peak (and the window's
valid share, :func:`window_quality`), interpolated to pixels, and is 0 where the optical pixel is
invalid or its match falls outside the valid SAR.  It is the matcher's evidence: a pixel from
``evidence_certainty`` (0.1, measured on T11SMT) counts as evidence for ``soma register``'s
verdict and fallback (:mod:`soma_cli.verdict`).
All conventions (flows, affines, warps) are those of :mod:`soma_cli.coords`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .. import coords
from ..cpu import CpuShare

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


# ----------------------------------------------------------------------------- matcher


class GradientMatcher:
    """Training-free oriented-gradient (CFOG/HOPC-like) matcher; see the module docstring."""

    name = "gradient"
    # the window quality is conservative as a probability: on T11SMT 93 % of the pixels from 0.1
    # were within 1 px, and unrelated content reached it on at most 6 % (soma_cli.verdict)
    evidence_certainty = 0.1
    # the coarse search works at about 128 px; on 64 px crops of good pairs it was 12-17 px off
    min_size = 128

    def __init__(
        self,
        n_orient: int = 9,
        sigma: float = 2.0,
        presmooth_opt: float = 1.0,
        presmooth_sar: float = 1.5,
        max_rotation_deg: float = 22.5,
        rotation_step_deg: float = 2.5,
        max_shift_frac: float = 0.15,
        coarse_size: int = 128,
        affine_win: int = 128,
        local_win: int = 64,
        local_stride: int = 32,
        local_radius: int = 8,
        threads: Optional[int] = None,
    ) -> None:
        self.n_orient = int(n_orient)
        self.sigma = float(sigma)
        self.presmooth_opt = float(presmooth_opt)
        self.presmooth_sar = float(presmooth_sar)
        self.max_rotation_deg = float(max_rotation_deg)
        self.rotation_step_deg = float(rotation_step_deg)
        self.max_shift_frac = float(max_shift_frac)
        self.coarse_size = int(coarse_size)
        self.affine_win = int(affine_win)
        self.local_win = int(local_win)
        self.local_stride = int(local_stride)
        self.local_radius = int(local_radius)
        # tiles of a batch matched concurrently (numpy/scipy release the GIL); None: the free cores
        self.cpu = CpuShare(threads)

    # -- public contract
    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        opt = np.asarray(opt, dtype=np.float32)
        sar = np.asarray(sar, dtype=np.float32)
        if opt.ndim == 2:
            opt, sar = opt[None], sar[None]
        b, h, w = opt.shape
        if sar.shape != opt.shape:
            from ..errors import MatchError

            raise MatchError(f"optical {opt.shape} and SAR {sar.shape} tiles differ in shape")
        ov = np.ones_like(opt, bool) if opt_valid is None else np.asarray(opt_valid, bool).reshape(opt.shape)
        sv = np.ones_like(sar, bool) if sar_valid is None else np.asarray(sar_valid, bool).reshape(sar.shape)
        flows = np.zeros((b, 2, h, w), np.float32)
        certs = np.zeros((b, h, w), np.float32)

        def one(i: int) -> None:
            flows[i], certs[i] = self._match_one(opt[i], sar[i], ov[i] & np.isfinite(opt[i]),
                                                 sv[i] & np.isfinite(sar[i]))

        threads = self.cpu.threads() if b > 1 else 1
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(min(threads, b)) as pool:
                list(pool.map(one, range(b)))
        else:
            for i in range(b):
                one(i)
        return flows, certs

    # -- descriptors
    def _desc(self, img, valid, presmooth, scale: float = 1.0):
        return descriptor(img, valid, presmooth=presmooth / scale, sigma=max(self.sigma / scale, 0.8),
                          n_orient=self.n_orient)

    def _warp_sar(self, sar, sv, flow):
        """SAR image and validity resampled on the optical grid by ``flow``."""
        img = coords.warp_np(sar, flow, order=1, cval=0.0)
        val = coords.warp_np(sv.astype(np.float32), flow, order=1, cval=0.0) > 0.999
        return np.where(val, img, 0.0).astype(np.float32), val

    # -- stages
    def _coarse(self, opt, ov, sar, sv, n_best: int = 3):
        """Global rotation + translation at ~``coarse_size`` px.

        Returns up to ``n_best`` candidates ``(score, full-resolution affine)``, best first, from
        distinct rotation hypotheses (the best shift of each).
        """
        h, w = opt.shape
        f = max(1, int(round(min(h, w) / float(self.coarse_size))))
        oc, ovc = _pool(np.where(ov, opt, 0), f), _pool(ov.astype(np.float32), f) > 0.5
        sc_img, svc = _pool(np.where(sv, sar, 0), f), _pool(sv.astype(np.float32), f) > 0.5
        hc, wc = oc.shape
        od = self._desc(oc, ovc, self.presmooth_opt, f)
        omask = od.any(0)
        max_shift = int(np.ceil(self.max_shift_frac * min(h, w) / f)) + 2
        n_rot = int(round(self.max_rotation_deg / self.rotation_step_deg)) if self.rotation_step_deg > 0 else 0
        cands = []
        for k in range(-n_rot, n_rot + 1):
            rot = _rotation_about_centre(k * self.rotation_step_deg, h, w)
            rot_c = coords.scale_affine_np(rot, f)
            fl = coords.affine_to_flow_np(rot_c, hc, wc)
            img = coords.warp_np(sc_img, fl, order=1, cval=0.0)
            val = coords.warp_np(svc.astype(np.float32), fl, order=1, cval=0.0) > 0.999
            sd = self._desc(img, val, self.presmooth_sar, f)
            score, shift, _ = global_ncc(od, omask, sd, sd.any(0), max_shift)
            a_c = coords.compose_affine_np(rot_c, _translation(*shift))
            cands.append((score, k, coords.scale_affine_np(a_c, 1.0 / f)))
        cands.sort(key=lambda c: -c[0])
        # keep local maxima over the rotation axis (neighbouring hypotheses are the same peak)
        scores = {c[1]: c[0] for c in cands}
        peaks = [c for c in cands if scores.get(c[1] - 1, -np.inf) <= c[0] >= scores.get(c[1] + 1, -np.inf)]
        return [(c[0], c[2]) for c in peaks[:n_best]]

    def _verify(self, cands, opt, ov, sar, sv):
        """Pick the candidate affine with the most window support at ~``2 * coarse_size`` px and
        refine it there by a robust affine fit of the window shifts."""
        h, w = opt.shape
        f = max(1, int(round(min(h, w) / (2.0 * self.coarse_size))))
        oc, ovc = _pool(np.where(ov, opt, 0), f), _pool(ov.astype(np.float32), f) > 0.5
        sc_img, svc = _pool(np.where(sv, sar, 0), f), _pool(sv.astype(np.float32), f) > 0.5
        hc, wc = oc.shape
        od = self._desc(oc, ovc, self.presmooth_opt, f)
        win = min(64, (min(hc, wc) // 2) // 2 * 2)
        grid = WindowGrid.make(hc, wc, win, win // 2)
        best = (-1.0, cands[0][1])
        for _, a in cands:
            a_c = coords.scale_affine_np(a, f)
            img, val = self._warp_sar(sc_img, svc, coords.affine_to_flow_np(a_c, hc, wc))
            sd = self._desc(img, val, self.presmooth_sar, f)
            m = match_windows(od, sd, od.any(0), sd.any(0), grid, max(4, int(np.ceil(16 / f))))
            wt = window_quality(m)
            if (wt > 0).sum() < 6:
                continue
            res, info = _fit_window_affine(m, wt, grid, hc, wc)
            if not _affine_ok(res, 0.1):
                continue
            fl = coords.affine_to_flow_np(res, hc, wc)
            ix = np.clip(np.round(grid.cx).astype(int), 0, wc - 1)
            iy = np.clip(np.round(grid.cy).astype(int), 0, hc - 1)
            pred = fl[:, iy[:, None], ix[None, :]]
            resid = np.hypot(m["dx"] - pred[0], m["dy"] - pred[1])
            support = float((wt * (resid < 1.5)).sum())
            if support > best[0]:
                best = (support, coords.scale_affine_np(coords.compose_affine_np(a_c, res), 1.0 / f))
        return best[1]

    def _refine_affine(self, a, od, ov_d, sar, sv, win, radius):
        h, w = sar.shape
        img, val = self._warp_sar(sar, sv, coords.affine_to_flow_np(a, h, w))
        sd = self._desc(img, val, self.presmooth_sar)
        grid = WindowGrid.make(h, w, win, max(win // 2, 8))
        m = match_windows(od, sd, ov_d, sd.any(0), grid, radius)
        wt = window_quality(m)
        if (wt > 0).sum() < 6:
            if (wt > 0).sum() == 0:
                return a
            t = _translation(float(np.average(m["dx"], weights=wt)), float(np.average(m["dy"], weights=wt)))
            return coords.compose_affine_np(a, t)
        res, info = _fit_window_affine(m, wt, grid, h, w)
        if not _affine_ok(res, 0.1) or info["inliers"] < 0.2:
            return a
        return coords.compose_affine_np(a, res)

    def _refine_local(self, flow, od, ov_d, sar, sv, win, stride, radius, tol):
        h, w = sar.shape
        img, val = self._warp_sar(sar, sv, flow)
        sd = self._desc(img, val, self.presmooth_sar)
        grid = WindowGrid.make(h, w, win, stride)
        m = match_windows(od, sd, ov_d, sd.any(0), grid, radius)
        wt = window_quality(m)
        wt = _median_consistency(m["dx"], m["dy"], wt, tol)
        res, _ = _smooth_grid(np.stack([m["dx"], m["dy"]]), wt, sigma=1.0, prior=0.05)
        qual, _ = _smooth_grid(wt[None], np.ones_like(wt), sigma=1.0, prior=0.0)
        res_px = grid.to_pixels(res, h, w)
        q_px = grid.to_pixels(qual, h, w)[0]
        return coords.compose_flow_np(flow, res_px), q_px

    def _match_one(self, opt, sar, ov, sv):
        h, w = opt.shape
        zero = (np.zeros((2, h, w), np.float32), np.zeros((h, w), np.float32))
        if ov.sum() < 0.05 * h * w or sv.sum() < 0.05 * h * w:
            return zero
        opt = np.where(ov, opt, 0).astype(np.float32)
        sar = np.where(sv, sar, 0).astype(np.float32)
        a = self._verify(self._coarse(opt, ov, sar, sv), opt, ov, sar, sv)
        od = self._desc(opt, ov, self.presmooth_opt)
        ov_d = od.any(0)
        aw = min(self.affine_win, (min(h, w) // 2) // 2 * 2)
        lw = min(self.local_win, (min(h, w) // 2) // 2 * 2)
        ls = min(self.local_stride, max(lw // 2, 8))
        a = self._refine_affine(a, od, ov_d, sar, sv, aw, 6)
        flow = coords.affine_to_flow_np(a, h, w)
        flow, q1 = self._refine_local(flow, od, ov_d, sar, sv, lw, ls, self.local_radius, tol=2.0)
        flow, q2 = self._refine_local(flow, od, ov_d, sar, sv, lw, ls, 2, tol=1.0)
        q = np.sqrt(np.clip(q1, 0, 1) * np.clip(q2, 0, 1))
        inside = coords.inside_mask_np(flow, h, w)
        sv_at = coords.warp_np(sv.astype(np.float32), flow, order=1, cval=0.0) > 0.5
        cert = np.clip(q, 0.0, 1.0) * (inside & sv_at & ov)
        return flow.astype(np.float32), cert.astype(np.float32)
