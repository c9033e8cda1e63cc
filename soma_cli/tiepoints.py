"""Tie points: the final flow sampled on a regular grid of the reference image, for GIS (numpy only).

The grid is anchored on the reference image, not on the overlap: with ``step`` pixels, the points
are the reference pixels ``(col, row) = (step // 2 + i * step, step // 2 + j * step)`` inside the
overlap window where the flow is valid.  :class:`TiePointSampler` keeps only those rows of the
strips streaming past, so memory follows the number of points, not the scene.  Each point gives
the match of its reference pixel centre (the flow convention of :mod:`soma_cli.coords`), in
reference pixels and in map units, with its certainty; :data:`FIELDS` documents the table that
:func:`soma_cli.io.tiepoints.write_tiepoints` writes, and :meth:`TiePoints.gcp_indices` picks the
points that become ground control points in ``--mode gcps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import List

import numpy as np

from . import coords
from .errors import MatchError
from .stitch import Strip
from .tiling import Tile

#: a tie point is reliable when its certainty reaches the matcher's evidence level
#: (:func:`soma_cli.matchers.evidence_certainty`) and its estimated error, when there is one, is at
#: most this many reference pixels
RELIABLE_ERROR_PX = 1.0
#: at most this many ground control points: GDAL's thin-plate-spline solve grows with the cube of
#: their number (about 0.3 s for 1000, 3 s for 2000, a minute for 4000)
MAX_GCPS = 2000
#: fewer reliable tie points than this cannot georeference an image by thin-plate spline
MIN_GCPS = 10

#: The tie point table, in order: ``(name, description)``.
FIELDS = (
    ("id", "tie point number, 1-based, row-major over the grid"),
    ("col", "reference pixel column (0-based; the point is that pixel's centre)"),
    ("row", "reference pixel row (0-based)"),
    ("x", "map x of the reference pixel centre (reference CRS; image coordinates col + 0.5 without one)"),
    ("y", "map y of the reference pixel centre (reference CRS; image coordinates row + 0.5, down, without one)"),
    ("dx_px", ("column displacement in reference pixels: the reference pixel matches the moving image "
               "(on the reference grid) at (col + dx_px, row + dy_px)")),
    ("dy_px", "row displacement in reference pixels"),
    ("dx_map", "map x of the matched point minus x (map units of the reference CRS)"),
    ("dy_map", "map y of the matched point minus y (map units of the reference CRS)"),
    ("certainty", "certainty of the match, 0..1"),
    ("est_error", "estimated error of the match in reference pixels; NULL without an error estimate"),
    ("reliable", (f"certainty >= the matcher's evidence level (soma 0.7, gradient 0.1) and est_error <= "
                  f"{RELIABLE_ERROR_PX:g} px where known")),
)


@dataclass
class TiePoints:
    """The tie point table: one array per field of :data:`FIELDS` (``step`` is the grid's)."""

    step: int
    id: np.ndarray
    col: np.ndarray
    row: np.ndarray
    x: np.ndarray
    y: np.ndarray
    dx_px: np.ndarray
    dy_px: np.ndarray
    dx_map: np.ndarray
    dy_map: np.ndarray
    certainty: np.ndarray
    est_error: np.ndarray
    reliable: np.ndarray

    def __len__(self) -> int:
        return int(self.id.size)

    def columns(self) -> List[np.ndarray]:
        """The arrays in the order of :data:`FIELDS`."""
        return [getattr(self, name) for name, _ in FIELDS]

    def take(self, idx: np.ndarray) -> TiePoints:
        """The points ``idx``."""
        return TiePoints(self.step, *(getattr(self, f.name)[idx] for f in fields(self)[1:]))

    def gcp_indices(self, max_n: int = MAX_GCPS, min_n: int = MIN_GCPS) -> np.ndarray:
        """Indices of the reliable points on the finest sub-grid (every k-th grid column and row)
        that keeps at most ``max_n`` of them.  Fewer than ``min_n`` reliable points is a
        :class:`~soma_cli.errors.MatchError`."""
        reliable = np.flatnonzero(self.reliable)
        if reliable.size < min_n:
            raise MatchError(f"only {reliable.size} reliable tie points (certainty at the matcher's evidence "
                             f"level); --mode gcps needs at least {min_n}")
        gi = (self.col[reliable] - self.step // 2) // self.step
        gj = (self.row[reliable] - self.step // 2) // self.step
        k = max(1, math.isqrt(reliable.size // max(max_n, 1)))
        while True:
            keep = reliable[(gi % k == 0) & (gj % k == 0)]
            if keep.size <= max_n:
                return keep
            k += 1


class TiePointSampler:
    """Collects the tie points of the final strips of the overlap window ``area`` (absolute
    reference pixels), ``step`` pixels apart; a point is reliable from certainty ``evidence`` on."""

    def __init__(self, step: int, area: Tile, evidence: float):
        self.step, self.area, self.evidence = int(step), area, float(evidence)
        self._cols = coords.stride_offsets(area.col - self.step // 2, area.width, self.step)
        self._parts: List[tuple] = []

    def add(self, strip: Strip) -> None:
        """Keep the grid points of a strip of the window (rows from ``strip.row0``)."""
        row_abs = self.area.row + strip.row0
        rows = coords.stride_offsets(row_abs - self.step // 2, strip.flow.shape[1], self.step)
        if not rows.size or not self._cols.size:
            return
        grid = np.ix_(rows, self._cols)
        dx, dy = strip.flow[0][grid], strip.flow[1][grid]
        ok = strip.valid[grid] & np.isfinite(dx) & np.isfinite(dy)
        rr, cc = np.meshgrid(rows + row_abs, self._cols + self.area.col, indexing="ij")
        err = np.full(int(ok.sum()), np.nan, np.float32) if strip.error is None else strip.error[grid][ok]
        self._parts.append((cc[ok], rr[ok], dx[ok], dy[ok], strip.certainty[grid][ok], err))

    def table(self, transform) -> TiePoints:
        """The points gathered so far, in map coordinates of the reference geotransform ``transform``.

        ``est_error`` is the strips' estimated error (:mod:`soma_cli.check`), NaN (NULL in the
        file) where they carry none; reliability then rests on the certainty alone."""
        if self._parts:
            col, row, dx, dy, cert, err = (np.concatenate(a) for a in zip(*self._parts))
        else:
            col = row = np.zeros(0, np.int64)
            dx = dy = cert = err = np.zeros(0, np.float32)
        col, row = col.astype(np.int64), row.astype(np.int64)
        dx, dy = dx.astype(np.float64), dy.astype(np.float64)
        x, y = coords.pixel_to_map(transform, col, row)
        mx, my = coords.pixel_to_map(transform, col + dx, row + dy)
        est_error = err.astype(np.float64)
        reliable = (cert >= self.evidence) & ~(est_error > RELIABLE_ERROR_PX)
        return TiePoints(self.step, np.arange(1, col.size + 1, dtype=np.int64), col, row, x, y, dx, dy,
                         mx - x, my - y, cert.astype(np.float64), est_error, reliable)
