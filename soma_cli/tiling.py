"""Tile layouts over a raster window (numpy only).

:func:`layout` (``soma register``): tiles are ``size x size`` (smaller only when the area itself is
smaller), overlap by ``overlap`` pixels, and the last tile of a row/column is shifted inward so
that every tile lies inside the area (no padding at the scene edge).  Tiles come in row-major
order, which is what lets :mod:`soma_cli.stitch` finalise rows as soon as no later tile can touch
them.  Without a ``--tile-size``, :func:`choose_size` picks the size of :data:`TILE_SIZES` whose
layout holds the fewest pixels.  :func:`grid` (``soma evaluate``'s chips): non-overlapping
tiles on a fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional

import numpy as np

from .errors import ConfigError

#: The tile sizes ``soma register`` chooses from (:func:`choose_size`).  A pixel costs about the same
#: in either, so the layout with fewer pixels is the faster one.  The larger size is bounded by
#: memory: on the CPU two tiles are matched at once (:func:`soma_cli.matchers.sharing_cores`), and
#: a whole Sentinel-2 tile peaked at 1.77-1.94 GB with 672 px tiles, 2.56 GB with 768 px ones.
TILE_SIZES = (512, 672)
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


def validate(size: Optional[int], overlap: int, multiple: int = 32) -> None:
    """Check a tile size and overlap; ``size`` None stands for the default (:func:`choose_size`),
    which needs one of :data:`TILE_SIZES` to allow the overlap."""
    if size is not None and (size < 128 or size % multiple):
        raise ConfigError(f"--tile-size must be a multiple of {multiple} and at least 128 (got {size})")
    _sizes_allowing(TILE_SIZES if size is None else (size,), overlap)


def _sizes_allowing(sizes: Iterable[int], overlap: int) -> List[int]:
    """The ``sizes`` (ascending) that ``overlap`` fits, at most half a tile; ConfigError if none."""
    fit = [s for s in sorted(sizes) if 0 <= overlap < s // 2 + 1]
    if not fit:
        raise ConfigError(f"--overlap must be between 0 and half the tile size (got {overlap})")
    return fit


def layout(height: int, width: int, size: int, overlap: int) -> List[Tile]:
    """All tiles covering a ``height x width`` area, row-major."""
    th, tw = min(size, height), min(size, width)
    return [Tile(r, c, th, tw) for r in starts(height, size, overlap) for c in starts(width, size, overlap)]


def processed_pixels(height: int, width: int, size: int, overlap: int) -> int:
    """The pixels that the tiles of :func:`layout` hold together (overlaps counted once per tile)."""
    rows = starts(height, size, overlap)
    cols = starts(width, size, overlap)
    return len(rows) * min(size, height) * len(cols) * min(size, width)


def choose_size(height: int, width: int, overlap: int) -> int:
    """The size of :data:`TILE_SIZES` (those that allow ``overlap``, :func:`validate`) whose layout of
    a ``height x width`` area holds the fewest :func:`processed_pixels`, the fastest; on a tie the
    smaller, which needs less memory.  A 10980 px scene takes 672 px tiles (400 tiles, 181 MPx,
    against 841 tiles and 220 MPx of 512 px tiles), a 4096 px scene too (28.9 against 31.7 MPx), a
    1024 px scene too (4 tiles, 1.8 against 2.4 MPx); an 800 px scene takes 512 px tiles."""
    return min(_sizes_allowing(TILE_SIZES, overlap), key=lambda s: processed_pixels(height, width, s, overlap))


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
