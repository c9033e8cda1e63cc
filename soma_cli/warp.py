"""Resampling the moving image with the flow, a strip of rows at a time (numpy only).

The moving image is read on the reference grid (:meth:`soma_cli.io.pair.AlignedPair.read_moving_block`)
only around the rows a strip of flow points into, so memory follows the strip, not the scene.
"""

from __future__ import annotations

import math
from typing import Callable, Tuple

import numpy as np

from . import coords

#: ``read_block(r0, r1, c0, c1) -> (data (C, h, w) float64, valid (h, w) bool)`` on the reference grid.
BlockReader = Callable[[int, int, int, int], Tuple[np.ndarray, np.ndarray]]
MARGIN = 3  # source rows/columns read beyond the sampled extent (the cubic spline's support)


class RowWarper:
    """``warper(flow, row_abs) -> (data, valid)``: the moving image sampled at ``q + flow(q)``.

    ``flow`` is ``(2, h, window width)`` for the overlap-window rows starting at absolute reference
    row ``row_abs`` (NaN: no estimate, those pixels come out invalid).  The result spans the whole
    reference width: ``data (bands, h, width)`` float64, NaN where invalid, and ``valid (h, width)``.
    A pixel is valid when its sample position lies among valid source pixels.  ``order`` is the
    spline order (:data:`soma_cli.coords.SPLINE_ORDERS`).
    """

    def __init__(self, read_block: BlockReader, bands: int, height: int, width: int, col0: int, order: int):
        self.read_block, self.bands = read_block, bands
        self.height, self.width, self.col0, self.order = height, width, col0, order

    def __call__(self, flow: np.ndarray, row_abs: int) -> Tuple[np.ndarray, np.ndarray]:
        h = flow.shape[1]
        col_abs = self.col0
        out = np.full((self.bands, h, self.width), np.nan)
        valid = np.zeros((h, self.width), bool)
        pos = coords.flow_positions_np(flow)  # (row, column) in the strip's frame; NaN: no estimate
        fin = np.isfinite(pos).all(0)
        if not fin.any():
            return out, valid
        # the rows and columns sampled (fmin/fmax skip NaN)
        r0 = max(math.floor(np.fmin.reduce(pos[0], axis=None)) + row_abs - MARGIN, 0)
        r1 = min(math.ceil(np.fmax.reduce(pos[0], axis=None)) + row_abs + MARGIN + 1, self.height)
        c0 = max(math.floor(np.fmin.reduce(pos[1], axis=None)) + col_abs - MARGIN, 0)
        c1 = min(math.ceil(np.fmax.reduce(pos[1], axis=None)) + col_abs + MARGIN + 1, self.width)
        if r1 <= r0 or c1 <= c0:
            return out, valid
        src, src_valid = self.read_block(r0, r1, c0, c1)
        if not fin.all():
            pos[:, ~fin] = 0.0  # sampled anywhere, never valid
        pos += np.array([row_abs - r0, col_abs - c0], np.float64)[:, None, None]  # into the block read
        if src_valid.all():  # the bilinear valid map is 1 exactly where no neighbour lies outside
            fill = src
            vmask = coords.inside_np(pos, r1 - r0, c1 - c0)
        else:
            fill = np.where(src_valid, src, np.nanmean(src[:, src_valid], axis=1)[:, None, None] if src_valid.any() else 0)
            vmask = coords.sample_np(src_valid.astype(np.float64), pos, order=1, cval=0.0) > 1.0 - 1e-6
        warped = coords.sample_np(fill, pos, order=self.order, cval=np.nan)
        ok = fin & vmask & np.isfinite(warped).all(0)
        sl = slice(col_abs, col_abs + flow.shape[2])
        out[:, :, sl] = np.where(ok, warped, np.nan)
        valid[:, sl] = ok
        return out, valid
