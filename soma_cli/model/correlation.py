"""Correlation and voting operators of SOMA's matching stages (TorchScript-compatible).

Window means by cumulative sums (:func:`box`), local correlation over a search window
(:func:`local_corr`), its zero-normalised window version (:func:`window_zncc`, with the window
statistics of :func:`window_stats`), sub-pixel peaks (:func:`peak_subpixel`), correlation over all
translations by FFT (:func:`xcorr_shifts`) and the weighted window mean of the dense consensus
(:func:`norm_conv`).  Correlation channels are ordered
``(dy, dx)`` with ``dy`` outer, both in ``[-r, r]``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from . import geometry


def window_counts(n: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n,)``: how many of the ``k`` positions (odd ``k``) of the window centred on each of ``n``
    positions lie inside the axis."""
    r = k // 2
    i = torch.arange(n, device=device, dtype=dtype)
    return torch.clamp(i + r, max=n - 1) - torch.clamp(i - r, min=0) + 1


def sum_1d(x: torch.Tensor, k: int, dim: int, step: int = 1) -> torch.Tensor:
    """Sum over ``k`` consecutive values (odd ``k``, centred) along ``dim`` (2 = rows, 3 = columns)
    of a ``(B, C, H, W)`` tensor, of what lies inside, from a cumulative sum (cost independent of
    ``k``; exact for integer values, which the cumulative sums hold exactly).  With ``step`` > 1,
    only at every ``step``-th position along ``dim`` (those of :func:`geometry.subsample`)."""
    r = k // 2
    n = x.shape[dim]
    o = step // 2
    if r >= n:  # the window covers everything: the sum of the whole axis
        s = x.sum(dim, keepdim=True).expand_as(x)
        return _every(s, dim, o, (n - o + step - 1) // step, step).contiguous()
    c = cumsum_rows(x) if dim == 2 else torch.cumsum(x, dim)
    m = (n - o + step - 1) // step  # output positions i = o + j step, j < m
    # window sum at i: c[min(i + r, n - 1)] - c[i - r - 1] (nothing to subtract for i <= r), written
    # by ranges of i straight into the output
    shape = list(c.shape)
    shape[dim] = m
    s = torch.empty(shape, dtype=c.dtype, device=c.device)
    track = x.requires_grad  # autograd cannot write into s by out=: copy the differences instead
    ja = _count(min(r, n - 1 - r), o, step, m)  # i <= r, i + r inside: c[i + r]
    if ja > 0:
        s.narrow(dim, 0, ja).copy_(_every(c, dim, o + r, ja, step))
    if r <= n - 1 - r:
        jb = _count(n - 1 - r, o, step, m)  # r < i, i + r inside: c[i + r] - c[i - r - 1]
        if jb > ja:
            i = o + ja * step
            _difference(_every(c, dim, i + r, jb - ja, step), _every(c, dim, i - r - 1, jb - ja, step),
                        s.narrow(dim, ja, jb - ja), track)
    else:
        jb = _count(r, o, step, m)  # i <= r, i + r beyond the end (a window wider than half the axis): c[n - 1]
        if jb > ja:
            s.narrow(dim, ja, jb - ja).copy_(c.narrow(dim, n - 1, 1).expand_as(s.narrow(dim, ja, jb - ja)))
    if m > jb:  # r < i, i + r beyond the end: c[n - 1] - c[i - r - 1]
        i = o + jb * step
        _difference(c.narrow(dim, n - 1, 1).expand_as(s.narrow(dim, jb, m - jb)),
                    _every(c, dim, i - r - 1, m - jb, step), s.narrow(dim, jb, m - jb), track)
    return s


def _count(last: int, o: int, step: int, m: int) -> int:
    """How many of the ``m`` positions ``o, o + step, ...`` lie at or before ``last``."""
    return 0 if last < o else min(m, (last - o) // step + 1)


def _every(x: torch.Tensor, dim: int, start: int, count: int, step: int) -> torch.Tensor:
    """``count`` positions ``start, start + step, ...`` of ``x`` along ``dim`` (2 or 3), a view."""
    if count <= 0:
        return x.narrow(dim, 0, 0)
    v = x.narrow(dim, start, (count - 1) * step + 1)
    if step == 1:
        return v
    return v[:, :, ::step] if dim == 2 else v[:, :, :, ::step]


def cumsum_rows(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``torch.cumsum(x, 2)`` of a ``(B, C, H, W)`` tensor.  On the CPU without autograd, for a
    tensor of at least 2^19 values whose ``H`` is a multiple of ``block``: each block of rows is
    summed row by row, all blocks at once (each operation adds whole rows, contiguous in memory),
    then the blocks' totals are carried over; up to three times faster than the per-column scan
    of ``torch.cumsum`` along rows (smaller tensors are faster by that scan), equal to float
    rounding."""
    b = x.shape[0]
    c = x.shape[1]
    h = x.shape[2]
    w = x.shape[3]
    if x.requires_grad or x.is_cuda or h % block != 0 or h < 2 * block or x.numel() < (1 << 19):
        return torch.cumsum(x, 2)
    nb = h // block
    xv = x.contiguous().view(b, c, nb, block, w)
    out = torch.empty_like(xv)
    out[:, :, :, 0] = xv[:, :, :, 0]
    for i in range(1, block):
        torch.add(out[:, :, :, i - 1], xv[:, :, :, i], out=out[:, :, :, i])
    carry = out[:, :, :-1, block - 1].cumsum(2)  # the total of every block before the next one
    out[:, :, 1:] += carry.unsqueeze(3)
    return out.view(b, c, h, w)


def _difference(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, track: bool) -> None:
    """``out[...] = a - b``, without a temporary unless autograd ``track`` s it."""
    if track:
        out.copy_(a - b)
    else:
        torch.sub(a, b, out=out)


def box(x: torch.Tensor, k: int, step: int = 1) -> torch.Tensor:
    """Mean over a ``k x k`` window (odd ``k``; stride 1, same size; borders average what is inside),
    as two separable passes of cumulative sums, along each row and then along each column, divided
    once by the window's count (4-5 times faster than average pooling on a CPU, even for 5 px
    windows; they agree to 1e-5; a window of zeros has mean 0 exactly, as the sums of a 0/1 map
    are exact).  With ``step`` > 1, only at the positions of :func:`geometry.subsample` (the same
    values: each pass sums at those positions only, the second pass on those columns only)."""
    o = step // 2
    h = x.shape[-2]
    w = x.shape[-1]
    y = sum_1d(sum_1d(x, k, 3, step), k, 2, step)
    ny = window_counts(h, k, x.device, x.dtype)[o::step]
    nx = window_counts(w, k, x.device, x.dtype)[o::step]
    return y.div_(ny.view(1, 1, -1, 1) * nx.view(1, 1, 1, -1))


def local_corr(f1: torch.Tensor, f2: torch.Tensor, r: int, step: int = 1, block_bytes: int = 1 << 21,
               sampled: bool = False) -> torch.Tensor:
    """``(B, (2r+1)^2, H', W')``: ``<f1(q), f2(q + (dx, dy))>`` for ``dy, dx`` in ``[-r, r]`` (dy outer),
    at the positions ``q`` of :func:`geometry.subsample` (all of them when ``step`` is 1); with
    ``sampled``, ``f1`` holds only those positions already (``f2`` always the whole level).

    Computed a block of output rows at a time, so that what a block touches stays in a core's
    cache (a whole level does not, and its products are memory-bound).  On the CPU without
    autograd, each block of about ``block_bytes`` of output accumulates ``f1`` times all shifts of
    ``f2`` at once, one channel at a time (:func:`_banded_corr`); otherwise (autograd, or a GPU,
    where small operations each cost a kernel launch) the products of about ``block_bytes`` per
    shift are summed over channels.  Each element is computed as over the whole level."""
    w = f2.shape[-1]
    track = f1.requires_grad or f2.requires_grad
    o = step // 2  # geometry.subsample's first position
    a = f1 if sampled else geometry.subsample(f1, step)
    if not track and not f1.is_cuda:
        return _banded_corr(a, f2, r, step, block_bytes)
    # channels last: the per-shift channel sums run over contiguous memory (twice as fast on a CPU)
    a = a.permute(0, 2, 3, 1).contiguous()
    f2p = F.pad(f2, [r, r, r, r]).permute(0, 2, 3, 1).contiguous()
    n = 2 * r + 1
    hs = a.shape[1]
    ws = a.shape[2]
    rows = max(1, block_bytes // max(1, a.shape[0] * ws * a.shape[3] * a.element_size()))
    # without autograd the products and sums go into preallocated blocks (the same values)
    out = torch.empty([a.shape[0], n * n, hs, ws] if not track else [0], dtype=a.dtype, device=a.device)
    blocks: List[torch.Tensor] = []
    for i0 in range(0, hs, rows):
        i1 = min(hs, i0 + rows)
        ab = a[:, i0:i1]
        y0 = o + i0 * step  # full-level row of output row i0
        y1 = o + (i1 - 1) * step + 1
        prod = torch.empty_like(ab)
        sums: List[torch.Tensor] = []
        for dy in range(n):
            for dx in range(n):
                win = f2p[:, y0 + dy:y1 + dy:step, o + dx:o + dx + w:step, :][:, :, :ws]
                if track:
                    sums.append((ab * win).sum(-1))
                else:
                    torch.mul(ab, win, out=prod)
                    torch.sum(prod, [-1], out=out[:, dy * n + dx, i0:i1])
        if track:
            blocks.append(torch.stack(sums, 1))
    return torch.cat(blocks, 2) if track else out


def _banded_corr(a: torch.Tensor, f2: torch.Tensor, r: int, step: int, block_bytes: int) -> torch.Tensor:
    """:func:`local_corr` without autograd, from ``a`` = ``f1`` at the scored positions: for each
    band of output rows (about ``block_bytes``) and each channel, one fused multiply-add of the
    channel's band (broadcast over shifts) with a strided view of the padded ``f2`` that reads all
    ``(2r+1)^2`` shifts, i.e. element ``(dy, dx, i, j)`` at level position ``(o + i step + dy - r,
    o + j step + dx - r)``.  The channels are summed in order, one plane per operation."""
    b, c, hs, ws = a.shape
    n = 2 * r + 1
    o = step // 2
    f2p = F.pad(f2, [r, r, r, r]).contiguous()
    wp = f2p.shape[-1]
    sb = f2p.stride(0)
    sc = f2p.stride(1)
    base = f2p.storage_offset()
    out = torch.empty([b, n * n, hs, ws], dtype=a.dtype, device=a.device)
    rows = max(1, block_bytes // max(1, b * n * n * ws * a.element_size()))
    for y0 in range(0, hs, rows):
        hh = min(hs, y0 + rows) - y0
        band = out.narrow(2, y0, hh).view(b, n, n, hh, ws)
        for ch in range(c):
            x = a[:, ch, y0:y0 + hh].unsqueeze(1).unsqueeze(1)
            v = f2p.as_strided([b, n, n, hh, ws], [sb, wp, 1, wp * step, step],
                               base + ch * sc + (o + y0 * step) * wp + o)
            if ch == 0:
                torch.mul(x, v, out=band)
            else:
                band.addcmul_(x, v)
    return out


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


def window_stats(f: torch.Tensor, k: int, step: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """The mean descriptor ``(B, C, H', W')`` and the variance (summed over channels,
    ``(B, 1, H', W')``) of the ``k x k`` windows of ``f`` centred on the positions of
    :func:`geometry.subsample`: what :func:`window_zncc` needs of its first input."""
    m = box(f, k, step)
    v = (box((f * f).sum(1, keepdim=True), k, step) - (m * m).sum(1, keepdim=True)).clamp(min=0.0)
    return m, v


def window_zncc(f1: torch.Tensor, f2: torch.Tensor, r: int, k: int, step: int = 1,
                stats1: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """``(B, (2r+1)^2, H', W')`` zero-normalised cross-correlation of ``k x k`` windows of ``f1``
    (centred on ``q``) and ``f2`` (centred on ``q + (dx, dy)``), ``dy, dx`` in ``[-r, r]`` (dy outer,
    as :func:`local_corr`); each window's mean descriptor is removed before the correlation, as in
    the window ZNCC of CFOG-like matchers, so a texture common to the whole window (speckle, a
    dominant orientation) does not lift every shift alike.  Values are in ``[-1, 1]``; a window
    without variance scores 0, a shift whose window centre ``q + d`` lies outside the image -1.
    With ``step`` > 1 only the window centres ``q`` of :func:`geometry.subsample` are scored (the
    same values, for less work where wide windows overlap).  ``stats1``: ``window_stats(f1, k,
    step)``, for a caller that correlates the same ``f1`` again.

    Computed from box filters: ``sum(f1 f2) - <mean f1, mean f2>`` over the window, divided by the
    square root of both windows' variances (shifted to ``q + d`` for ``f2``)."""
    # the window statistics of f1 are only needed where windows are scored, those of f2 around them
    m1, v1 = window_stats(f1, k, step) if stats1 is None else stats1
    m2, v2 = window_stats(f2, k)
    prod = box(local_corr(f1, f2, r), k, step)
    num = prod - local_corr(m1, m2, r, step, sampled=True)
    # a window without variance has no correlation: it scores 0 (num / eps would be huge along the
    # borders, where shifted() reads zero variance); a shift whose window centre lies outside the
    # image is no candidate: -1; rounding in the box sums can push |z| past 1: clamped
    inside = shifted(torch.ones_like(v2), r, step) > 0.5
    if not torch.is_grad_enabled():  # the same values in place: fewer full-size temporaries
        vv = shifted(v2, r, step).mul_(v1)
        ok = vv > 1e-6
        z = num.div_(vv.clamp_(min=1e-6).sqrt_()).masked_fill_(~ok, 0.0).clamp_(-1.0, 1.0)
        return z.masked_fill_(~inside, -1.0)
    vv = v1 * shifted(v2, r, step)
    ok = vv > 1e-6
    z = num / torch.sqrt(torch.where(ok, vv, torch.ones_like(vv)))
    z = torch.where(ok, z, torch.zeros_like(z)).clamp(-1.0, 1.0)
    return torch.where(inside, z, -torch.ones_like(z))


def l2n(x: torch.Tensor) -> torch.Tensor:
    """Centre each channel over the tile (removes the response common to every position, which
    otherwise makes all cosine similarities alike), then L2-normalise per position.  Without
    autograd ``x`` itself is centred and normalised (the encoders' outputs, which nothing else
    reads), with one full-size temporary fewer."""
    grad = torch.is_grad_enabled()
    x = x - x.mean((2, 3), keepdim=True) if grad else x.sub_(x.mean((2, 3), keepdim=True))
    # as F.normalize(x, dim=1, eps=1e-6), whose strided channel norm is 3x slower on the CPU
    norm = (x * x).sum(1, keepdim=True).sqrt().clamp(min=1e-6)
    return x / norm if grad else x.div_(norm)


def peak_subpixel(corr: torch.Tensor, r: int, cone: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Displacement ``(B, 2, H, W)`` of the best :func:`local_corr` channel, refined per axis from the
    peak and its two neighbours (a parabola, or with ``cone`` the :func:`equiangular` V fit), and
    ``(B, 1, H, W)`` = 1 where the peak is inside the search window (a peak on its border is no
    peak: the true one may lie beyond)."""
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


def norm_conv(x: torch.Tensor, w: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted ``k x k`` window mean of ``x`` (weights ``w``) over the part of the window inside the
    grid, and the support: the window sum of ``w`` over the full window area, so that the part
    beyond the border counts as zero weight, as an invalid pixel inside does (the support falls
    towards the border as it does along a coverage edge; :func:`window_fraction`)."""
    ws = box(w, k)
    mean = box(x * w, k) / ws.clamp(min=1e-4)
    return mean, ws * window_fraction(w.shape[-2], w.shape[-1], k, w.device, w.dtype)
