"""The one module that owns every coordinate convention of SOMA.

Nothing else in the package defines how pixels, normalised coordinates, map coordinates, affine
transforms or flows relate; everything goes through the functions here.

Conventions
-----------
Pixel coordinates
    Pixel ``(c, r)`` (column ``c``, row ``r``, 0-based) has its **centre** at the continuous point
    ``(x=c, y=r)``; its footprint is ``[c-0.5, c+0.5] x [r-0.5, r+0.5]``.  (GDAL/rasterio "image
    coordinates" put the *corner* of pixel (0, 0) at (0, 0), i.e. the centre of (c, r) at
    ``(c+0.5, r+0.5)``: see :func:`pixel_to_map` / :func:`map_to_pixel`.)

Normalised coordinates
    What ``torch.nn.functional.grid_sample(..., align_corners=False)`` expects:
    ``xn = (2*c + 1) / W - 1``, so -1 and +1 are the outer *edges* of the image, not pixel centres.
    Every ``grid_sample``/``interpolate`` call of the package uses ``align_corners=False``.

Flow (displacement field)
    Array/tensor ``(..., 2, H, W)`` on a reference grid. Channel 0 is ``dx`` (along columns),
    channel 1 is ``dy`` (along rows), in pixels of that grid.  Reference pixel ``(c, r)`` matches
    the moving image (already on the reference grid) at ``(c + dx, r + dy)``.  Warping the moving
    image by the flow, ``warped(c, r) = moving(c + dx, r + dy)``, aligns it to the reference.

Pyramid levels
    A map at stride ``s`` (made by ``s x s`` average pooling or ``interpolate(align_corners=False)``)
    has level pixel ``cs`` centred on full-resolution ``c = s*cs + (s-1)/2``.  Displacements scale by
    ``s``: ``flow_full = s * flow_level`` (see :func:`upsample_flow`, :func:`downsample_flow`).

Affine transforms
    A 2x3 matrix ``A`` (or 3x3 with last row ``[0, 0, 1]``) maps a reference pixel ``(c, r, 1)`` to
    the matching moving pixel ``(c', r')``; its flow is ``A @ p - p``.  ``compose_affine(A, B)`` is
    "B first, then A": the total match when the moving image was already warped by ``A`` and the
    residual match is ``B``.

This module is numpy only; the TorchScript-compatible torch twins of these functions, compiled into the
exported network, live in :mod:`soma_cli.model.geometry` and follow the same conventions.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
from affine import Affine
from scipy import ndimage

# ----------------------------------------------------------------------------- pixel <-> normalised


def pixel_to_norm(c, size: int):
    """Pixel-centre coordinate -> normalised ``align_corners=False`` coordinate (numpy or torch)."""
    return (2.0 * c + 1.0) / size - 1.0


def norm_to_pixel(n, size: int):
    """Normalised ``align_corners=False`` coordinate -> pixel-centre coordinate (numpy or torch)."""
    return ((n + 1.0) * size - 1.0) / 2.0


# ----------------------------------------------------------------------------- pixel <-> map


def pixel_to_map(transform: Affine, cols, rows):
    """Map coordinates of pixel centres ``(cols, rows)`` under a rasterio/GDAL geotransform."""
    cols = np.asarray(cols, dtype=np.float64) + 0.5
    rows = np.asarray(rows, dtype=np.float64) + 0.5
    x = transform.a * cols + transform.b * rows + transform.c
    y = transform.d * cols + transform.e * rows + transform.f
    return x, y


def map_to_pixel(transform: Affine, xs, ys):
    """Inverse of :func:`pixel_to_map`: continuous pixel-centre coordinates of map points."""
    inv = ~transform
    xs = np.asarray(xs, dtype=np.float64)
    ys = np.asarray(ys, dtype=np.float64)
    c = inv.a * xs + inv.b * ys + inv.c - 0.5
    r = inv.d * xs + inv.e * ys + inv.f - 0.5
    return c, r


def map_to_image(transform: Affine, xs, ys):
    """GDAL/rasterio image coordinates ``(pixel, line)`` of map points, the corner of pixel (0, 0)
    at (0, 0): :func:`map_to_pixel` + 0.5, as ground control points give them."""
    c, r = map_to_pixel(transform, xs, ys)
    return c + 0.5, r + 0.5


# ----------------------------------------------------------------------------- numpy grids and warps


def base_grid_np(h: int, w: int, dtype=np.float32) -> np.ndarray:
    """``(2, h, w)`` array of pixel-centre coordinates: ``[0]`` = column x, ``[1]`` = row y."""
    ys, xs = np.meshgrid(np.arange(h, dtype=dtype), np.arange(w, dtype=dtype), indexing="ij")
    return np.stack([xs, ys])


def warp_np(
    image: np.ndarray, flow: np.ndarray, order: int = 1, cval: float = np.nan, edge: bool = False
) -> np.ndarray:
    """Sample ``image`` at ``q + flow(q)``: ``out[..., r, c] = image[..., r + dy, c + dx]``.

    ``image`` is ``(H, W)`` or ``(C, H, W)``; ``flow`` is ``(2, H', W')`` (the output grid).
    Points outside the image get ``cval`` (or the nearest edge value with ``edge=True``).  ``order`` is the spline order (0 nearest, 1 bilinear,
    3 cubic).
    """
    return sample_np(image, flow_positions_np(flow), order, cval, edge)


def flow_positions_np(flow: np.ndarray) -> np.ndarray:
    """``(2, H, W)`` float64: where each pixel ``q`` of the flow's grid points, ``q + flow(q)``, as
    (row, column), the order :func:`sample_np` (and scipy) take."""
    flow = np.asarray(flow)
    h, w = flow.shape[-2:]
    return np.stack([np.arange(h, dtype=np.float64)[:, None] + flow[1], np.arange(w, dtype=np.float64) + flow[0]])


def sample_np(image: np.ndarray, positions: np.ndarray, order: int = 1, cval: float = np.nan,
              edge: bool = False) -> np.ndarray:
    """``image`` (``(H, W)`` or ``(C, H, W)``) sampled at ``positions`` ``(2, H', W')`` (row, column;
    :func:`flow_positions_np`), as :func:`warp_np` describes."""
    h, w = positions.shape[-2:]
    img = np.asarray(image)
    squeeze = img.ndim == 2
    if squeeze:
        img = img[None]
    out_dtype = np.result_type(img.dtype, np.float32)
    out = np.empty((img.shape[0], h, w), dtype=out_dtype)
    for i in range(img.shape[0]):
        ndimage.map_coordinates(
            img[i].astype(np.float64, copy=False), positions, output=out[i], order=order,
            mode="nearest" if edge else "constant", cval=cval, prefilter=order > 1,
        )
    return out[0] if squeeze else out


def inside_mask_np(flow: np.ndarray, src_h: int, src_w: int) -> np.ndarray:
    """Boolean ``(H, W)``: where ``q + flow(q)`` lies inside a ``src_h x src_w`` image (centres)."""
    return inside_np(flow_positions_np(flow), src_h, src_w)


def inside_np(positions: np.ndarray, src_h: int, src_w: int) -> np.ndarray:
    """Boolean ``(H, W)``: where the positions ``(2, H, W)`` (row, column; :func:`flow_positions_np`)
    lie inside a ``src_h x src_w`` image (centres): where :func:`sample_np` interpolates, of order 1,
    without reading beyond it."""
    y, x = positions
    return (x >= 0) & (x <= src_w - 1) & (y >= 0) & (y <= src_h - 1)


def compose_flow_np(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Total flow when the moving image was warped by ``first`` and ``second`` is the residual.

    ``total(q) = second(q) + first(q + second(q))``.
    """
    sampled = warp_np(first, second, order=1, edge=True)  # beyond the field: nearest edge value
    return (second + sampled).astype(np.float32)


def invert_flow_np(flow: np.ndarray, iters: int = 20) -> np.ndarray:
    """Inverse field ``g`` with ``g(q + f(q)) = -f(q)``, by fixed-point ``g(p) = -f(p + g(p))``."""
    f = np.asarray(flow, dtype=np.float32)
    g = -f.copy()
    for _ in range(iters):
        g = -warp_np(f, g, order=1, edge=True)
    return g.astype(np.float32)


# ----------------------------------------------------------------------------- affine (numpy)


def to3x3(a: np.ndarray) -> np.ndarray:
    """2x3 or 3x3 affine -> 3x3 float64."""
    a = np.asarray(a, dtype=np.float64)
    if a.shape == (3, 3):
        return a
    out = np.eye(3)
    out[:2] = a.reshape(2, 3)
    return out


def compose_affine_np(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``b`` first, then ``a`` (both in the same pixel grid); returns 2x3."""
    return (to3x3(a) @ to3x3(b))[:2]


def affine_to_flow_np(a: np.ndarray, h: int, w: int, col0: float = 0.0, row0: float = 0.0) -> np.ndarray:
    """Flow ``(2, h, w)`` of an affine given in a grid whose origin is ``(col0, row0)`` away.

    ``col0``/``row0`` let a tile at window offset (col0, row0) evaluate a scene-level affine.
    """
    m = to3x3(a)
    grid = base_grid_np(h, w, np.float64)
    x = grid[0] + col0
    y = grid[1] + row0
    fx = m[0, 0] * x + m[0, 1] * y + m[0, 2] - x
    fy = m[1, 0] * x + m[1, 1] * y + m[1, 2] - y
    return np.stack([fx, fy]).astype(np.float32)


def scale_affine_np(a: np.ndarray, stride: float) -> np.ndarray:
    """Full-resolution pixel affine -> the same affine in stride-``stride`` level pixels."""
    o = (stride - 1.0) / 2.0
    s = np.array([[stride, 0.0, o], [0.0, stride, o], [0.0, 0.0, 1.0]])
    return (np.linalg.inv(s) @ to3x3(a) @ s)[:2]


def fit_affine_np(
    flow: np.ndarray,
    weight: Optional[np.ndarray] = None,
    step: int = 4,
    iters: int = 6,
    col0: float = 0.0,
    row0: float = 0.0,
) -> Tuple[np.ndarray, dict]:
    """Robust affine fit to a flow field ``(2, H, W)`` sampled every ``step`` pixels.

    The grid origin is ``(col0, row0)`` (for tiles/windows of a larger grid).  See
    :func:`fit_affine_points_np` for the returned values.
    """
    f = np.asarray(flow, dtype=np.float64)[:, ::step, ::step]
    h, w = f.shape[1:]
    grid = base_grid_np(h, w, np.float64) * step
    x = (grid[0] + col0).ravel()
    y = (grid[1] + row0).ravel()
    wt = None if weight is None else np.asarray(weight, np.float64)[::step, ::step].ravel()
    return fit_affine_points_np(x, y, x + f[0].ravel(), y + f[1].ravel(), wt, iters)


def fit_affine_points_np(x, y, u, v, weight=None, iters: int = 6) -> Tuple[np.ndarray, dict]:
    """Robust (IRLS, Tukey) weighted least-squares affine mapping pixels ``(x, y)`` to ``(u, v)``.

    Returns the 2x3 affine and a dict with ``rmse`` (weighted residual of the kept points, px),
    ``inliers`` (share of weight kept) and ``n`` (points used).  Non-finite points are ignored.
    """
    x, y, u, v = (np.asarray(a, np.float64).ravel() for a in (x, y, u, v))
    wt = np.ones_like(x) if weight is None else np.asarray(weight, np.float64).ravel()
    ok = np.isfinite(u) & np.isfinite(v) & np.isfinite(wt) & (wt > 0)
    if ok.sum() < 6:
        return np.array([[1.0, 0, 0], [0, 1.0, 0]]), {"rmse": float("nan"), "inliers": 0.0, "n": int(ok.sum())}
    x, y, u, v, wt = x[ok], y[ok], u[ok], v[ok], wt[ok]
    cx, cy = x.mean(), y.mean()  # centre for conditioning
    design = np.stack([x - cx, y - cy, np.ones_like(x)], axis=1)
    rw = np.ones_like(x)
    for _ in range(iters):
        ww = wt * rw
        # the weighted least squares by their 3 x 3 normal equations (the design is centred)
        dw = design * ww[:, None]
        sol = np.linalg.lstsq(design.T @ dw, np.stack([dw.T @ u, dw.T @ v], 1), rcond=None)[0]
        px, py = sol[:, 0], sol[:, 1]
        res = np.hypot(design @ px - u, design @ py - v)
        scale = max(1.4826 * np.median(res[ww > 0]) if (ww > 0).any() else 1.0, 0.25)
        c = 4.685 * scale
        rw = np.where(res < c, (1 - (res / c) ** 2) ** 2, 0.0)
    a = np.array([[px[0], px[1], px[2] - px[0] * cx - px[1] * cy],
                  [py[0], py[1], py[2] - py[0] * cx - py[1] * cy]])
    ww = wt * rw
    rmse = float(np.sqrt(np.sum(ww * res**2) / max(ww.sum(), 1e-12)))
    return a, {"rmse": rmse, "inliers": float(ww.sum() / max(wt.sum(), 1e-12)), "n": int(ok.sum())}


# ----------------------------------------------------------------------------- resampling, strides, matches

#: The ``--resampling`` names and the spline order of :func:`warp_np` each stands for
#: (:mod:`soma_cli.io` maps the same names to rasterio's resampling).
SPLINE_ORDERS = {"nearest": 0, "bilinear": 1, "cubic": 3}


def stride_offsets(start: int, n: int, step: int) -> np.ndarray:
    """Offsets ``k`` in ``[0, n)`` of the pixels ``start + k`` that a stride-``step`` decimated grid
    keeps.  Decimated pixel ``i`` *is* full-resolution pixel ``step * i`` (a sample, unlike the
    pooled pyramid levels, centred at ``step * i + (step - 1) / 2``); a flow sampled there converts
    to decimated pixels by :func:`flow_to_stride_np`."""
    return np.arange((-int(start)) % step, int(n), step)


def flow_to_stride_np(flow: np.ndarray, step: int) -> np.ndarray:
    """A flow in full-resolution pixels -> the same flow in pixels of the stride-``step`` grid."""
    return np.asarray(flow) / step


def affine_flow_points_np(a: np.ndarray, x, y) -> Tuple[np.ndarray, np.ndarray]:
    """Flow ``(dx, dy)`` of the reference-pixel affine ``a`` at the pixels ``(x, y)`` (float64)."""
    m = to3x3(a)
    return m[0, 0] * x + m[0, 1] * y + m[0, 2] - x, m[1, 0] * x + m[1, 1] * y + m[1, 2] - y


def invert_match_np(flow: np.ndarray, certainty: np.ndarray, *more: np.ndarray) -> Tuple[np.ndarray, ...]:
    """A match found on grid A expressed on grid B (``--reference sar`` with matchers that work on
    the optical grid): A pixel ``q`` matches B at ``q + f(q)``, so B pixel ``p`` matches A at
    ``p + g(p)`` with ``g`` the inverse field (:func:`invert_flow_np`); the certainty, and any
    ``more`` maps of the match (its estimated error), travel with it (sampled at ``p + g(p)``,
    nearest edge value beyond the tile).  Returns ``(g, certainty, *more)``."""
    g = invert_flow_np(flow)
    return (g,) + tuple(warp_np(m, g, order=1, edge=True) for m in (certainty,) + more)


def corrected_transform(ref_transform: Affine, a: np.ndarray, mov_transform: Affine) -> Affine:
    """New geotransform for the moving raster after a fitted match ``a`` (reference-pixel affine).

    The content at reference pixel ``p`` sits, under the moving raster's current georeferencing,
    at reference pixel ``a(p)``.  The map correction ``C = T_ref o (a^-1) o T_ref^-1`` (pixel-centre
    convention) moves it back; the moving raster keeps its pixels and gets ``C o T_mov``.  Valid when
    both rasters share a CRS.
    """
    tr = to3x3(np.array(ref_transform).reshape(3, 3))
    half = np.array([[1.0, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1.0]])
    p2m = tr @ half  # pixel centre -> map
    corr = p2m @ np.linalg.inv(to3x3(a)) @ np.linalg.inv(p2m)
    new = corr @ np.array(mov_transform).reshape(3, 3)
    return Affine(*new[:2].ravel())
