"""Open a SAR/optical pair and put the moving image on the reference grid (rasterio only).

The reference raster keeps its own grid.  The moving raster is read through a ``WarpedVRT`` onto the
reference CRS, transform, width and height, so rasters with different CRS, resolution and extent
line up through their georeferencing; only the overlap window is processed.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds

from ..errors import BandError, GeoreferenceError, InputError
from ..model.preprocess import resolve_bands


def gdal_env(cache_mb: int = 256) -> rasterio.Env:
    """GDAL settings for a run: a bounded block cache (GDAL's default is 5 % of RAM), so peak
    memory follows the tile strip rather than the machine."""
    return rasterio.Env(GDAL_CACHEMAX=int(cache_mb) * 1024 * 1024)


def open_raster(path: Path, role: str) -> rasterio.DatasetReader:
    """Open ``path`` read-only with clear errors for the usual ways it can go wrong."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{role} file not found: {p}")
    if p.is_dir():
        raise InputError(f"{role} path is a directory, not a raster: {p}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{role} file is not readable: {p}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            ds = rasterio.open(p)
    except RasterioIOError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else "unknown format"
        raise InputError(f"{role} file is not a readable raster: {p} ({msg})") from None
    except RasterioError as exc:
        raise InputError(f"{role} file cannot be opened: {p} ({exc})") from None
    if ds.crs is None:
        ds.close()
        raise GeoreferenceError(f"{role} raster has no CRS: {p}")
    if ds.transform.is_identity:
        ds.close()
        raise GeoreferenceError(f"{role} raster has no geotransform: {p}")
    return ds


def check_readable(ds: rasterio.DatasetReader, role: str) -> None:
    """Read a few blocks across the raster so a truncated/corrupt file fails now, not mid-run."""
    try:
        h, w = ds.height, ds.width
        for r in (0, h // 2, max(h - 1, 0)):
            for c in (0, w // 2, max(w - 1, 0)):
                ds.read(1, window=Window(c, r, 1, 1))
        ds.read(1, out_shape=(min(h, 64), min(w, 64)), resampling=Resampling.nearest)
    except RasterioError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else "read error"
        raise InputError(f"{role} raster is corrupt or truncated: {ds.name} ({msg})") from None


@dataclass
class AlignedPair:
    """The reference raster, the moving raster warped onto its grid, and the overlap window."""

    ref: rasterio.DatasetReader
    mov_src: rasterio.DatasetReader
    mov: WarpedVRT
    window: Window  # overlap, in reference pixels
    ref_is_optical: bool
    optical_bands: Tuple[int, ...]  # 1-based indexes into the optical raster
    sar_band: int
    same_grid: bool  # moving already on the reference grid (no resampling)
    same_crs: bool
    _stack: ExitStack

    @property
    def height(self) -> int:
        return self.ref.height

    @property
    def width(self) -> int:
        return self.ref.width

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "AlignedPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------
    def _bands(self, reference: bool) -> Tuple[int, ...]:
        optical = reference == self.ref_is_optical
        return self.optical_bands if optical else (self.sar_band,)

    def read(self, window: Window, reference: bool, out_shape: Optional[Tuple[int, int]] = None):
        """Read the reference (``reference=True``) or the aligned moving image in ``window`` (reference
        pixels).  Returns ``(data (C, h, w) float32, valid (h, w) bool)``; ``data`` is NaN where
        invalid.  ``out_shape`` decimates (nearest) for overviews."""
        ds = self.ref if reference else self.mov
        bands = list(self._bands(reference))
        kw = {}
        if out_shape is not None:
            kw = {"out_shape": (len(bands),) + tuple(out_shape), "resampling": Resampling.nearest}
        try:
            data = ds.read(bands, window=window, boundless=False, **kw).astype(np.float32)
            mkw = {"out_shape": tuple(out_shape), "resampling": Resampling.nearest} if out_shape else {}
            mask = ds.read_masks(bands[0], window=window, **mkw) > 0  # nodata, alpha or outside source
        except RasterioError as exc:
            raise InputError(f"cannot read {ds.name}: {exc}") from None
        valid = mask & np.isfinite(data).all(axis=0)
        data[:, ~valid] = np.nan
        return data, valid

    def read_moving_source(self) -> np.ndarray:
        """All bands of the moving raster as stored (for writing it with a new transform)."""
        return self.mov_src.read()


def open_pair(
    sar_path: Path,
    opt_path: Path,
    reference: str = "opt",
    bands: Optional[Sequence[int]] = None,
    sar_band: int = 1,
    resampling: Resampling = Resampling.bilinear,
) -> AlignedPair:
    """Open both rasters, validate them, and build the moving->reference ``WarpedVRT``."""
    if reference not in ("opt", "sar"):
        raise InputError(f"--reference must be 'opt' or 'sar' (got {reference!r})")
    stack = ExitStack()
    try:
        sar = stack.enter_context(open_raster(sar_path, "SAR"))
        opt = stack.enter_context(open_raster(opt_path, "optical"))
        check_readable(sar, "SAR")
        check_readable(opt, "optical")
        if not 1 <= sar_band <= sar.count:
            raise BandError(f"SAR band {sar_band} out of range: the SAR raster has {sar.count} band(s)")
        optical_bands = resolve_bands(opt.count, bands)
        ref, mov = (opt, sar) if reference == "opt" else (sar, opt)
        window = overlap_window(ref, mov)
        same_crs = ref.crs == mov.crs
        same_grid = same_crs and ref.transform == mov.transform and ref.shape == mov.shape
        vrt_kw = dict(crs=ref.crs, transform=ref.transform, width=ref.width, height=ref.height,
                      resampling=resampling)
        if mov.nodata is not None:
            vrt_kw["src_nodata"] = mov.nodata
            vrt_kw["nodata"] = mov.nodata
        else:  # an alpha band marks the pixels outside the moving raster
            vrt_kw["add_alpha"] = True
        vrt = stack.enter_context(WarpedVRT(mov, **vrt_kw))
        pair = AlignedPair(ref, mov, vrt, window, reference == "opt", optical_bands, sar_band,
                           same_grid, same_crs, stack)
        check_overlap_has_data(pair)
        return pair
    except BaseException:
        stack.close()
        raise


def overlap_window(ref: rasterio.DatasetReader, mov: rasterio.DatasetReader) -> Window:
    """The window of ``ref`` covered by ``mov`` (through the georeferencing), rounded outward."""
    try:
        mb = transform_bounds(mov.crs, ref.crs, *mov.bounds, densify_pts=21)
    except Exception as exc:  # pyproj/GDAL failures for incompatible CRS
        raise GeoreferenceError(f"cannot transform between the rasters' CRS ({exc})") from None
    rb = ref.bounds
    left, right = max(rb.left, mb[0]), min(rb.right, mb[2])
    bottom, top = max(rb.bottom, mb[1]), min(rb.top, mb[3])
    if not (left < right and bottom < top) or not all(map(math.isfinite, mb)):
        raise GeoreferenceError("the SAR and optical rasters do not overlap")
    win = from_bounds(left, bottom, right, top, transform=ref.transform)
    win = win.round_offsets(op="floor").round_lengths(op="ceil")
    col0, row0 = max(int(win.col_off), 0), max(int(win.row_off), 0)
    col1 = min(int(win.col_off + win.width), ref.width)
    row1 = min(int(win.row_off + win.height), ref.height)
    if col1 - col0 < 32 or row1 - row0 < 32:
        raise GeoreferenceError(
            f"the rasters overlap on only {max(col1 - col0, 0)}x{max(row1 - row0, 0)} reference pixels (need 32x32)"
        )
    return Window(col0, row0, col1 - col0, row1 - row0)


def check_overlap_has_data(pair: AlignedPair, max_side: int = 512) -> None:
    """Fail early when the overlap holds no valid pixel in either raster."""
    w = pair.window
    f = max(1, int(math.ceil(max(w.height, w.width) / max_side)))
    shape = (max(1, int(w.height) // f), max(1, int(w.width) // f))
    _, rv = pair.read(w, True, out_shape=shape)
    _, mv = pair.read(w, False, out_shape=shape)
    if not rv.any():
        raise InputError("the reference raster is all nodata inside the overlap")
    if not mv.any():
        raise InputError("the moving raster is all nodata inside the overlap")
    if not (rv & mv).any():
        raise InputError("the overlap holds no pixel that is valid in both rasters")
