"""Tile layouts over a raster window (numpy only).

:func:`layout` (``soma register``): tiles are ``size x size`` (smaller only when the area itself is
smaller), overlap by ``overlap`` pixels, and the last tile of a row/column is shifted inward so
that every tile lies inside the area (no padding at the scene edge).  Tiles come in row-major
order, which is what lets :mod:`soma_cli.stitch` finalise rows as soon as no later tile can touch
them.  :func:`grid` (``soma evaluate``'s chips): non-overlapping tiles on a fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List

import numpy as np

from .errors import ConfigError

#: ``soma register``'s tiles and their overlap, in pixels.
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 128


@dataclass(frozen=True)
class Tile:
    """A tile window: offsets relative to the area origin, and its size."""

    row: int
    col: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.row, self.row + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.col, self.col + self.width)


def starts(length: int, size: int, overlap: int) -> List[int]:
    """Tile start offsets along one axis; the last start is ``length - size`` (shifted inward)."""
    if length <= size:
        return [0]
    step = size - overlap
    out = list(range(0, length - size + 1, step))
    if out[-1] != length - size:
        out.append(length - size)
    return out


def validate(size: int, overlap: int, multiple: int = 32) -> None:
    if size < 128 or size % multiple:
        raise ConfigError(f"--tile-size must be a multiple of {multiple} and at least 128 (got {size})")
    if overlap < 0 or overlap >= size // 2 + 1:
        raise ConfigError(f"--overlap must be between 0 and half the tile size (got {overlap})")


def layout(height: int, width: int, size: int, overlap: int) -> List[Tile]:
    """All tiles covering a ``height x width`` area, row-major."""
    th, tw = min(size, height), min(size, width)
    return [Tile(r, c, th, tw) for r in starts(height, size, overlap) for c in starts(width, size, overlap)]


def grid(height: int, width: int, size: int) -> List[Tile]:
    """Non-overlapping ``size x size`` tiles anchored at the top-left corner (rows and columns
    ``0, size, 2*size, ...``), row-major; a remainder at the right/bottom is left out."""
    return [Tile(r, c, size, size) for r in range(0, height - size + 1, size)
            for c in range(0, width - size + 1, size)]


def rows_of(tiles: List[Tile]) -> Iterator[List[Tile]]:
    """Group a row-major layout into tile rows (same ``row`` offset)."""
    current: List[Tile] = []
    for t in tiles:
        if current and t.row != current[0].row:
            yield current
            current = []
        current.append(t)
    if current:
        yield current


def blend_weight(height: int, width: int, overlap: int) -> np.ndarray:
    """Blending weights ``(height, width)``: 1 in the middle, a linear ramp over ``overlap`` pixels
    at each border down to a small positive floor (so edge tiles still count where they are alone)."""

    def ramp(n: int) -> np.ndarray:
        if overlap <= 0:
            return np.ones(n, np.float32)
        i = np.arange(n, dtype=np.float32)
        d = np.minimum(i + 0.5, n - i - 0.5)
        return np.clip(d / overlap, 0.02, 1.0).astype(np.float32)

    return np.outer(ramp(height), ramp(width)).astype(np.float32)
