"""The SOMA network (CPU-sized): two-stream CNN encoder with FGE, and GLAM (global-local affine-flow
matching) ending in a dense flow and a certainty.

Contract (RoMa-like)::

    flow, certainty = net(opt, sar, opt_valid=None, sar_valid=None)

``opt``/``sar`` are ``(B, 1, H, W)`` float32 standardised tiles (:mod:`soma_cli.model.preprocess`),
``H``/``W`` multiples of :data:`TILE_MULTIPLE`; ``flow`` is ``(B, 2, H, W)`` in pixels on the optical
grid (:mod:`soma_cli.coords` convention: optical pixel ``q`` matches the SAR at ``q + flow(q)``) and
``certainty`` ``(B, 1, H, W)`` in ``[0, 1]``.  :meth:`SomaNet.run` returns every intermediate (per
level affines and flows, logits) for training.  Every warp, affine and flow resampling goes through
:mod:`soma_cli.coords`.  The module is ``torch.jit.script``-able.

Structure:

* encoder per modality (separate weights): strided conv blocks at strides 2, 4, 8, 16; an FGE
  (Feature Gradient Enhancer) after the stride 2, 4 and 8 blocks;
* GLAM: (1) global affine at stride 16 from an all-pairs correlation (L2-normalised features, softmax
  with a learnt temperature, windowed soft-argmax around the best match, weighted IRLS affine fit);
  (2) affine refinement at stride 8 and 4 (warp, local correlation, soft-argmax, weighted affine
  update composed as ``compose_affine(current, update)``); (3) dense flow at stride 4 and 2 (local
  correlation + features -> flow update and certainty logit), upsampled with the flow rescaled, and a
  tiny full-resolution head on shallow features.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import coords

TILE_MULTIPLE = 32
ANGLES_DEG = [0.0, 22.5, 45.0, 67.5, 90.0, 112.5, 135.0, 157.5]


# ----------------------------------------------------------------------------- oriented kernels


def sobel_pair(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sobel ``(Gx, Gy)`` of size 3 or 5 (smoothing x derivative outer products), x along columns."""
    if size == 3:
        smooth = torch.tensor([1.0, 2.0, 1.0])
        deriv = torch.tensor([-1.0, 0.0, 1.0])
    elif size == 5:
        smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        deriv = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0])
    else:
        raise ValueError("Sobel size must be 3 or 5")
    gx = torch.outer(smooth, deriv)  # rows smooth, columns derivative
    gy = torch.outer(deriv, smooth)
    return gx, gy


def oriented_kernels(size: int, angles_deg: List[float]) -> torch.Tensor:
    """``(len(angles), size, size)`` exact rotations of the Sobel pair: ``cos(t) Gx + sin(t) Gy``
    (the directional derivative along ``t``, measured from the column axis towards the row axis)."""
    gx, gy = sobel_pair(size)
    out = []
    for a in angles_deg:
        t = math.radians(a)
        out.append(math.cos(t) * gx + math.sin(t) * gy)
    return torch.stack(out)


# ----------------------------------------------------------------------------- building blocks


def conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.LeakyReLU(0.1))


class FGE(nn.Module):
    """Feature Gradient Enhancer: learnable oriented gradient filters (8 directions x 2 scales,
    initialised from exactly rotated Sobel kernels) applied depthwise to a channel reduction of the
    features, magnitude, SE channel attention, CBAM spatial attention, 1x1 reconstruction, residual."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        g = min(channels, groups)
        self.g = g
        self.n_dir = len(ANGLES_DEG)
        self.reduce = nn.Conv2d(channels, g, 1)
        self.k3 = nn.Parameter(oriented_kernels(3, ANGLES_DEG) / 8.0)
        self.k5 = nn.Parameter(oriented_kernels(5, ANGLES_DEG) / 96.0)
        n = 2 * self.n_dir * g
        hidden = max(n // 4, 8)
        self.se1 = nn.Conv2d(n, hidden, 1)
        self.se2 = nn.Conv2d(hidden, n, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.recon = nn.Conv2d(n, channels, 1)
        nn.init.normal_(self.recon.weight, std=0.01)
        nn.init.zeros_(self.recon.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        w3 = self.k3.unsqueeze(0).expand(self.g, self.n_dir, 3, 3).reshape(self.g * self.n_dir, 1, 3, 3)
        w5 = self.k5.unsqueeze(0).expand(self.g, self.n_dir, 5, 5).reshape(self.g * self.n_dir, 1, 5, 5)
        e3 = F.conv2d(r, w3, padding=1, groups=self.g)
        e5 = F.conv2d(r, w5, padding=2, groups=self.g)
        e = torch.cat([e3, e5], 1).abs()  # polarity-free oriented gradient energy
        ca = torch.sigmoid(self.se2(F.relu(self.se1(e.mean((2, 3), keepdim=True)))))
        e = e * ca
        sa = torch.sigmoid(self.spatial(torch.cat([e.mean(1, keepdim=True), e.amax(1, keepdim=True)], 1)))
        e = e * sa
        return x + self.recon(e)


class Encoder(nn.Module):
    """One modality: features at strides 2, 4, 8 (FGE-enhanced) and 16, plus full-res shallow ones."""

    def __init__(self, ch: List[int]):
        super().__init__()
        self.shallow = conv(1, 8)
        self.l1 = nn.Sequential(conv(1, ch[0], 2), conv(ch[0], ch[0]))
        self.l2 = nn.Sequential(conv(ch[0], ch[1], 2), conv(ch[1], ch[1]))
        self.l3 = nn.Sequential(conv(ch[1], ch[2], 2), conv(ch[2], ch[2]))
        self.l4 = nn.Sequential(conv(ch[2], ch[3], 2), conv(ch[3], ch[3]), nn.Conv2d(ch[3], ch[3], 1))
        self.fge1 = FGE(ch[0], 4)
        self.fge2 = FGE(ch[1], 8)
        self.fge3 = FGE(ch[2], 8)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        f0 = self.shallow(x)
        f1 = self.fge1(self.l1(x))
        f2 = self.fge2(self.l2(f1))
        f3 = self.fge3(self.l3(f2))
        f4 = self.l4(f3)
        return [f0, f1, f2, f3, f4]


def local_corr(f1: torch.Tensor, f2: torch.Tensor, r: int) -> torch.Tensor:
    """``(B, (2r+1)^2, H, W)``: ``<f1(q), f2(q + (dx, dy))>`` for ``dy, dx`` in ``[-r, r]`` (dy outer)."""
    h = f1.shape[-2]
    w = f1.shape[-1]
    f2p = F.pad(f2, [r, r, r, r])
    out: List[torch.Tensor] = []
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out.append((f1 * f2p[:, :, dy:dy + h, dx:dx + w]).sum(1, keepdim=True))
    return torch.cat(out, 1)


def corr_offsets(r: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(1, K, 2, 1, 1)`` displacement ``(dx, dy)`` of each :func:`local_corr` channel."""
    d = torch.arange(-r, r + 1, device=device, dtype=dtype)
    dy = d.view(-1, 1).expand(2 * r + 1, 2 * r + 1).reshape(-1)
    dx = d.view(1, -1).expand(2 * r + 1, 2 * r + 1).reshape(-1)
    return torch.stack([dx, dy], 1).view(1, -1, 2, 1, 1)


def soft_argmax_local(logits: torch.Tensor, r: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Local correlation logits -> expected displacement ``(B, 2, H, W)`` and peak probability."""
    p = torch.softmax(logits, 1)
    off = corr_offsets(r, logits.device, logits.dtype)
    disp = (p.unsqueeze(2) * off).sum(1)
    return disp, p.amax(1, keepdim=True)


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Centre each channel over the tile (removes the response common to every position, which
    otherwise makes all cosine similarities alike), then L2-normalise per position."""
    x = x - x.mean((2, 3), keepdim=True)
    return F.normalize(x, p=2.0, dim=1, eps=1e-6)


def irls_affine(pts: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, k: float, iters: int) -> torch.Tensor:
    """Weighted affine fit (coords.fit_affine) with Cauchy IRLS re-weighting (scale ``k`` px)."""
    a = coords.fit_affine(pts, tgt, w)
    for _ in range(iters):
        pred = torch.bmm(pts, a[:, :, :2].transpose(1, 2)) + a[:, :, 2].unsqueeze(1)
        res2 = ((pred - tgt) ** 2).sum(-1)
        a = coords.fit_affine(pts, tgt, w / (1.0 + res2 / (k * k)))
    return a


def grid_points(b: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(b, h*w, 2)`` pixel-centre coordinates (x, y) of a level grid."""
    return coords.base_grid(b, h, w, device, dtype).flatten(2).transpose(1, 2)


class DenseHead(nn.Module):
    """Local correlation + features + soft-argmax -> flow update (2) and certainty logit (1)."""

    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, hidden, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.LeakyReLU(0.1),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.LeakyReLU(0.1),
            nn.Conv2d(hidden, 3, 3, padding=1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ----------------------------------------------------------------------------- the network


class SomaNet(nn.Module):
    def __init__(self, ch: Optional[List[int]] = None, coarse_dim: int = 64):
        super().__init__()
        if ch is None:
            ch = [16, 32, 48, 96]
        self.ch = ch
        self.enc_opt = Encoder(ch)
        self.enc_sar = Encoder(ch)
        self.proj_opt = nn.Conv2d(ch[3], coarse_dim, 1)
        self.proj_sar = nn.Conv2d(ch[3], coarse_dim, 1)
        # log temperatures of the cosine-similarity softmaxes (global, 1/8, 1/4 affine, 1/4, 1/2, 1)
        self.log_scale = nn.Parameter(torch.full((6,), math.log(10.0)))
        self.prior_weight = 0.05
        self.r_global = 2  # soft-argmax window around the best global match (cells)
        self.r_aff = 4
        self.r4 = 4
        self.r2 = 3
        self.r1 = 2
        k4 = (2 * self.r4 + 1) ** 2
        k2 = (2 * self.r2 + 1) ** 2
        k1 = (2 * self.r1 + 1) ** 2
        self.head4 = DenseHead(k4 + 2 * ch[1] + 2, 48)
        self.head2 = DenseHead(k2 + 2 * ch[0] + 2 + 1, 32)
        self.head1 = DenseHead(k1 + 16 + 2 + 1, 16)

    # -- stages ---------------------------------------------------------------------------------

    def global_affine(self, fo: torch.Tensor, fs: torch.Tensor, wo: torch.Tensor) -> Dict[str, torch.Tensor]:
        """All-pairs match at the coarse level -> affine in level pixels, plus the match logits."""
        b, c, h, w = fo.shape
        a = l2n(fo).flatten(2)
        s = l2n(fs).flatten(2)
        logits = torch.bmm(a.transpose(1, 2), s) * self.log_scale[0].exp()  # (B, N, M)
        prob = torch.softmax(logits, -1)
        pts = grid_points(b, h, w, fo.device, fo.dtype)  # (B, M, 2)
        best = torch.gather(pts, 1, prob.argmax(-1).unsqueeze(-1).expand(b, h * w, 2))  # (B, N, 2)
        d2 = ((pts.unsqueeze(1) - best.unsqueeze(2)) ** 2).sum(-1)  # (B, N, M)
        p = prob * (d2 <= float(self.r_global * self.r_global)).to(prob.dtype)
        mass = p.sum(-1)
        tgt = torch.bmm(p, pts) / mass.unsqueeze(-1).clamp(min=1e-6)
        wgt = mass * wo.flatten(1)
        # identity prior: every cell also votes for "no motion" with a small weight, so that
        # unconfident (untrained, featureless) correlations give the identity, not a collapsed fit
        prior = torch.full_like(wgt, self.prior_weight)
        aff = irls_affine(torch.cat([pts, pts], 1), torch.cat([tgt, pts], 1), torch.cat([wgt, prior], 1), 1.0, 3)
        return {"affine": aff, "logits": logits, "target": tgt, "conf": mass}

    def refine_affine(self, fo: torch.Tensor, fs: torch.Tensor, wo: torch.Tensor, a_full: torch.Tensor,
                      stride: int, temp: int) -> torch.Tensor:
        """One affine refinement at ``stride``; returns the updated full-resolution affine."""
        b, c, h, w = fo.shape
        a_lvl = coords.scale_affine(a_full, float(stride))
        fl = coords.affine_to_flow(a_lvl, h, w).detach()
        fsw = coords.warp(fs, fl)
        corr = local_corr(l2n(fo), l2n(fsw), self.r_aff) * self.log_scale[temp].exp()
        disp, conf = soft_argmax_local(corr, self.r_aff)
        pts = grid_points(b, h, w, fo.device, fo.dtype)
        tgt = pts + disp.flatten(2).transpose(1, 2)
        upd = irls_affine(pts, tgt, (conf * wo).flatten(1), 1.0, 2)
        a_lvl = coords.compose_affine(a_lvl, upd)
        return coords.scale_affine(a_lvl, 1.0 / float(stride))

    def dense_input(self, fo: torch.Tensor, fs: torch.Tensor, flow: torch.Tensor, r: int, temp: int,
                    prev_logit: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Head input for a flow (level pixels) refinement: local correlation of the SAR features
        warped by the current flow, features, soft-argmax; returns it and the new base flow."""
        flow = flow.detach()
        fsw = coords.warp(fs, flow)
        scale = self.log_scale[temp].exp()
        corr = local_corr(l2n(fo), l2n(fsw), r)
        disp, conf = soft_argmax_local(corr * scale, r)
        parts = [corr, fo, fsw, disp]
        if prev_logit is not None:
            parts.append(prev_logit)
        return torch.cat(parts, 1), flow + disp

    def dense_output(self, out: torch.Tensor, base: torch.Tensor,
                     prev_logit: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        logit = out[:, 2:3]
        if prev_logit is not None:
            logit = logit + prev_logit
        return base + out[:, 0:2], logit

    def run(self, opt: torch.Tensor, sar: torch.Tensor, opt_valid: Optional[torch.Tensor] = None,
            sar_valid: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Full pass returning intermediates: affines (full-res pixels), per-level flows (level
        pixels), the final flow and certainty logit."""
        b, _, hh, ww = opt.shape
        if opt_valid is None:
            vo = torch.ones_like(opt)
        else:
            vo = opt_valid.to(opt.dtype)
        if sar_valid is not None:
            sar = sar * sar_valid.to(sar.dtype)
        opt = opt * vo
        fo = self.enc_opt(opt)
        fs = self.enc_sar(sar)
        out: Dict[str, torch.Tensor] = {}

        # (1) global affine at stride 16
        co = self.proj_opt(fo[4])
        cs = self.proj_sar(fs[4])
        g = self.global_affine(co, cs, F.avg_pool2d(vo, 16))
        a_full = coords.scale_affine(g["affine"], 1.0 / 16.0)
        out["global_logits"] = g["logits"]
        out["affine16"] = a_full
        # (2) affine refinement at stride 8 and 4
        a_full = self.refine_affine(fo[3], fs[3], F.avg_pool2d(vo, 8), a_full, 8, 1)
        out["affine8"] = a_full
        a_full = self.refine_affine(fo[2], fs[2], F.avg_pool2d(vo, 4), a_full, 4, 2)
        out["affine4"] = a_full
        # (3) dense flow at stride 4, 2, then full resolution
        h4 = fo[2].shape[-2]
        w4 = fo[2].shape[-1]
        fl4 = coords.affine_to_flow(coords.scale_affine(a_full, 4.0), h4, w4)
        x, base = self.dense_input(fo[2], fs[2], fl4, self.r4, 3, None)
        fl4, lg4 = self.dense_output(self.head4(x), base, None)
        out["flow4"] = fl4
        out["logit4"] = lg4
        fl2 = coords.upsample_flow(fl4, 2)
        lg2 = F.interpolate(lg4, scale_factor=2.0, mode="bilinear", align_corners=False)
        x, base = self.dense_input(fo[1], fs[1], fl2, self.r2, 4, lg2)
        fl2, lg2 = self.dense_output(self.head2(x), base, lg2)
        out["flow2"] = fl2
        out["logit2"] = lg2
        fl1 = coords.upsample_flow(fl2, 2)
        lg1 = F.interpolate(lg2, scale_factor=2.0, mode="bilinear", align_corners=False)
        x, base = self.dense_input(fo[0], fs[0], fl1, self.r1, 5, lg1)
        fl1, lg1 = self.dense_output(self.head1(x), base, lg1)
        out["flow"] = fl1
        out["logit"] = lg1
        return out

    def forward(self, opt: torch.Tensor, sar: torch.Tensor, opt_valid: Optional[torch.Tensor] = None,
                sar_valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.run(opt, sar, opt_valid, sar_valid)
        flow = out["flow"]
        cert = torch.sigmoid(out["logit"])
        h = opt.shape[-2]
        w = opt.shape[-1]
        cert = cert * coords.inside_mask(flow, h, w)
        if opt_valid is not None:
            cert = cert * opt_valid.to(cert.dtype)
        if sar_valid is not None:
            sv = coords.warp(sar_valid.to(cert.dtype), flow)
            cert = cert * (sv > 0.99).to(cert.dtype)
        return flow, cert


def build(config: Optional[Dict[str, int]] = None) -> SomaNet:
    """The default architecture (``config`` is reserved for recorded hyper-parameters)."""
    return SomaNet()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
