"""Where ``soma register``'s rows go (rasterio only): the aligned image, the displacement raster,
the scratch copy of the flow, and the moving raster's pixels unchanged under new georeferencing
(the affine mode's corrected geotransform, the GCP mode's ground control points).

:class:`ImageSink` and :class:`FlowSink` are context managers over :func:`~soma_cli.io.write.atomic_raster`
(a tiled, compressed GeoTIFF, a COG on request, renamed into place only when complete) on the
reference grid.  Rows arrive top to bottom in strips (``write(..., row_abs)``, absolute reference
rows); the rows outside the overlap window, never written, are filled with no data.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
from affine import Affine
from rasterio.control import GroundControlPoint
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window

from .. import coords
from ..stitch import Strip
from ..tiepoints import TiePoints
from .pair import AlignedPair
from .write import atomic_raster, scratch_raster

FLOW_NODATA = -9999.0
FLOW_DESCRIPTIONS = (
    "dx: column displacement in reference pixels; reference pixel (c, r) matches the moving image "
    "(on the reference grid) at (c + dx, r + dy)",
    "dy: row displacement in reference pixels (see band 1)",
    "certainty of the match, 0..1",
    ("estimated error of the match in reference pixels (the self-consistency check of soma register "
     "--check: a local median; no data where there is no estimate)"),
)
FLOW_UNITS = ("pixel", "pixel", "1", "pixel")
#: Pixels per strip of the flow (stitched, read back from the scratch file, warped and written; and
#: per block of no-data rows): strips of a wide scene are lower, so that the memory of the passes
#: does not grow with it.
STRIP_PIXELS = 1 << 20


def strip_rows(width: int) -> int:
    """Rows per strip of a ``width``-pixel-wide area: :data:`STRIP_PIXELS` worth, 16 to 512."""
    return max(16, min(512, STRIP_PIXELS // max(int(width), 1)))


def _moving_nodata(pair: AlignedPair) -> Tuple[Optional[float], bool]:
    """``(nodata, use_mask)`` of outputs holding the moving image: its own nodata value, else NaN
    for floating point, else (integers without one) an internal mask."""
    nodata = pair.mov_src.nodata
    if nodata is not None:
        return nodata, False
    if np.issubdtype(np.dtype(pair.mov_src.dtypes[0]), np.floating):
        return float("nan"), False
    return None, True


class _RowSink:
    """An atomic GeoTIFF on the reference grid written top to bottom; rows skipped get no data."""

    def __init__(self, dest: Path, profile: dict, **atomic):
        self.height, self.width = profile["height"], profile["width"]
        self._ctx = atomic_raster(dest, profile, **atomic)
        self._next = 0  # first row not written yet
        self.dst = None

    def __enter__(self):
        self.dst = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._fill(self.height)
            except BaseException as err:
                self._ctx.__exit__(type(err), err, err.__traceback__)
                raise
        return self._ctx.__exit__(exc_type, exc, tb)

    def _fill(self, upto: int) -> None:
        rows = strip_rows(self.width)
        for a in range(self._next, upto, rows):
            self._write(self._blank(min(a + rows, upto) - a), a)
        self._next = max(self._next, upto)

    def _put(self, rows, row_abs: int, h: int) -> None:
        self._fill(row_abs)
        self._write(rows, row_abs)
        self._next = row_abs + h

    def _write(self, rows, row_abs: int) -> None:
        raise NotImplementedError

    def _blank(self, h: int):
        raise NotImplementedError


class ImageSink(_RowSink):
    """The moving image, aligned: every band of the moving raster, its dtype and nodata (or an
    internal mask for integers without a nodata value), on the reference grid."""

    def __init__(self, pair: AlignedPair, dest: Path, cog: bool = False, tags: Optional[dict] = None):
        mov, ref = pair.mov_src, pair.ref
        self.nodata, self.use_mask = _moving_nodata(pair)
        self.bands = mov.count
        prof = dict(driver="GTiff", width=ref.width, height=ref.height, count=mov.count, dtype=mov.dtypes[0],
                    crs=ref.crs, transform=ref.transform, nodata=self.nodata)
        super().__init__(dest, prof, cog=cog, tags=tags)

    def write(self, data: np.ndarray, valid: np.ndarray, row_abs: int) -> None:
        """Rows from ``row_abs``: ``data`` (bands, h, reference width), float; no data where not
        ``valid``.  Integer outputs get the rounded values, clipped to the dtype's range."""
        self._put((data, valid), row_abs, valid.shape[0])

    def _blank(self, h: int):
        return np.full((self.bands, h, self.width), np.nan), np.zeros((h, self.width), bool)

    def _write(self, rows, row_abs: int) -> None:
        data, valid = rows
        dtype = np.dtype(self.dst.dtypes[0])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            vals = np.clip(np.rint(np.nan_to_num(data)), info.min, info.max)
        else:
            vals = data
        nodata = self.nodata
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            vals = np.where(valid, vals, nodata)
        elif nodata is not None:
            vals = np.where(valid, vals, np.nan)
        window = Window(0, row_abs, self.width, data.shape[1])
        self.dst.write(vals.astype(dtype), window=window)
        if self.use_mask:
            self.dst.write_mask((valid * 255).astype(np.uint8), window=window)


class FlowSink(_RowSink):
    """The displacement raster (band 1 dx, band 2 dy in reference pixels, band 3 certainty, and with
    ``error_band`` band 4 the estimated error in reference pixels; float32, :data:`FLOW_NODATA`
    where there is no estimate) on the reference grid."""

    def __init__(self, pair: AlignedPair, dest: Path, cog: bool = False, tags: Optional[dict] = None,
                 error_band: bool = False):
        self.count = 4 if error_band else 3
        prof = dict(driver="GTiff", width=pair.width, height=pair.height, count=self.count, dtype="float32",
                    crs=pair.ref.crs, transform=pair.ref.transform, nodata=FLOW_NODATA)
        self.col0 = pair.area.col
        super().__init__(dest, prof, cog=cog, descriptions=FLOW_DESCRIPTIONS[:self.count],
                         units=FLOW_UNITS[:self.count],
                         tags={"SOMA_CONVENTION": FLOW_DESCRIPTIONS[0], **(tags or {})})

    def write(self, strip: Strip, row_abs: int) -> None:
        """A strip of the overlap window (its columns start at the window's), from row ``row_abs``;
        band 4 is no data where the strip has no error estimate."""
        h = strip.flow.shape[1]
        out = self._blank(h)
        sl = slice(self.col0, self.col0 + strip.flow.shape[2])
        v = strip.valid & np.isfinite(strip.flow).all(0)
        out[0, :, sl] = np.where(v, strip.flow[0], FLOW_NODATA)
        out[1, :, sl] = np.where(v, strip.flow[1], FLOW_NODATA)
        out[2, :, sl] = np.where(v, strip.certainty, FLOW_NODATA)
        if self.count == 4 and strip.error is not None:
            out[3, :, sl] = np.where(v & np.isfinite(strip.error), strip.error, FLOW_NODATA)
        self._put(out, row_abs, h)

    def _blank(self, h: int) -> np.ndarray:
        return np.full((self.count, h, self.width), FLOW_NODATA, np.float32)

    def _write(self, rows: np.ndarray, row_abs: int) -> None:
        self.dst.write(rows, window=Window(0, row_abs, self.width, rows.shape[1]))


class FlowScratch:
    """A window-sized scratch copy of the stitched flow (dx, dy, certainty, and with ``errors`` the
    estimated error; NaN where no tile gave an estimate) in ``folder``, so that the flow can be read
    again after a scene-wide fit without holding it in memory; always deleted."""

    def __init__(self, folder: Path, height: int, width: int, errors: bool = False):
        self.height, self.width, self.errors = height, width, errors
        self._ctx = scratch_raster(Path(folder), width, height, 4 if errors else 3)
        self.ds = None

    def __enter__(self) -> "FlowScratch":
        self.ds = self._ctx.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb):
        return self._ctx.__exit__(exc_type, exc, tb)

    def write(self, strip: Strip) -> None:
        bands = [strip.flow, strip.certainty[None]] + ([strip.error[None]] if self.errors else [])
        data = np.concatenate(bands).astype(np.float32, copy=False)
        data[:, ~strip.valid] = np.nan
        self.ds.write(data, window=Window(0, strip.row0, data.shape[2], data.shape[1]))

    def strips(self) -> Iterator[Strip]:
        """The stored flow again, top to bottom, in strips of :func:`strip_rows` rows."""
        rows = strip_rows(self.width)
        for a in range(0, self.height, rows):
            data = self.ds.read(window=Window(0, a, self.width, min(rows, self.height - a)))
            yield Strip(a, data[:2], np.nan_to_num(data[2]), np.isfinite(data[:3]).all(0),
                        data[3] if self.errors else None)


def _copy_moving(pair: AlignedPair, dest: Path, profile: dict, cog: bool, tags: Optional[dict], gcps=None) -> None:
    """The moving raster's pixels (and internal mask) unchanged into ``dest`` with ``profile``'s
    georeferencing, or with the ground control points ``gcps`` (``(gcps, crs)``)."""
    mov = pair.mov_src
    _, use_mask = _moving_nodata(pair)
    with atomic_raster(dest, profile, cog=cog, tags=tags) as dst:
        if gcps is not None:
            dst.gcps = gcps
        for _, window in mov.block_windows(1):
            dst.write(mov.read(window=window), window=window)
            if use_mask:
                dst.write_mask(mov.read_masks(1, window=window), window=window)


def write_relocated(pair: AlignedPair, dest: Path, affine: np.ndarray, cog: bool = False,
                    tags: Optional[dict] = None) -> Affine:
    """Affine mode with rasters of one CRS: the moving raster's pixels unchanged under the
    geotransform that the fitted reference-pixel ``affine`` corrects
    (:func:`~soma_cli.coords.corrected_transform`); returns that geotransform."""
    mov = pair.mov_src
    transform = coords.corrected_transform(pair.ref.transform, affine, mov.transform)
    prof = dict(mov.profile)
    prof.update(transform=transform)
    _copy_moving(pair, dest, prof, cog, tags)
    return transform


def write_with_gcps(pair: AlignedPair, dest: Path, points: TiePoints, cog: bool = False,
                    tags: Optional[dict] = None) -> int:
    """GCP mode: the moving raster's pixels unchanged, georeferenced by one ground control point
    per tie point of ``points`` (returns their number), so that a thin-plate-spline warp
    (``gdalwarp -tps``) puts them on the reference.

    Tie point ``(col, row)`` matches the moving image on the reference grid at
    ``(col + dx_px, row + dy_px)``, whose map position is ``(x + dx_map, y + dy_map)``; that point's
    pixel in the moving raster's own grid (through its CRS and geotransform) gets the map
    position of the reference pixel centre, ``(x, y)``, in the reference CRS.  The moving raster
    needs a CRS and a geotransform."""
    mov, ref = pair.mov_src, pair.ref
    mx, my = points.x + points.dx_map, points.y + points.dy_map
    if mov.crs != ref.crs:
        mx, my = (np.asarray(v) for v in warp_transform(ref.crs, mov.crs, mx, my))
    pixel, line = coords.map_to_image(mov.transform, mx, my)
    gcps = [GroundControlPoint(row=float(r), col=float(c), x=float(x), y=float(y), id=str(int(i)))
            for i, c, r, x, y in zip(points.id, pixel, line, points.x, points.y)]
    prof = {k: v for k, v in mov.profile.items() if k not in ("crs", "transform")}
    _copy_moving(pair, dest, prof, cog, tags, gcps=(gcps, ref.crs))
    return len(gcps)
