"""The matching stages of SOMA's GLAM (global-local affine-flow matching), each a small module that
holds its part of the :class:`~soma_cli.model.config.SomaConfig`.

* :class:`GlobalSearch`: rotation hypotheses x all translations at stride 8, candidates verified by
  window support.
* :class:`AffineLevel`: iterated affine refinement at one stride from window correlation peaks.
* :class:`DenseLevel`: dense flow at one stride: correlation peaks, a robust consensus and a small
  head that adds a flow correction and a certainty logit.
* :class:`GlobalLocalBlend`: where the certainty is low, the output flow leans on the tile's affine.

Each stage gets the temperature of its correlation softmax (``exp`` of one of the network's
``log_scale`` entries) from the caller; temperatures only shape confidences and scores, not peaks.
Correlations of cell-pooled descriptors peak like cones, so the global and affine stages always
refine peaks with the equiangular fit; the dense levels choose per level (``cone``).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from . import geometry
from .config import AffineLevelConfig, DenseLevelConfig, GlobalConfig
from .correlation import norm_conv, peak_subpixel, window_stats, window_zncc, xcorr_shifts
from .encoder import nchw


def match_window(mo: torch.Tensor, ms: torch.Tensor, flow: torch.Tensor, radius: int, window: int,
                 temperature: torch.Tensor, cone: bool, step: int = 1,
                 stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Warp the SAR descriptors ``ms`` by ``flow`` (level pixels) and correlate ``window``-wide
    windows with ``mo`` over ``+-radius``; returns (correlation, sub-pixel displacement, peak
    confidence, warped SAR inside the level), at every ``step``-th position (:func:`geometry.subsample`).
    ``stats``: ``window_stats(mo, window, step)``, where ``mo`` is matched again."""
    corr = window_zncc(mo, geometry.warp(ms, flow), radius, window, step, stats)
    disp, interior = peak_subpixel(corr, radius, cone)
    conf = torch.softmax(corr * temperature, 1).amax(1, keepdim=True) * interior
    return corr, disp, conf, geometry.subsample(geometry.inside_mask(flow, mo.shape[-2], mo.shape[-1]), step)


class GlobalSearch(nn.Module):
    """Global affine at stride 8: the SAR descriptors are rotated by each hypothesis and correlated
    with the optical ones over all translations (mean correlation over the overlap, by FFT); the
    best translations of the best rotations (local maxima over the rotation axis) are candidates,
    and :meth:`verify` keeps the one with the most window support, matching as ``verify_level``."""

    def __init__(self, config: GlobalConfig, verify_level: AffineLevelConfig, fit_cauchy: float,
                 fit_iterations: int):
        super().__init__()
        self.max_rotation = config.max_rotation_deg
        self.rotation_step = config.rotation_step_deg
        self.radius = config.radius
        self.full_radius_cells = config.full_radius_cells
        self.min_radius = config.min_radius
        self.candidates = config.candidates
        self.min_overlap = config.min_overlap
        self.verify_radius = verify_level.radius
        self.verify_window = verify_level.window
        self.fit_cauchy = fit_cauchy
        self.fit_iterations = fit_iterations

    def n_rotations(self) -> int:
        return int(round(2.0 * self.max_rotation / self.rotation_step)) + 1

    def hypotheses(self, b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(b, K)``: the K rotation hypotheses in radians, the same for every sample."""
        k = self.n_rotations()
        t = (torch.arange(k, device=device, dtype=dtype) * self.rotation_step - self.max_rotation) * (math.pi / 180.0)
        return t.unsqueeze(0).expand(b, k)

    def rotation_affines(self, angles: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``(B * K, 2, 3)`` level-pixel affines ``p = R(t) (q - c) + c`` of the rotations ``angles``
        ``(B, K)`` (radians; hypothesis fastest), ``c`` the level centre."""
        t = angles.reshape(-1)
        cos = torch.cos(t)
        sin = torch.sin(t)
        cx = (w - 1) / 2.0
        cy = (h - 1) / 2.0
        tx = cx - (cos * cx - sin * cy)
        ty = cy - (sin * cx + cos * cy)
        return torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)

    def search_radius(self, h: int, w: int) -> int:
        """Translation search radius (cells) on an ``h x w``-cell level: the full radius from
        ``full_radius_cells`` cells on, in proportion to the shorter side below, at least
        ``min_radius``.  On a small tile a full search mostly adds false peaks at small overlaps."""
        return min(self.radius, max(self.min_radius, (self.radius * min(h, w)) // self.full_radius_cells))

    def forward(self, mo: torch.Tensor, ms: torch.Tensor, vo: torch.Tensor, vs: torch.Tensor,
                temperature: torch.Tensor, verify_temperature: torch.Tensor,
                rotation: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(affine in level pixels ``(B, 2, 3)``, scores ``(B, K, 2R+1, 2R+1)`` as logits).  With
        ``rotation`` ``(B,)`` (degrees), the one rotation searched instead of the K hypotheses (the
        scene's, :mod:`soma_cli.scene_rotation`): its best translation is the answer, with
        nothing to verify."""
        b, c, h, w = mo.shape
        r = self.search_radius(h, w)
        if rotation is None:
            angles = self.hypotheses(b, mo.device, mo.dtype)
        else:  # converted as the hypotheses are: a hypothesis given here is searched bit for bit alike
            angles = (rotation.to(mo.dtype) * (math.pi / 180.0)).view(b, 1)
        k = angles.shape[1]
        rot = self.rotation_affines(angles, h, w)
        fl = geometry.affine_to_flow(rot, h, w)
        msr = geometry.warp(ms.repeat_interleave(k, 0), fl)
        vsr = (geometry.warp(vs.repeat_interleave(k, 0), fl) > 0.99).to(mo.dtype)
        mor = (mo * vo).repeat_interleave(k, 0)
        vor = vo.repeat_interleave(k, 0)
        num = xcorr_shifts(mor, msr * vsr, r)
        den = xcorr_shifts(vor, vsr, r)
        score = num / den.clamp(min=self.min_overlap * float(h * w))  # mean cosine over the overlap
        n = 2 * r + 1
        logits = score.view(b, k, n, n) * temperature
        per_rot = logits.flatten(2).amax(2)  # (B, K)
        low = torch.full_like(per_rot[:, :1], -1e9)
        left = torch.cat([low, per_rot[:, :-1]], 1)
        right = torch.cat([per_rot[:, 1:], low], 1)
        peaks = torch.where((per_rot >= left) & (per_rot >= right), per_rot, per_rot - 1e6)
        nc = min(self.candidates, k)
        kb = peaks.topk(nc, 1).indices  # (B, C), best first
        sel = torch.gather(logits.flatten(2), 1, kb.unsqueeze(-1).expand(b, nc, n * n))
        d = peak_subpixel(sel.reshape(b * nc, n * n, 1, 1), r, True)[0].view(b * nc, 2)
        rsel = torch.gather(rot.view(b, k, 6), 1, kb.unsqueeze(-1).expand(b, nc, 6)).view(b * nc, 2, 3)
        eye = torch.eye(2, device=mo.device, dtype=mo.dtype).unsqueeze(0).expand(b * nc, 2, 2)
        cands = geometry.compose_affine(rsel, torch.cat([eye, d.unsqueeze(-1)], -1))
        if nc == 1:
            return cands, logits
        return self.verify(mo, ms, vo, vs, cands.view(b, nc, 2, 3), verify_temperature), logits

    def verify(self, mo: torch.Tensor, ms: torch.Tensor, vo: torch.Tensor, vs: torch.Tensor,
               cands: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        """Pick, per sample, the candidate affine ``(B, C, 2, 3)`` (level pixels) whose warped SAR
        descriptors have the most window support: window correlation peaks, one robust affine fit,
        and the confidence-weighted share of positions within 1 cell of it."""
        b, nc = cands.shape[0], cands.shape[1]
        h = mo.shape[-2]
        w = mo.shape[-1]
        fl = geometry.affine_to_flow(cands.reshape(b * nc, 2, 3), h, w)
        vsw = (geometry.warp(vs.repeat_interleave(nc, 0), fl) > 0.99).to(mo.dtype)
        _, disp, conf, inside = match_window(mo.repeat_interleave(nc, 0), ms.repeat_interleave(nc, 0), fl,
                                             radius=self.verify_radius, window=self.verify_window,
                                             temperature=temperature, cone=True)
        wt = conf * vo.repeat_interleave(nc, 0) * vsw * inside
        pts = geometry.grid_points(b * nc, h, w, mo.device, mo.dtype)
        tgt = pts + disp.flatten(2).transpose(1, 2)
        upd = geometry.robust_fit_affine(pts, tgt, wt.flatten(1), self.fit_cauchy, self.fit_iterations)
        near = (((geometry.affine_points(upd, pts) - tgt) ** 2).sum(-1) < 1.0).to(mo.dtype)
        support = (wt.flatten(1) * near).sum(1).view(b, nc)
        best = support.argmax(1)
        return cands[torch.arange(b, device=mo.device), best]


class AffineLevel(nn.Module):
    """Affine refinement at ``stride``: window correlation of the warped descriptors, sub-pixel
    peaks, a confidence-weighted robust affine fit composed onto the current affine; repeated
    ``iterations`` times."""

    def __init__(self, stride: int, config: AffineLevelConfig, fit_cauchy: float, fit_iterations: int):
        super().__init__()
        self.stride = stride
        self.iterations = config.iterations
        self.radius = config.radius
        self.window = config.window
        self.step = config.step
        self.fit_cauchy = fit_cauchy
        self.fit_iterations = fit_iterations

    def forward(self, mo: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, affine: torch.Tensor,
                temperature: torch.Tensor) -> torch.Tensor:
        """``affine`` (full-resolution pixels) refined on this level's descriptors."""
        stats = window_stats(mo, self.window, self.step)  # the optical windows, the same every round
        for _ in range(self.iterations):
            affine = self.refine(mo, ms, valid, affine, temperature, stats)
        return affine

    def refine(self, mo: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, affine: torch.Tensor,
               temperature: torch.Tensor, stats: Tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """One round: match, fit, compose.  ``stats``: ``window_stats(mo, window, step)``."""
        b, c, h, w = mo.shape
        a_lvl = geometry.scale_affine(affine, float(self.stride))
        fl = geometry.affine_to_flow(a_lvl, h, w).detach()
        _, disp, conf, inside = match_window(mo, ms, fl, radius=self.radius, window=self.window,
                                             temperature=temperature, cone=True, step=self.step, stats=stats)
        pts = geometry.grid_points(b, h, w, mo.device, mo.dtype, self.step)
        tgt = pts + disp.flatten(2).transpose(1, 2)
        wt = conf * geometry.subsample(valid, self.step) * inside
        upd = geometry.robust_fit_affine(pts, tgt, wt.flatten(1), self.fit_cauchy, self.fit_iterations)
        return geometry.scale_affine(geometry.compose_affine(a_lvl, upd), 1.0 / float(self.stride))


class DenseHead(nn.Module):
    """Peak displacement, its robust consensus, peak confidence, support (and the previous level's
    certainty logit) -> flow correction (2) and certainty logit (1)."""

    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, hidden, 1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv2d(hidden, 3, 3, padding=1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels last: oneDNN's convolutions run without reordering (about 1.8 times faster on
        # the CPU at full resolution, the same values)
        return nchw(self.net(x.contiguous(memory_format=torch.channels_last)))


class DenseLevel(nn.Module):
    """Dense refinement of a level flow: correlation peaks, then a robust consensus
    (confidence-weighted window means with Cauchy re-weighting, shrunk towards no update where the
    support is weak), then :class:`DenseHead`.  With ``step`` > 1 peaks and consensus are computed
    at every ``step``-th position (consensus window ``smooth / step`` samples) and interpolated back
    (:func:`geometry.densify`): the consensus is a mean over ``smooth`` pixels, so it is as smooth as
    the samples allow."""

    def __init__(self, config: DenseLevelConfig, first: bool, hidden: int, consensus_iterations: int,
                 shrink: float):
        super().__init__()
        self.radius = config.radius
        self.window = config.window
        self.smooth = config.smooth
        self.step = config.step
        self.cone = config.cone
        self.consensus_iterations = consensus_iterations
        self.shrink = shrink
        # displacement (2), consensus (2), confidence, support, and below the first level the
        # previous level's certainty logit
        self.head = DenseHead(6 if first else 7, hidden)

    def forward(self, mo: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, flow: torch.Tensor,
                temperature: torch.Tensor,
                prev_logit: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(refined flow, certainty logit accumulated over levels, consensus support (detached)),
        all at this level's resolution; ``flow`` in level pixels."""
        x, base = self.head_input(mo, ms, valid, flow, temperature, prev_logit)
        out = self.head(x)
        logit = out[:, 2:3]
        if prev_logit is not None:
            logit = logit + prev_logit
        return base + out[:, 0:2], logit, x[:, 5:6].detach()

    def head_input(self, mo: torch.Tensor, ms: torch.Tensor, valid: torch.Tensor, flow: torch.Tensor,
                   temperature: torch.Tensor, prev_logit: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(head input, base flow = ``flow`` plus the consensus)."""
        flow = flow.detach()
        h = mo.shape[-2]
        w = mo.shape[-1]
        step = self.step
        corr, disp, conf, inside = match_window(mo, ms, flow, radius=self.radius, window=self.window,
                                                temperature=temperature, cone=self.cone, step=step)
        wt = conf * geometry.subsample(valid, step) * inside
        k = (self.smooth // step) | 1
        disp_s, sup = norm_conv(disp, wt, k)
        for _ in range(self.consensus_iterations):
            res2 = ((disp - disp_s) ** 2).sum(1, keepdim=True)
            disp_s, sup = norm_conv(disp, wt / (1.0 + res2), k)
        disp_s = disp_s * (sup / (sup + self.shrink))
        x = geometry.densify(torch.cat([disp, disp_s, conf, sup], 1), step, h, w)
        if prev_logit is not None:
            x = torch.cat([x, prev_logit], 1)
        return x, flow + x[:, 2:4]  # channels 2:4 of x: the consensus, at every position


class GlobalLocalBlend(nn.Module):
    """``cert * flow + (1 - cert) * A`` where ``A`` is the flow of the certainty-weighted robust
    affine fit of ``flow`` on every ``step``-th pixel: where the local match is unsure, the tile's
    affine takes over.  ``flow`` ``(B, 2, H, W)`` pixels, ``cert`` ``(B, 1, H, W)`` in [0, 1]."""

    def __init__(self, step: int, cauchy: float, iterations: int):
        super().__init__()
        self.step = step
        self.cauchy = cauchy
        self.iterations = iterations

    def forward(self, flow: torch.Tensor, cert: torch.Tensor) -> torch.Tensor:
        b = flow.shape[0]
        h = flow.shape[-2]
        w = flow.shape[-1]
        s = self.step
        pts = geometry.grid_points(b, h, w, flow.device, flow.dtype, s)
        tgt = pts + geometry.subsample(flow, s).flatten(2).transpose(1, 2)
        a = geometry.robust_fit_affine(pts, tgt, geometry.subsample(cert, s).flatten(1), self.cauchy,
                                       self.iterations)
        return cert * flow + (1.0 - cert) * geometry.affine_to_flow(a, h, w)
