"""The SOMA network (CPU-sized): two-stream encoder with FGE, and GLAM (global-local affine-flow
matching) ending in a dense flow and a certainty.

Contract (RoMa-like)::

    flow, certainty = net(opt, sar, opt_valid=None, sar_valid=None)

``opt``/``sar`` are ``(B, 1, H, W)`` float32 standardised tiles (:mod:`soma_cli.preprocess`),
``H``/``W`` multiples of :data:`TILE_MULTIPLE`; ``flow`` is ``(B, 2, H, W)`` in pixels on the optical
grid (:mod:`soma_cli.coords` convention: optical pixel ``q`` matches the SAR at ``q + flow(q)``) and
``certainty`` ``(B, 1, H, W)`` in ``[0, 1]``.  :meth:`SomaNet.run` returns every intermediate (per
level affines and flows, global scores, logits) for training.  Every warp, affine and flow resampling
goes through :mod:`soma_cli.coords`.  The module is ``torch.jit.script``-able.

Structure (version 4, "structure first"):

* **encoder** per modality (separate weights).  A level-0 FGE on the image (learnable oriented
  gradient filters, 8 directions x 3x3 and 5x5, initialised from exactly rotated Sobel kernels,
  polarity-free magnitude, per-channel gain) gives a dense structural descriptor; it is pooled into
  cells at strides 2, 4 and 8.  A small CNN trunk with an FGE (oriented filters on deep features,
  channel and spatial attention, reconstruction, residual) after its stride 2, 4 and 8 blocks adds
  learnt channels at each of those levels.  The matching descriptor of a level is the concatenation,
  centred per channel and L2-normalised per position (:func:`l2n`).
* **GLAM**: (1) a global affine at stride 8: the SAR descriptor is rotated by a set of hypotheses
  (+-20 degrees) and correlated with the optical one over all translations (masked mean
  correlation, by FFT); the best translations of the three best rotations are candidates, and the
  one with the most window support (:meth:`SomaNet.verify`) gives the affine.  The SAR *image* is
  then resampled by it and encoded again, so that its oriented channels are in the optical frame
  (warping the descriptors of a rotated image would leave them in the SAR frame); (2) affine
  refinement at strides 8, 4 and 2 (iterated :attr:`SomaNet.n_aff8`, ``n_aff4`` and ``n_aff2``
  times): window correlation of the warped descriptors (zero-normalised over each window,
  :func:`window_zncc`), sub-pixel peaks (equiangular fit, :func:`equiangular`, as correlations of
  pooled cells peak like cones), confidence-weighted IRLS affine fit (at 1/2 optionally from every
  :attr:`SomaNet.aff_step2`-th window; 1, every window, as shipped), composed as
  ``compose_affine(current, update)``; (3) dense flow at strides 4, 2 and full resolution: window
  correlation -> sub-pixel peak, confidence-weighted smoothing (at full resolution from every
  fourth position, :attr:`SomaNet.dense_step1`, then interpolated), and a small head that adds a
  flow correction and the certainty logit; flows are rescaled when upsampled.

At initialisation the learnt channels are small and the descriptor is a CFOG-like oriented-gradient
descriptor, so the untrained network already matches like a structural-gradient matcher; training
tunes the filters, the learnt channels, the temperatures and the heads.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import geometry

TILE_MULTIPLE = 32
# the certainty calibration's supports are scaled by this before their weights (SomaNet.cert_w), so
# that the fitted weights are O(1) and Adam reaches them in a few hundred steps
CERT_GAIN = 10.0
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


class GradientDescriptor(nn.Module):
    """Level-0 FGE on the image: Gaussian pre-smoothing (sigma 1), learnable oriented gradient filters
    (8 directions x 3x3 and 5x5, exactly rotated Sobel initialisation), polarity-free magnitude and a
    learnable per-channel gain.  ``(B, 1, H, W)`` -> ``(B, 16, H, W)``."""

    def __init__(self):
        super().__init__()
        self.n_dir = len(ANGLES_DEG)
        self.k3 = nn.Parameter(oriented_kernels(3, ANGLES_DEG) / 8.0)
        self.k5 = nn.Parameter(oriented_kernels(5, ANGLES_DEG) / 96.0)
        self.gain = nn.Parameter(torch.ones(2 * self.n_dir))
        self.register_buffer("g1", gaussian_1d(1.0, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = blur(x, self.g1)
        e3 = F.conv2d(xs, self.k3.unsqueeze(1), padding=1)
        e5 = F.conv2d(xs, self.k5.unsqueeze(1), padding=2)
        return torch.cat([e3, e5], 1).abs() * self.gain.view(1, -1, 1, 1)


def gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable depthwise blur with the 1-D kernel ``g`` (replicate padding)."""
    c = x.shape[1]
    r = (g.shape[0] - 1) // 2
    kx = g.view(1, 1, 1, -1).expand(c, 1, 1, g.shape[0])
    ky = g.view(1, 1, -1, 1).expand(c, 1, g.shape[0], 1)
    x = F.conv2d(F.pad(x, [r, r, 0, 0], mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, [0, 0, r, r], mode="replicate"), ky, groups=c)


def cell_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """Overlapping cells (``2s`` wide, stride ``s``): full resolution -> stride-``s`` level."""
    return F.avg_pool2d(x, 2 * s, s, s // 2, count_include_pad=False)


def window_counts(n: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n,)``: how many of the ``k`` positions (odd ``k``) of the window centred on each of ``n``
    positions lie inside the axis."""
    r = k // 2
    i = torch.arange(n, device=device, dtype=dtype)
    return torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1


def box_1d(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Mean over ``k`` consecutive values (odd ``k``, centred) along ``dim`` (2 = rows, 3 = columns)
    of a ``(B, C, H, W)`` tensor, averaging only what lies inside, from a cumulative sum (cost
    independent of ``k``)."""
    r = k // 2
    n = x.shape[dim]
    if r >= n:  # the window covers everything: the mean of the whole axis
        return x.mean(dim, keepdim=True).expand_as(x).contiguous()
    shape = [1, 1, 1, n] if dim == 3 else [1, 1, n, 1]
    c = torch.cumsum(x, dim)
    # window sum at i: c[min(i + r, n - 1)] - c[i - r - 1] (nothing to subtract for i <= r)
    s = torch.cat([c.narrow(dim, r, n - r), c.narrow(dim, n - 1, 1).expand_as(c.narrow(dim, 0, r))], dim)
    s.narrow(dim, r + 1, n - r - 1).sub_(c.narrow(dim, 0, n - r - 1))
    return s / window_counts(n, k, x.device, x.dtype).view(shape)


def box(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a ``k x k`` window (odd ``k``; stride 1, same size; borders average what is inside),
    as two separable passes of cumulative sums (4-5 times faster than average pooling on a CPU, even
    for 5 px windows; they agree to 1e-5)."""
    y = box_1d(x, k, 3).transpose(2, 3).contiguous()
    return box_1d(y, k, 3).transpose(2, 3).contiguous()


class Encoder(nn.Module):
    """One modality: raw matching descriptors at strides 1, 2, 4 and 8 (see the module doc)."""

    def __init__(self, ch: List[int], learnt: int = 16):
        super().__init__()
        self.grad = GradientDescriptor()
        self.register_buffer("g2", gaussian_1d(2.0, 4))
        self.l1 = nn.Sequential(conv(1, ch[0], 2), conv(ch[0], ch[0]))
        self.l2 = nn.Sequential(conv(ch[0], ch[1], 2), conv(ch[1], ch[1]))
        self.l3 = nn.Sequential(conv(ch[1], ch[2], 2), conv(ch[2], ch[2]))
        self.fge1 = FGE(ch[0], 4)
        self.fge2 = FGE(ch[1], 8)
        self.fge3 = FGE(ch[2], 8)
        self.p2 = nn.Conv2d(ch[0], learnt, 1)
        self.p4 = nn.Conv2d(ch[1], learnt, 1)
        self.p8 = nn.Conv2d(ch[2], learnt, 1)
        for p in (self.p2, self.p4, self.p8):
            nn.init.normal_(p.weight, std=0.02)
            nn.init.zeros_(p.bias)

    def forward(self, x: torch.Tensor, full: bool = True) -> List[torch.Tensor]:
        """``[m1, m2, m4, m8]``, or ``[m8]`` alone when not ``full``."""
        e = self.grad(x)
        f1 = self.fge1(self.l1(x))
        f2 = self.fge2(self.l2(f1))
        f3 = self.fge3(self.l3(f2))
        m8 = torch.cat([cell_pool(e, 8), self.p8(f3)], 1)
        if not full:
            return [m8]
        m1 = blur(e, self.g2)
        m2 = torch.cat([cell_pool(e, 2), self.p2(f1)], 1)
        m4 = torch.cat([cell_pool(e, 4), self.p4(f2)], 1)
        return [m1, m2, m4, m8]


def local_corr(f1: torch.Tensor, f2: torch.Tensor, r: int, step: int = 1) -> torch.Tensor:
    """``(B, (2r+1)^2, H', W')``: ``<f1(q), f2(q + (dx, dy))>`` for ``dy, dx`` in ``[-r, r]`` (dy outer),
    at the positions ``q`` of :func:`geometry.subsample` (all of them when ``step`` is 1)."""
    h = f1.shape[-2]
    w = f1.shape[-1]
    o = step // 2  # geometry.subsample's first position, on the channels-last layout below
    # channels last: the per-shift channel sums run over contiguous memory (twice as fast on a CPU)
    a = geometry.subsample(f1, step).permute(0, 2, 3, 1).contiguous()
    f2p = F.pad(f2, [r, r, r, r]).permute(0, 2, 3, 1).contiguous()
    out: List[torch.Tensor] = []
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out.append((a * f2p[:, dy:dy + h, dx:dx + w, :][:, o::step, o::step, :]).sum(-1))
    return torch.stack(out, 1)


def shifted(x: torch.Tensor, r: int, step: int = 1) -> torch.Tensor:
    """``(B, (2r+1)^2, H', W')``: the one-channel ``x`` read at ``q + (dx, dy)`` for ``dy, dx`` in
    ``[-r, r]`` (zero outside; the channel order of :func:`local_corr`), ``q`` as in :func:`geometry.subsample`."""
    h = x.shape[-2]
    w = x.shape[-1]
    xp = F.pad(x, [r, r, r, r])
    out: List[torch.Tensor] = []
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out.append(geometry.subsample(xp[:, :, dy:dy + h, dx:dx + w], step))
    return torch.cat(out, 1)


def window_zncc(f1: torch.Tensor, f2: torch.Tensor, r: int, k: int, step: int = 1) -> torch.Tensor:
    """``(B, (2r+1)^2, H', W')`` zero-normalised cross-correlation of ``k x k`` windows of ``f1``
    (centred on ``q``) and ``f2`` (centred on ``q + (dx, dy)``), ``dy, dx`` in ``[-r, r]`` (dy outer,
    as :func:`local_corr`); each window's mean descriptor is removed before the correlation, as in
    the window ZNCC of CFOG-like matchers, so a texture common to the whole window (speckle, a
    dominant orientation) does not lift every shift alike.  Values are in ``[-1, 1]``; a window
    without variance scores 0, a shift whose window centre ``q + d`` lies outside the image -1.
    With ``step`` > 1 only the window centres ``q`` of :func:`geometry.subsample` are scored (the
    same values, for less work where wide windows overlap).

    Computed from box filters: ``sum(f1 f2) - <mean f1, mean f2>`` over the window, divided by the
    square root of both windows' variances (shifted to ``q + d`` for ``f2``)."""
    m1 = box(f1, k)
    m2 = box(f2, k)
    v1 = (box((f1 * f1).sum(1, keepdim=True), k) - (m1 * m1).sum(1, keepdim=True)).clamp(min=0.0)
    v2 = (box((f2 * f2).sum(1, keepdim=True), k) - (m2 * m2).sum(1, keepdim=True)).clamp(min=0.0)
    if step == 1:
        prod = box(local_corr(f1, f2, r), k)
    else:
        # window sums along each row, only the kept columns; then (transposed, so that the cumulative
        # sum runs over contiguous memory) along each column, only the kept rows
        o = step // 2
        prod = box_1d(local_corr(f1, f2, r), k, 3)[:, :, :, o::step].transpose(2, 3).contiguous()
        prod = box_1d(prod, k, 3)[:, :, :, o::step].transpose(2, 3)
    num = prod - local_corr(m1, m2, r, step)
    # a window without variance has no correlation: it scores 0 (not num / eps, which reached |z| of
    # thousands along the borders, where shifted() reads zero variance); a shift whose window centre
    # lies outside the image is no candidate: -1; rounding in the box sums can push |z| past 1: clamped
    vv = geometry.subsample(v1, step) * shifted(v2, r, step)
    ok = vv > 1e-6
    z = num / torch.sqrt(torch.where(ok, vv, torch.ones_like(vv)))
    z = torch.where(ok, z, torch.zeros_like(z)).clamp(-1.0, 1.0)
    inside = shifted(torch.ones_like(v2), r, step) > 0.5
    return torch.where(inside, z, -torch.ones_like(z))


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Centre each channel over the tile (removes the response common to every position, which
    otherwise makes all cosine similarities alike), then L2-normalise per position."""
    x = x - x.mean((2, 3), keepdim=True)
    # as F.normalize(x, dim=1, eps=1e-6), whose strided channel norm is 3x slower on the CPU
    return x / (x * x).sum(1, keepdim=True).sqrt().clamp(min=1e-6)


def irls_affine(pts: torch.Tensor, tgt: torch.Tensor, w: torch.Tensor, k: float, iters: int,
                similarity: bool = False) -> torch.Tensor:
    """Weighted affine fit (geometry.fit_affine, or with ``similarity`` geometry.fit_similarity) with
    Cauchy IRLS re-weighting (scale ``k`` px)."""
    a = geometry.fit_similarity(pts, tgt, w) if similarity else geometry.fit_affine(pts, tgt, w)
    for _ in range(iters):
        res2 = ((geometry.affine_points(a, pts) - tgt) ** 2).sum(-1)
        wr = w / (1.0 + res2 / (k * k))
        a = geometry.fit_similarity(pts, tgt, wr) if similarity else geometry.fit_affine(pts, tgt, wr)
    return a


def grid_points(b: int, h: int, w: int, device: torch.device, dtype: torch.dtype, step: int = 1) -> torch.Tensor:
    """``(b, N, 2)`` pixel-centre coordinates (x, y) of a level grid, at the positions of
    :func:`geometry.subsample` (all ``h*w`` of them when ``step`` is 1)."""
    return geometry.subsample(geometry.base_grid(b, h, w, device, dtype), step).flatten(2).transpose(1, 2)


def peak_subpixel(corr: torch.Tensor, r: int, cone: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Displacement ``(B, 2, H, W)`` of the best :func:`local_corr` channel, refined per axis from the
    peak and its two neighbours (a parabola, or with ``cone`` the :func:`equiangular` V fit), and ``(B, 1, H, W)`` = 1 where the peak is
    inside the search window (a peak on its border is no peak: the true one may lie beyond)."""
    n = 2 * r + 1
    c0, idx = corr.max(1, keepdim=True)  # the first maximum, as argmax (and faster over channels)
    iy = torch.div(idx, n, rounding_mode="floor")
    ix = idx - iy * n
    cxm = torch.gather(corr, 1, iy * n + (ix - 1).clamp(min=0))
    cxp = torch.gather(corr, 1, iy * n + (ix + 1).clamp(max=n - 1))
    cym = torch.gather(corr, 1, (iy - 1).clamp(min=0) * n + ix)
    cyp = torch.gather(corr, 1, (iy + 1).clamp(max=n - 1) * n + ix)
    okx = ((ix > 0) & (ix < n - 1)).to(corr.dtype)
    oky = ((iy > 0) & (iy < n - 1)).to(corr.dtype)
    if cone:
        ox = equiangular(cxm, c0, cxp) * okx
        oy = equiangular(cym, c0, cyp) * oky
    else:
        ox = parabola(cxm, c0, cxp) * okx
        oy = parabola(cym, c0, cyp) * oky
    return torch.cat([ix.to(corr.dtype) - r + ox, iy.to(corr.dtype) - r + oy], 1), okx * oky


def equiangular(cm: torch.Tensor, c0: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
    """Vertex offset in ``[-0.5, 0.5]`` of the symmetric V (equiangular lines) through
    ``(-1, cm), (0, c0), (1, cp)``.  Correlations of cell-pooled descriptors peak like a cone, for
    which a parabola pulls the offset towards the integer (by about 40 % at stride 8 and 30 % at
    stride 4 on real chips); the V fit is close to unbiased there."""
    den = (c0 - torch.minimum(cm, cp)).clamp(min=1e-6)
    return (0.5 * (cp - cm) / den).clamp(-0.5, 0.5)


def parabola(cm: torch.Tensor, c0: torch.Tensor, cp: torch.Tensor) -> torch.Tensor:
    """Vertex offset in ``[-0.5, 0.5]`` of the parabola through ``(-1, cm), (0, c0), (1, cp)``."""
    den = (cm - 2.0 * c0 + cp).clamp(max=-1e-6)
    return (0.5 * (cm - cp) / den).clamp(-0.5, 0.5)


def xcorr_shifts(a: torch.Tensor, b: torch.Tensor, r: int) -> torch.Tensor:
    """``(N, 2r+1, 2r+1)``: ``out[n, r+dy, r+dx] = sum_{c,q} a[n,c,q] b[n,c,q+(dx,dy)]`` (zero outside),
    by zero-padded FFTs."""
    h = a.shape[-2]
    w = a.shape[-1]
    hh = h + r + 1
    ww = w + r + 1
    fa = torch.fft.rfft2(a, s=[hh, ww])
    fb = torch.fft.rfft2(b, s=[hh, ww])
    c = torch.fft.irfft2((fa.conj() * fb).sum(1), s=[hh, ww])
    rows = torch.cat([c[:, hh - r:], c[:, :r + 1]], 1)
    return torch.cat([rows[:, :, ww - r:], rows[:, :, :r + 1]], 2)


def window_fraction(h: int, w: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(1, 1, h, w)``: the share of each centred ``k x k`` window (odd ``k``) that lies inside an
    ``h x w`` grid (1 in the interior, about 1/4 at a corner)."""
    fy = window_counts(h, k, device, dtype) / float(k)
    fx = window_counts(w, k, device, dtype) / float(k)
    return (fy.view(h, 1) * fx.view(1, w)).view(1, 1, h, w)


def norm_conv(x: torch.Tensor, w: torch.Tensor, k: int, edge: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted window mean of ``x`` (weights ``w``) and the window mean of ``w``.  The mean is
    over the part of the window inside the grid; so is the support, unless ``edge``, where the
    outside counts as zero weight, as an invalid pixel inside does (:func:`window_fraction`)."""
    ws = box(w, k)
    mean = box(x * w, k) / ws.clamp(min=1e-4)
    if edge:
        ws = ws * window_fraction(w.shape[-2], w.shape[-1], k, w.device, w.dtype)
    return mean, ws


class DenseHead(nn.Module):
    """Peak displacement, its robust consensus, peak confidence, support (and the previous level's
    certainty logit) -> flow correction (2) and certainty logit (1)."""

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
    def __init__(self, ch: Optional[List[int]] = None, learnt: int = 16):
        super().__init__()
        if ch is None:
            ch = [16, 32, 64]
        self.ch = ch
        self.enc_opt = Encoder(ch, learnt)
        self.enc_sar = Encoder(ch, learnt)
        # log temperatures of the correlation softmaxes (global, 1/8, 1/4 affine, 1/4, 1/2, 1 dense);
        # they only shape the confidences and the global scores, not the sub-pixel peaks
        self.log_scale = nn.Parameter(torch.full((6,), math.log(50.0)))
        self.max_rotation = 20.0
        self.rotation_step = 4.0
        # translation search at stride 8 (cells): +-80 px for tiles of 512 px and more, proportionally
        # less below (:meth:`global_radius`)
        self.r_global = 10
        self.cone_fit = True  # V-shaped sub-pixel peak fit at strides 8, 4, 2 (parabola at full resolution)
        self.n_candidates = 3  # global (rotation, translation) candidates verified by window support
        self.min_overlap = 0.3
        # search radius (cells) of the affine refinement at 1/8 and of the candidates' verification
        # (r_aff8), and of the refinements at 1/4 and 1/2 (r_aff).  Wider searches were tried with
        # benchmarks/knob_sweep.py and not kept (model card, "Tried after 0.7.0")
        self.r_aff8 = 3
        self.r_aff = 3
        # affine refinement iterations at 1/8, 1/4 and 1/2, their window sizes (cells), and the
        # Cauchy scale of the fits' re-weighting (level pixels)
        self.n_aff8 = 3
        self.n_aff4 = 2
        self.n_aff2 = 2
        self.agg8 = 5
        self.agg4 = 9
        self.agg2 = 63
        self.aff_k = 1.0
        # the 1/8 refinement and the candidates' verification fit a similarity (4 parameters) instead
        # of a full affine; off in 0.9.0 (model card, "Tried after 0.9.0": scored on one bench only)
        self.aff_similarity = False
        # the 1/2 affine fit uses every aff_step2-th window (63-cell windows overlap almost entirely)
        self.aff_step2 = 1
        # re-encode the SAR resampled by the refined 1/2 affine (not only the global one) before the
        # dense stages, so that they start from the same frame whatever the tile's rotation; costs one
        # more SAR encoder pass.  Off: it lowered the clipped mean and median on both training benches
        # but lost 2 chips under 1 px on the second (model card, "Tried after 0.9.0, later")
        self.rewarp = False
        self.r4 = 3
        self.r2 = 3
        self.r1 = 1
        self.aggd4 = 15
        self.aggd2 = 31
        self.aggd1 = 63
        self.smooth4 = 61
        self.smooth2 = 61
        self.smooth1 = 121
        self.shrink = 0.02
        # the dense consensus's support counts the part of a window beyond the image as zero weight,
        # like an invalid pixel inside it (:func:`norm_conv`), so that near the image border the
        # support, and with it the certainty, falls as it does along a coverage edge and the
        # global-local blend leans on the tile's affine (0.9.0; False is 0.7.0's network)
        self.edge_support = True
        # the dense stages at 1/2 and full resolution match and vote at every dense_stepN-th position
        self.dense_step2 = 1
        self.dense_step1 = 4
        self.border_margin = 8  # px, see run()
        self.head4 = DenseHead(6, 16)
        self.head2 = DenseHead(7, 16)
        self.head1 = DenseHead(7, 16)
        # certainty calibration: the final logit adds CERT_GAIN * (w0 s4 + w1 s2 + w2 s1) + w3, where
        # sN is the consensus support of the dense stage at 1/N (the confidence-weighted share of
        # agreeing peaks around a pixel, :meth:`dense_input`), upsampled to full resolution.  Zero
        # (the initialisation) leaves the heads' logit alone; ``soma train --only certainty`` fits it
        # to "within 1 px of the self-consistent flow".  The supports are detached: the certainty
        # reads the matching, it does not shape it.
        self.cert_w = nn.Parameter(torch.zeros(4))
        self.cert_gain = CERT_GAIN
        # GLAM's global-local blend (forward only): the output flow is ``c * flow + (1 - c) * A``, with
        # ``c`` the certainty and ``A`` the certainty-weighted robust affine of the flow itself (fit
        # on every blend_step-th pixel, Cauchy scale blend_k px): where the local match is unsure,
        # the tile's affine takes over.  It needs a calibrated certainty (cert_w); with the untrained
        # certainty of 0.5 it would halve every local deviation from the affine, so it is off until
        # the calibration is trained (see :meth:`blend_active`).
        self.blend = True  # False: return the unblended flow (benchmarks/blend_study.py --no-blend)
        self.blend_step = 8
        self.blend_k = 1.0
        self.blend_iters = 6
        self.blend_similarity = False  # the blend's prior A is a similarity instead of a full affine
        # the blend's prior adds the certainty-weighted local mean of the flow's residual from A
        # (two box passes of blend_local px, damped by blend_tau where the window holds little
        # certainty), so that a smooth local field seen on textured ground carries over the
        # untextured parts nearby instead of falling back to the tile's affine; 0: off, as every
        # window tried lost chips on both training benches (model card, "Tried after 0.9.0, later")
        self.blend_local = 0
        self.blend_tau = 0.05

    # -- stages ---------------------------------------------------------------------------------

    def n_rotations(self) -> int:
        return int(round(2.0 * self.max_rotation / self.rotation_step)) + 1

    def rotation_affines(self, b: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(b * K, 2, 3)`` level-pixel affines ``p = R(t) (q - c) + c`` of the K rotation hypotheses
        (hypothesis fastest), ``c`` the level centre."""
        k = self.n_rotations()
        t = (torch.arange(k, device=device, dtype=dtype) * self.rotation_step - self.max_rotation) * (math.pi / 180.0)
        cos = torch.cos(t)
        sin = torch.sin(t)
        cx = (w - 1) / 2.0
        cy = (h - 1) / 2.0
        tx = cx - (cos * cx - sin * cy)
        ty = cy - (sin * cx + cos * cy)
        a = torch.stack([torch.stack([cos, -sin, tx], -1), torch.stack([sin, cos, ty], -1)], 1)
        return a.unsqueeze(0).expand(b, k, 2, 3).reshape(b * k, 2, 3)

    def global_radius(self, h: int, w: int) -> int:
        """Translation search radius (cells) of the global stage on an ``h x w``-cell level (stride 8):
        :attr:`r_global` for tiles of 512 px (64 cells) and more, and in proportion to the shorter side
        below, at least 2 cells (256 px: 5 cells, +-40 px).  On a small tile the full search mostly adds
        false peaks at small overlaps: on 256 px chips of the training tile it cost 4-7 of 148 samples
        under 1 px and 10-12 under 3 px (model card, "What changed in 0.10.0")."""
        return min(self.r_global, max(2, (self.r_global * min(h, w)) // 64))

    def global_affine(self, mo: torch.Tensor, ms: torch.Tensor, vo: torch.Tensor,
                      vs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rotation hypotheses x all translations at stride 8 -> (affine in level pixels, scores
        ``(B, K, 2R+1, 2R+1)`` as logits).  The best translations of the :attr:`n_candidates`
        best rotations (local maxima over the rotation axis) are candidates; :meth:`verify` keeps
        the one with the most window support."""
        b, c, h, w = mo.shape
        k = self.n_rotations()
        r = self.global_radius(h, w)
        rot = self.rotation_affines(b, h, w, mo.device, mo.dtype)
        fl = geometry.affine_to_flow(rot, h, w)
        msr = geometry.warp(ms.repeat_interleave(k, 0), fl)
        vsr = (geometry.warp(vs.repeat_interleave(k, 0), fl) > 0.99).to(mo.dtype)
        mor = (mo * vo).repeat_interleave(k, 0)
        vor = vo.repeat_interleave(k, 0)
        num = xcorr_shifts(mor, msr * vsr, r)
        den = xcorr_shifts(vor, vsr, r)
        score = num / den.clamp(min=self.min_overlap * float(h * w))  # mean cosine over the overlap
        n = 2 * r + 1
        logits = score.view(b, k, n, n) * self.log_scale[0].exp()
        per_rot = logits.flatten(2).amax(2)  # (B, K)
        low = torch.full_like(per_rot[:, :1], -1e9)
        left = torch.cat([low, per_rot[:, :-1]], 1)
        right = torch.cat([per_rot[:, 1:], low], 1)
        peaks = torch.where((per_rot >= left) & (per_rot >= right), per_rot, per_rot - 1e6)
        nc = min(self.n_candidates, k)
        kb = peaks.topk(nc, 1).indices  # (B, C), best first
        sel = torch.gather(logits.flatten(2), 1, kb.unsqueeze(-1).expand(b, nc, n * n))
        d = peak_subpixel(sel.reshape(b * nc, n * n, 1, 1), r, self.cone_fit)[0].view(b * nc, 2)
        rsel = torch.gather(rot.view(b, k, 6), 1, kb.unsqueeze(-1).expand(b, nc, 6)).view(b * nc, 2, 3)
        eye = torch.eye(2, device=mo.device, dtype=mo.dtype).unsqueeze(0).expand(b * nc, 2, 2)
        cands = geometry.compose_affine(rsel, torch.cat([eye, d.unsqueeze(-1)], -1))
        if nc == 1:
            return cands, logits
        return self.verify(mo, ms, vo, vs, cands.view(b, nc, 2, 3)), logits

    def verify(self, mo: torch.Tensor, ms: torch.Tensor, vo: torch.Tensor, vs: torch.Tensor,
               cands: torch.Tensor) -> torch.Tensor:
        """Pick, per sample, the candidate affine ``(B, C, 2, 3)`` (level pixels) whose warped SAR
        descriptors have the most window support: window correlation peaks (as in the affine
        refinement), one robust affine fit, and the confidence-weighted share of positions within 1
        cell of it."""
        b, nc = cands.shape[0], cands.shape[1]
        h = mo.shape[-2]
        w = mo.shape[-1]
        a = cands.reshape(b * nc, 2, 3)
        fl = geometry.affine_to_flow(a, h, w)
        vsw = (geometry.warp(vs.repeat_interleave(nc, 0), fl) > 0.99).to(mo.dtype)
        mor = mo.repeat_interleave(nc, 0)
        _, disp, conf, inside = self.match_local(mor, ms.repeat_interleave(nc, 0), fl, self.r_aff8, self.agg8, 1, self.cone_fit)
        wt = conf * vo.repeat_interleave(nc, 0) * vsw * inside
        pts = grid_points(b * nc, h, w, mo.device, mo.dtype)
        tgt = pts + disp.flatten(2).transpose(1, 2)
        upd = irls_affine(pts, tgt, wt.flatten(1), self.aff_k, 3, self.aff_similarity)
        near = (((geometry.affine_points(upd, pts) - tgt) ** 2).sum(-1) < 1.0).to(mo.dtype)
        support = (wt.flatten(1) * near).sum(1).view(b, nc)
        best = support.argmax(1)
        return cands[torch.arange(b, device=mo.device), best]

    def match_local(self, mo: torch.Tensor, ms: torch.Tensor, flow: torch.Tensor, r: int, agg: int,
                    temp: int, cone: bool, step: int = 1) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Warp ``ms`` by ``flow`` (level pixels), aggregated local correlation with ``mo``;
        returns (aggregated correlation, sub-pixel displacement, peak confidence, warped SAR validity),
        at every ``step``-th position (:func:`geometry.subsample`)."""
        fsw = geometry.warp(ms, flow)
        corr = window_zncc(mo, fsw, r, agg, step)
        disp, interior = peak_subpixel(corr, r, cone)
        conf = torch.softmax(corr * self.log_scale[temp].exp(), 1).amax(1, keepdim=True) * interior
        return corr, disp, conf, geometry.subsample(geometry.inside_mask(flow, mo.shape[-2], mo.shape[-1]), step)

    def refine_affine(self, mo: torch.Tensor, ms: torch.Tensor, vo: torch.Tensor, a_full: torch.Tensor,
                      stride: int, agg: int, temp: int, r: int, step: int = 1) -> torch.Tensor:
        """One affine refinement at ``stride`` with search radius ``r`` (cells), from the windows
        centred on every ``step``-th level position; returns the updated full-resolution affine."""
        b, c, h, w = mo.shape
        a_lvl = geometry.scale_affine(a_full, float(stride))
        fl = geometry.affine_to_flow(a_lvl, h, w).detach()
        _, disp, conf, inside = self.match_local(mo, ms, fl, r, agg, temp, self.cone_fit, step)
        pts = grid_points(b, h, w, mo.device, mo.dtype, step)
        tgt = pts + disp.flatten(2).transpose(1, 2)
        upd = irls_affine(pts, tgt, (conf * geometry.subsample(vo, step) * inside).flatten(1), self.aff_k, 3,
                          self.aff_similarity and stride == 8)
        return geometry.scale_affine(geometry.compose_affine(a_lvl, upd), 1.0 / float(stride))

    def dense_input(self, mo: torch.Tensor, ms: torch.Tensor, vo: torch.Tensor, flow: torch.Tensor,
                    r: int, agg: int, smooth: int, temp: int,
                    prev_logit: Optional[torch.Tensor], cone: bool, step: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dense refinement of a level flow: aggregated correlation peaks, then a robust consensus
        (confidence-weighted window means with Cauchy re-weighting, shrunk towards no update where
        the support is weak); returns (head input, refined base flow).  With ``step`` > 1 the peaks
        and the consensus are computed at every ``step``-th position (:func:`geometry.subsample`,
        consensus window ``smooth / step`` samples) and interpolated back (:func:`geometry.densify`):
        the consensus is a mean over ``smooth`` pixels, so it is as smooth as the samples allow."""
        flow = flow.detach()
        h = mo.shape[-2]
        w = mo.shape[-1]
        corr, disp, conf, inside = self.match_local(mo, ms, flow, r, agg, temp, cone, step)
        wt = conf * geometry.subsample(vo, step) * inside
        k = (smooth // step) | 1
        disp_s, sup = norm_conv(disp, wt, k, self.edge_support)
        for _ in range(2):
            res2 = ((disp - disp_s) ** 2).sum(1, keepdim=True)
            disp_s, sup = norm_conv(disp, wt / (1.0 + res2), k, self.edge_support)
        disp_s = disp_s * (sup / (sup + self.shrink))
        x = geometry.densify(torch.cat([disp, disp_s, conf, sup], 1), step, h, w)
        if prev_logit is not None:
            x = torch.cat([x, prev_logit], 1)
        return x, flow + x[:, 2:4]  # channels 2:4 of x: the consensus, at every position

    def dense_output(self, out: torch.Tensor, base: torch.Tensor,
                     prev_logit: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Head output -> (flow = base + correction, certainty logit accumulated over levels)."""
        logit = out[:, 2:3]
        if prev_logit is not None:
            logit = logit + prev_logit
        return base + out[:, 0:2], logit

    def reencode_sar(self, sar: torch.Tensor, vs: torch.Tensor, vo: torch.Tensor,
                     a: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The SAR resampled by the affine ``a`` (bicubic, full-resolution pixels) and encoded again,
        so that its oriented channels and learnt features are in the optical frame: its normalised
        descriptors at strides 1, 2, 4, 8, and the matching weights at those strides (both images
        valid and :attr:`border_margin` px away from their borders, where zero padding and the
        coverage edge of the resampled SAR make gradients that the other image lacks)."""
        fl = geometry.affine_to_flow(a, sar.shape[-2], sar.shape[-1]).detach()
        vsw = (geometry.warp(vs, fl) > 0.99).to(vs.dtype)
        msw = [l2n(f) for f in self.enc_sar(geometry.warp(sar * vs, fl, "bicubic") * vsw)]
        m = self.border_margin
        bad = 1.0 - vo * vsw
        vb = 1.0 - F.max_pool2d(F.max_pool2d(bad, [1, 2 * m + 1], 1, [0, m]), [2 * m + 1, 1], 1, [m, 0])
        vl = [vb, (F.avg_pool2d(vb, 2) > 0.99).to(vo.dtype), (F.avg_pool2d(vb, 4) > 0.99).to(vo.dtype),
              (F.avg_pool2d(vb, 8) > 0.99).to(vo.dtype)]
        return msw, vl

    def run(self, opt: torch.Tensor, sar: torch.Tensor, opt_valid: Optional[torch.Tensor] = None,
            sar_valid: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Full pass returning intermediates: affines (full-resolution pixels), global scores,
        per-level flows (level pixels, composed with the global affine), the final flow and
        certainty logit, and (in training mode only) the first-pass (unresampled) descriptors at
        1/4 and 1/2 for the training losses."""
        if opt_valid is None:
            vo = torch.ones_like(opt)
        else:
            vo = opt_valid.to(opt.dtype)
        if sar_valid is None:
            vs = torch.ones_like(sar)
        else:
            vs = sar_valid.to(sar.dtype)
        fo = self.enc_opt(opt * vo)
        mo = [l2n(f) for f in fo]
        # first SAR pass, in the SAR frame: only the global stage (1/8) and, in training, the losses'
        # descriptors (1/4, 1/2) use it; the later stages match the re-encoded SAR below
        fs = self.enc_sar(sar * vs, self.training)
        ms8 = l2n(fs[-1])
        vo8 = (F.avg_pool2d(vo, 8) > 0.99).to(vo.dtype)
        vs8 = (F.avg_pool2d(vs, 8) > 0.99).to(vs.dtype)
        out: Dict[str, torch.Tensor] = {}
        if self.training:
            out["desc_opt4"] = mo[2]
            out["desc_sar4"] = l2n(fs[2])
            out["desc_opt2"] = mo[1]
            out["desc_sar2"] = l2n(fs[1])

        # (1) global affine at stride 8
        a8, scores = self.global_affine(mo[3], ms8, vo8, vs8)
        a_g = geometry.scale_affine(a8, 1.0 / 8.0)
        out["global_scores"] = scores
        out["affine_global"] = a_g
        # re-encode the SAR resampled by the global affine; the later stages estimate what remains
        # (a_rel, then a relative flow) and their outputs are composed with the global affine
        msw, vl = self.reencode_sar(sar, vs, vo, a_g)
        # (2) affine refinement at stride 8, 4 and 2 (the 1/2 stage shares the 1/4 temperature)
        a_rel = geometry.identity_affine(opt.shape[0], opt.device, opt.dtype)
        for _ in range(self.n_aff8):
            a_rel = self.refine_affine(mo[3], msw[3], vl[3], a_rel, 8, self.agg8, 1, self.r_aff8)
        out["affine8"] = geometry.compose_affine(a_g, a_rel)
        for _ in range(self.n_aff4):
            a_rel = self.refine_affine(mo[2], msw[2], vl[2], a_rel, 4, self.agg4, 2, self.r_aff)
        out["affine4"] = geometry.compose_affine(a_g, a_rel)
        for _ in range(self.n_aff2):
            a_rel = self.refine_affine(mo[1], msw[1], vl[1], a_rel, 2, self.agg2, 2, self.r_aff, self.aff_step2)
        out["affine2"] = geometry.compose_affine(a_g, a_rel)
        if self.rewarp:
            a_g = out["affine2"]
            a_rel = geometry.identity_affine(opt.shape[0], opt.device, opt.dtype)
            msw, vl = self.reencode_sar(sar, vs, vo, a_g)
        # (3) dense flow at stride 4, 2, then full resolution
        h4 = mo[2].shape[-2]
        w4 = mo[2].shape[-1]
        fl4 = geometry.affine_to_flow(geometry.scale_affine(a_rel, 4.0), h4, w4)
        x, base = self.dense_input(mo[2], msw[2], vl[2], fl4, self.r4, self.aggd4, self.smooth4, 3, None, self.cone_fit)
        sup4 = F.interpolate(x[:, 5:6].detach(), scale_factor=4.0, mode="bilinear", align_corners=False)
        fl4, lg4 = self.dense_output(self.head4(x), base, None)
        out["flow4"] = geometry.affine_after_flow(geometry.scale_affine(a_g, 4.0), fl4)
        out["logit4"] = lg4
        lg2 = F.interpolate(lg4, scale_factor=2.0, mode="bilinear", align_corners=False)
        x, base = self.dense_input(mo[1], msw[1], vl[1], geometry.upsample_flow(fl4, 2), self.r2, self.aggd2, self.smooth2, 4, lg2, self.cone_fit, self.dense_step2)
        sup2 = F.interpolate(x[:, 5:6].detach(), scale_factor=2.0, mode="bilinear", align_corners=False)
        fl2, lg2 = self.dense_output(self.head2(x), base, lg2)
        out["flow2"] = geometry.affine_after_flow(geometry.scale_affine(a_g, 2.0), fl2)
        out["logit2"] = lg2
        lg1 = F.interpolate(lg2, scale_factor=2.0, mode="bilinear", align_corners=False)
        x, base = self.dense_input(mo[0], msw[0], vl[0], geometry.upsample_flow(fl2, 2), self.r1, self.aggd1, self.smooth1, 5, lg1, False, self.dense_step1)
        sup1 = x[:, 5:6].detach()
        fl1, lg1 = self.dense_output(self.head1(x), base, lg1)
        out["flow"] = geometry.affine_after_flow(a_g, fl1)
        out["logit"] = lg1 + self.certainty_calibration(sup4, sup2, sup1)
        return out

    def certainty_calibration(self, sup4: torch.Tensor, sup2: torch.Tensor, sup1: torch.Tensor) -> torch.Tensor:
        """The calibration term of the final certainty logit (see :attr:`cert_w`), ``(B, 1, H, W)``."""
        w = self.cert_w
        return self.cert_gain * (w[0] * sup4 + w[1] * sup2 + w[2] * sup1) + w[3]

    def forward(self, opt: torch.Tensor, sar: torch.Tensor, opt_valid: Optional[torch.Tensor] = None,
                sar_valid: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.run(opt, sar, opt_valid, sar_valid)
        flow = out["flow"]
        cert = torch.sigmoid(out["logit"])
        h = opt.shape[-2]
        w = opt.shape[-1]
        cert = cert * geometry.inside_mask(flow, h, w)
        if opt_valid is not None:
            cert = cert * opt_valid.to(cert.dtype)
        if sar_valid is not None:
            sv = geometry.warp(sar_valid.to(cert.dtype), flow)
            cert = cert * (sv > 0.99).to(cert.dtype)
        if self.blend_active():
            flow = self.affine_blend(flow, cert)
        return flow, cert

    def blend_active(self) -> bool:
        """The global-local blend is on (:attr:`blend`) once the certainty calibration is trained."""
        return self.blend and bool((self.cert_w != 0.0).any())

    def affine_blend(self, flow: torch.Tensor, cert: torch.Tensor) -> torch.Tensor:
        """``cert * flow + (1 - cert) * A`` where ``A`` is the flow of the certainty-weighted robust
        (Cauchy IRLS) affine fit of ``flow`` on every :attr:`blend_step`-th pixel; ``flow``
        ``(B, 2, H, W)`` pixels, ``cert`` ``(B, 1, H, W)`` in [0, 1]."""
        b = flow.shape[0]
        h = flow.shape[-2]
        w = flow.shape[-1]
        s = self.blend_step
        pts = grid_points(b, h, w, flow.device, flow.dtype, s)
        tgt = pts + geometry.subsample(flow, s).flatten(2).transpose(1, 2)
        a = irls_affine(pts, tgt, geometry.subsample(cert, s).flatten(1), self.blend_k, self.blend_iters,
                        self.blend_similarity)
        prior = geometry.affine_to_flow(a, h, w)
        if self.blend_local > 0:
            k = self.blend_local
            num = box(box(cert * (flow - prior), k), k)
            den = box(box(cert, k), k)
            prior = prior + num / (den + self.blend_tau)
        return cert * flow + (1.0 - cert) * prior


def build(config: Optional[Dict[str, int]] = None) -> SomaNet:
    """The default architecture (``config`` is reserved for recorded hyper-parameters)."""
    return SomaNet()


def load_state(model: SomaNet, state: Dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)``, strict, except that a state without :attr:`SomaNet.cert_w`
    (written before 0.7.0) gets the zero calibration, which leaves its certainty as it was."""
    state = dict(state)
    if "cert_w" not in state:
        state["cert_w"] = torch.zeros_like(model.cert_w)
    model.load_state_dict(state)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
