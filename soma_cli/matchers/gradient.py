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

from typing import Optional

import numpy as np

from .. import coords
from ..cpu import CpuShare
from .gradient_ops import (
    WindowGrid, _affine_ok, _fit_window_affine, _median_consistency, _pool, _rotation_about_centre, _smooth_grid,
    _translation, descriptor, global_ncc, match_windows, window_quality,
)


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
