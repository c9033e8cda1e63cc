"""Torch twins of :mod:`soma_cli.coords` (same conventions; TorchScript-compatible, compiled into the
exported network). See :mod:`soma_cli.coords` for the pixel, normalised, pyramid-level, flow and affine
conventions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def base_grid(b: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(b, 2, h, w)`` pixel-centre coordinates, channel 0 = x (column), 1 = y (row)."""
    ys = torch.arange(h, device=device, dtype=dtype).view(1, h, 1).expand(1, h, w)
    xs = torch.arange(w, device=device, dtype=dtype).view(1, 1, w).expand(1, h, w)
    return torch.cat([xs, ys], 0).unsqueeze(0).expand(b, 2, h, w)


def flow_to_grid(flow: torch.Tensor, src_h: int, src_w: int) -> torch.Tensor:
    """Flow ``(B, 2, H, W)`` -> ``grid_sample`` grid ``(B, H, W, 2)`` into a ``src_h x src_w`` image.

    The flow lives on an ``H x W`` grid whose pixels coincide with the source's (same stride).
    """
    b, _, h, w = flow.shape
    pos = base_grid(b, h, w, flow.device, flow.dtype) + flow
    gx = (2.0 * pos[:, 0] + 1.0) / src_w - 1.0
    gy = (2.0 * pos[:, 1] + 1.0) / src_h - 1.0
    return torch.stack([gx, gy], dim=-1)


def warp(image: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``out(q) = image(q + flow(q))`` with zeros outside; image ``(B, C, Hs, Ws)``, flow ``(B, 2, H, W)``."""
    grid = flow_to_grid(flow, image.shape[-2], image.shape[-1])
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


def compose_flow(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Torch twin of :func:`compose_flow_np`: ``total(q) = second(q) + first(q + second(q))``, with
    ``first`` sampled bilinearly (nearest edge value beyond the field)."""
    grid = flow_to_grid(second, first.shape[-2], first.shape[-1])
    return second + F.grid_sample(first, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inside_mask(flow: torch.Tensor, src_h: int, src_w: int) -> torch.Tensor:
    """``(B, 1, H, W)`` float mask: 1 where ``q + flow(q)`` falls inside the source (pixel centres)."""
    b, _, h, w = flow.shape
    pos = base_grid(b, h, w, flow.device, flow.dtype) + flow
    ok = (pos[:, 0] >= 0) & (pos[:, 0] <= src_w - 1) & (pos[:, 1] >= 0) & (pos[:, 1] <= src_h - 1)
    return ok.unsqueeze(1).to(flow.dtype)


def subsample(x: torch.Tensor, step: int) -> torch.Tensor:
    """Every ``step``-th pixel of ``(B, C, H, W)`` in both directions, starting at ``step // 2``:
    sample ``(i, j)`` is pixel ``(c, r) = (step*j + step//2, step*i + step//2)`` of the same grid
    (values are not rescaled: a flow sampled this way stays in pixels of the full grid)."""
    if step == 1:
        return x
    o = step // 2
    return x[:, :, o::step, o::step]


def densify(x: torch.Tensor, step: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`subsample`: the ``h x w`` grid, bilinear between the samples (pixel
    ``c`` lies at sample coordinate ``(c - step//2) / step``), the nearest edge sample beyond them."""
    if step == 1:
        return x
    b = x.shape[0]
    o = float(step // 2)
    ws = x.shape[-1]
    hs = x.shape[-2]
    xs = (torch.arange(w, device=x.device, dtype=x.dtype) - o) / float(step)
    ys = (torch.arange(h, device=x.device, dtype=x.dtype) - o) / float(step)
    gx = ((2.0 * xs + 1.0) / ws - 1.0).view(1, 1, w).expand(b, h, w)
    gy = ((2.0 * ys + 1.0) / hs - 1.0).view(1, h, 1).expand(b, h, w)
    grid = torch.stack([gx, gy], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def upsample_flow(flow: torch.Tensor, factor: int) -> torch.Tensor:
    """Level flow -> ``factor`` times finer level: bilinear (align_corners=False) and scaled."""
    up = F.interpolate(flow, scale_factor=float(factor), mode="bilinear", align_corners=False)
    return up * float(factor)


def downsample_flow(flow: torch.Tensor, factor: int) -> torch.Tensor:
    """Full flow -> stride-``factor`` level flow (block average, divided by ``factor``)."""
    return F.avg_pool2d(flow, factor) / float(factor)


def affine_to_flow(a: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Affines ``(B, 2, 3)`` in this grid's pixels -> flows ``(B, 2, h, w)``."""
    b = a.shape[0]
    g = base_grid(b, h, w, a.device, a.dtype)
    x = g[:, 0]
    y = g[:, 1]
    fx = a[:, 0, 0].view(b, 1, 1) * x + a[:, 0, 1].view(b, 1, 1) * y + a[:, 0, 2].view(b, 1, 1) - x
    fy = a[:, 1, 0].view(b, 1, 1) * x + a[:, 1, 1].view(b, 1, 1) * y + a[:, 1, 2].view(b, 1, 1) - y
    return torch.stack([fx, fy], 1)


def scale_affine(a: torch.Tensor, stride: float) -> torch.Tensor:
    """Affines ``(B, 2, 3)`` in full-resolution pixels -> the same in stride-``stride`` pixels.

    Pass ``1/stride`` to go the other way (level -> full resolution).
    """
    o = (stride - 1.0) / 2.0
    lin = a[:, :, :2]
    t = a[:, :, 2]
    # A_s(p) = (A(s p + o) - o) / s  =  lin p + (lin @ [o, o] + t - o) / s
    oo = torch.full_like(t, o)
    t_s = (torch.bmm(lin, oo.unsqueeze(-1)).squeeze(-1) + t - oo) / stride
    return torch.cat([lin, t_s.unsqueeze(-1)], -1)


def compose_affine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b`` first, then ``a``: ``(B, 2, 3)`` x ``(B, 2, 3)`` -> ``(B, 2, 3)``."""
    lin = torch.bmm(a[:, :, :2], b[:, :, :2])
    t = torch.bmm(a[:, :, :2], b[:, :, 2:]).squeeze(-1) + a[:, :, 2]
    return torch.cat([lin, t.unsqueeze(-1)], -1)


def affine_after_flow(a: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """``flow`` first, then the affine ``a`` (both in this grid's pixels): ``total(q) = a(q + flow(q)) - q``,
    exact (no resampling): the flow of a match found in an image already warped by ``a``."""
    h = flow.shape[-2]
    w = flow.shape[-1]
    return affine_to_flow(a, h, w) + torch.einsum("bij,bjhw->bihw", a[:, :, :2], flow)


def affine_points(a: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``(B, N, 2)`` pixel points ``(x, y)`` mapped by the ``(B, 2, 3)`` affines ``a``."""
    return torch.bmm(points, a[:, :, :2].transpose(1, 2)) + a[:, :, 2].unsqueeze(1)


def identity_affine(b: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(b, 2, 3)`` identity affines."""
    eye = torch.zeros(b, 2, 3, device=device, dtype=dtype)
    eye[:, 0, 0] = 1.0
    eye[:, 1, 1] = 1.0
    return eye


def fit_affine(points: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares affine from ``points (B, N, 2)`` to ``targets (B, N, 2)``.

    ``weights (B, N)`` >= 0.  Returns ``(B, 2, 3)``.  Points are centred for conditioning and a small
    ridge pulls the linear part towards the identity, so degenerate weights give a translation.
    """
    w = weights.clamp(min=0.0) + 1e-8
    wsum = w.sum(1, keepdim=True)
    cp = (points * w.unsqueeze(-1)).sum(1, keepdim=True) / wsum.unsqueeze(-1)
    ct = (targets * w.unsqueeze(-1)).sum(1, keepdim=True) / wsum.unsqueeze(-1)
    p = points - cp
    t = targets - ct
    pw = p * w.unsqueeze(-1)
    cov = torch.bmm(pw.transpose(1, 2), p)  # (B, 2, 2)
    cross = torch.bmm(pw.transpose(1, 2), t)  # (B, 2, 2)
    ridge = 1e-3 * wsum.view(-1, 1, 1) * torch.eye(2, device=points.device, dtype=points.dtype).unsqueeze(0)
    lin = torch.linalg.solve(cov + ridge, cross + ridge).transpose(1, 2)  # solve gives lin^T
    trans = ct.squeeze(1) - torch.bmm(lin, cp.transpose(1, 2)).squeeze(-1)
    return torch.cat([lin, trans.unsqueeze(-1)], -1)


def robust_fit_affine(points: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, cauchy: float,
                      iterations: int) -> torch.Tensor:
    """:func:`fit_affine`, then ``iterations`` rounds of Cauchy re-weighting (scale ``cauchy`` px)."""
    a = fit_affine(points, targets, weights)
    for _ in range(iterations):
        res2 = ((affine_points(a, points) - targets) ** 2).sum(-1)
        a = fit_affine(points, targets, weights / (1.0 + res2 / (cauchy * cauchy)))
    return a


def grid_points(b: int, h: int, w: int, device: torch.device, dtype: torch.dtype, step: int = 1) -> torch.Tensor:
    """``(b, N, 2)`` pixel-centre coordinates (x, y) of an ``h x w`` grid, at the positions of
    :func:`subsample` (all ``h*w`` of them when ``step`` is 1)."""
    return subsample(base_grid(b, h, w, device, dtype), step).flatten(2).transpose(1, 2)
