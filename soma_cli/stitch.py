"""Weighted blending of tile flows into a scene flow, one strip of rows at a time (numpy only).

Memory stays bounded by a strip of about two tile heights times the scene width: rows are handed
out (``flush``) as soon as no later tile can touch them, so scenes larger than RAM stream through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .tiling import Tile, blend_weight


@dataclass
class Strip:
    """Finished rows ``[row0, row0 + flow.shape[1])`` of the area: flow (2,h,W), certainty (h,W)
    and ``valid`` (h,W) where at least one tile gave an estimate."""

    row0: int
    flow: np.ndarray
    certainty: np.ndarray
    valid: np.ndarray


class StripStitcher:
    """Accumulate row-major tiles; yield finished strips.

    ``add(tile, flow, certainty, weight_mask)``: ``flow`` (2,h,w) and ``certainty`` (h,w) of a tile;
    the blend weight is the tile's border ramp times ``max(certainty, eps)``, so confident tiles win
    in overlaps.  ``flush(upto)`` yields all rows ``< upto``; ``finish()`` yields the rest.
    """

    def __init__(self, height: int, width: int, overlap: int, eps: float = 1e-3):
        self.height, self.width, self.overlap, self.eps = height, width, overlap, eps
        self.row0 = 0  # first row held in the buffer
        self._alloc(0)

    def _alloc(self, rows: int) -> None:
        self.acc = np.zeros((2, rows, self.width), np.float64)
        self.cacc = np.zeros((rows, self.width), np.float64)
        self.wsum = np.zeros((rows, self.width), np.float64)

    def _ensure(self, last_row: int) -> None:
        need = last_row - self.row0
        have = self.wsum.shape[0]
        if need > have:
            extra = need - have
            self.acc = np.concatenate([self.acc, np.zeros((2, extra, self.width))], axis=1)
            self.cacc = np.concatenate([self.cacc, np.zeros((extra, self.width))], axis=0)
            self.wsum = np.concatenate([self.wsum, np.zeros((extra, self.width))], axis=0)

    def add(self, tile: Tile, flow: np.ndarray, certainty: np.ndarray, mask: Optional[np.ndarray] = None) -> None:
        if tile.row < self.row0:
            raise ValueError("tiles must arrive in row-major order")
        self._ensure(tile.row + tile.height)
        w = blend_weight(tile.height, tile.width, self.overlap) * np.maximum(certainty, self.eps)
        ok = np.isfinite(flow).all(axis=0)
        if mask is not None:
            ok &= mask
        w = np.where(ok, w, 0.0)
        r = slice(tile.row - self.row0, tile.row - self.row0 + tile.height)
        c = tile.cols
        self.acc[:, r, c] += np.where(ok, flow, 0.0) * w
        self.cacc[r, c] += np.where(ok, certainty, 0.0) * w
        self.wsum[r, c] += w

    def flush(self, upto: int) -> Iterator[Strip]:
        upto = min(upto, self.height)
        n = upto - self.row0
        if n <= 0:
            return
        self._ensure(upto)
        ws = self.wsum[:n]
        valid = ws > 0
        safe = np.where(valid, ws, 1.0)
        flow = np.where(valid, self.acc[:, :n] / safe, np.nan).astype(np.float32)
        cert = np.where(valid, self.cacc[:n] / safe, 0.0).astype(np.float32)
        yield Strip(self.row0, flow, cert, valid)
        self.acc = self.acc[:, n:].copy()
        self.cacc = self.cacc[n:].copy()
        self.wsum = self.wsum[n:].copy()
        self.row0 = upto

    def finish(self) -> Iterator[Strip]:
        yield from self.flush(self.height)
