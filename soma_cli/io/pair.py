"""Open a SAR/optical pair and put the moving image on the reference grid (rasterio only).

The reference raster keeps its own grid.  The moving raster is read through a ``WarpedVRT`` onto the
reference CRS, transform, width and height, so rasters with different CRS, resolution and extent
line up through their georeferencing; only the overlap window is processed.

A moving raster georeferenced by ground control points only (a Sentinel-1 GRD measurement file as
shipped in the SAFE product, for example) is read through :class:`GcpWarpedReader` instead, which
warps each requested window with GDAL's GCP transformer (``rasterio.warp.reproject``): rasterio's
``WarpedVRT`` reads zeros from such a source onto an explicit grid (rasterio 1.4.4, GDAL 3.10).
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.transform import array_bounds
from rasterio.errors import RasterioError, RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, reproject, transform_bounds
from rasterio.windows import Window, from_bounds
from rasterio.windows import transform as window_transform

from ..errors import BandError, GeoreferenceError, InputError, SomaWarning
from . import open_quietly, resampling as rasterio_resampling
from ..interrupt import HELPER_THREADS
from ..preprocess import resolve_bands
from ..tiling import Tile


def gdal_env(cache_mb: int = 128) -> rasterio.Env:
    """GDAL settings for a run: a bounded block cache (GDAL's default is 5 % of RAM), so peak
    memory follows the tile strip rather than the machine; 128 MB hold a row of 672 px tiles of a
    10980 px wide scene (three 16-bit optical bands and a float32 SAR band: 74 MB), so that each
    block is decoded once."""
    return rasterio.Env(GDAL_CACHEMAX=int(cache_mb) * 1024 * 1024)


def has_gcps_only(ds: rasterio.DatasetReader) -> bool:
    """The raster is georeferenced by ground control points (with their CRS) and nothing else."""
    gcps, crs = ds.gcps
    return ds.crs is None and bool(gcps) and crs is not None


def not_georeferenced(ds: rasterio.DatasetReader) -> bool:
    """No CRS, no geotransform, no ground control points: a plain image (a PNG chip, say)."""
    return ds.crs is None and ds.transform.is_identity and not ds.gcps[0]


def open_raster(path: Path, role: str, allow_gcps: bool = False, allow_plain: bool = False) -> rasterio.DatasetReader:
    """Open ``path`` read-only with clear errors for the usual ways it can go wrong.  With
    ``allow_gcps`` a raster georeferenced by ground control points only is accepted too, and with
    ``allow_plain`` one without any georeferencing."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{role} file not found: {p}")
    if p.is_dir():
        raise InputError(f"{role} path is a directory, not a raster: {p}")
    if not os.access(p, os.R_OK):
        raise InputError(f"{role} file is not readable: {p}")
    try:
        ds = open_quietly(p)
    except RasterioIOError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else "unknown format"
        raise InputError(f"{role} file is not a readable raster: {p} ({msg})") from None
    except RasterioError as exc:
        raise InputError(f"{role} file cannot be opened: {p} ({exc})") from None
    if allow_plain and not_georeferenced(ds):
        return ds
    if has_gcps_only(ds):
        if allow_gcps:
            return ds
        ds.close()
        raise GeoreferenceError(
            f"{role} raster is georeferenced by ground control points only, which the reference grid "
            f"cannot be: {p} (make it the moving image, or orthorectify it first)")
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


class GcpWarpedReader:
    """The part of a ``WarpedVRT``'s reading interface that :class:`AlignedPair` and the pipeline use
    (``read``, ``read_masks``, ``name``, ``close``), for a source georeferenced by ground control
    points only.  Each call warps just the requested window of the reference grid with GDAL's GCP
    transformer, so memory follows the window, not the raster.  Values come back as float32, NaN
    where nothing maps; the source's nodata value, or 0 for an integer source without one (the
    zero-filled border of a Sentinel-1 GRD), counts as no data."""

    def __init__(self, src: rasterio.DatasetReader, crs, transform, resampling: Resampling):
        self.src = src
        self.gcps, self.gcp_crs = src.gcps
        self.crs = crs
        self.transform = transform
        self.resampling = resampling
        if src.nodata is not None:
            self.src_nodata = src.nodata
        elif np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
            self.src_nodata = 0
        else:
            self.src_nodata = None
        self.name = f"{src.name} (warped by its ground control points)"
        self._last: Optional[tuple] = None  # ((window, shape), {band: array}) of the last window warped

    def close(self) -> None:
        self._last = None

    def _band(self, band: int, window: Window, shape: Tuple[int, int]) -> np.ndarray:
        key = (tuple(map(float, window.flatten())), tuple(shape))
        if self._last is None or self._last[0] != key:
            self._last = (key, {})
        cache = self._last[1]
        if band not in cache:
            h, w = shape
            t = window_transform(window, self.transform)
            t = t * Affine.scale(float(window.width) / w, float(window.height) / h)
            out = np.full((h, w), np.nan, np.float32)
            reproject(rasterio.band(self.src, band), out, gcps=self.gcps, src_crs=self.gcp_crs,
                      src_nodata=self.src_nodata, dst_transform=t, dst_crs=self.crs, dst_nodata=np.nan,
                      resampling=self.resampling)
            cache[band] = out
        return cache[band]

    @staticmethod
    def _shape(window: Window, out_shape) -> Tuple[int, int]:
        return tuple(out_shape[-2:]) if out_shape is not None else (int(window.height), int(window.width))

    def read(self, indexes, window: Window, boundless: bool = False, out_shape=None, resampling=None) -> np.ndarray:
        bands = [indexes] if isinstance(indexes, int) else list(indexes)
        data = np.stack([self._band(b, window, self._shape(window, out_shape)) for b in bands])
        return data[0] if isinstance(indexes, int) else data

    def read_masks(self, band: int, window: Window, out_shape=None, resampling=None) -> np.ndarray:
        valid = np.isfinite(self._band(band, window, self._shape(window, out_shape)))
        return np.where(valid, 255, 0).astype(np.uint8)


def georef_bounds(ds: rasterio.DatasetReader):
    """``(crs, (left, bottom, right, top))`` of a raster, from its ground control points if it has
    nothing else."""
    if has_gcps_only(ds):
        gcps, crs = ds.gcps
        t, w, h = calculate_default_transform(crs, crs, ds.width, ds.height, gcps=gcps)
        return crs, array_bounds(h, w, t)
    return ds.crs, tuple(ds.bounds)


@dataclass
class AlignedPair:
    """The reference raster, the moving raster warped onto its grid, and the overlap window.

    Its readers may be called from several threads: a lock per raster serialises that raster's
    reads (a GDAL dataset handle is not thread-safe), so the reference and the moving raster are
    read in parallel, and the conversions after the reads run in parallel."""

    ref: rasterio.DatasetReader
    mov_src: rasterio.DatasetReader
    # the raster itself where it is on the reference grid already (or in pixel-grid mode)
    mov: Union[WarpedVRT, GcpWarpedReader, rasterio.DatasetReader]
    window: Window  # overlap, in reference pixels
    ref_is_optical: bool
    optical_bands: Tuple[int, ...]  # 1-based indexes into the optical raster
    sar_band: int
    same_grid: bool  # moving already on the reference grid (no resampling)
    same_crs: bool
    _stack: ExitStack
    # the reference's (True) and the moving raster's (False)
    _locks: Dict[bool, threading.Lock] = field(
        default_factory=lambda: {True: threading.Lock(), False: threading.Lock()})
    _previews: Dict[Tuple[bool, int], Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return self.ref.height

    @property
    def width(self) -> int:
        return self.ref.width

    def close(self) -> None:
        # after the read under way, if a reading thread outlives the run (soma_cli.interrupt); a read
        # after this one fails as unreadable input
        with self._locks[True], self._locks[False]:
            self._stack.close()

    def __enter__(self) -> "AlignedPair":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def area(self) -> Tile:
        """The overlap window as a :class:`~soma_cli.tiling.Tile` in reference pixels."""
        w = self.window
        return Tile(int(w.row_off), int(w.col_off), int(w.height), int(w.width))

    @property
    def moving_count(self) -> int:
        """Bands of the moving raster (all of them are aligned and written)."""
        return self.mov_src.count

    @property
    def sar_is_float(self) -> bool:
        """The SAR band is stored as floating point (dB products are)."""
        sar = self.mov_src if self.ref_is_optical else self.ref
        return bool(np.issubdtype(np.dtype(sar.dtypes[self.sar_band - 1]), np.floating))

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
        mkw = {"out_shape": tuple(out_shape), "resampling": Resampling.nearest} if out_shape else {}
        try:
            with self._locks[reference]:
                data = ds.read(bands, window=window, boundless=False, **kw)
                mask = ds.read_masks(bands[0], window=window, **mkw) > 0  # nodata, alpha or outside source
        except RasterioError as exc:
            raise InputError(f"cannot read {ds.name}: {exc}") from None
        data = data.astype(np.float32)
        valid = mask & np.isfinite(data).all(axis=0)
        data[:, ~valid] = np.nan
        return data, valid

    def read_tile(self, tile: Tile, reference: bool):
        """:meth:`read` of a tile of :attr:`area` (its offsets relative to the overlap window)."""
        w = self.window
        return self.read(Window(w.col_off + tile.col, w.row_off + tile.row, tile.width, tile.height), reference)

    def read_overview(self, reference: bool, shape: Tuple[int, int]):
        """:meth:`read` of the whole overlap window decimated to ``shape``."""
        return self.read(self.window, reference, out_shape=shape)

    def read_preview(self, reference: bool, max_side: int = 512):
        """:meth:`read_overview` at an integer decimation that brings the longest side to at most
        ``max_side`` pixels (for scene-wide checks; read once, the arrays are shared: do not modify
        them)."""
        key = (reference, max_side)
        if key not in self._previews:
            w = self.window
            f = max(1, int(math.ceil(max(w.height, w.width) / max_side)))
            self._previews[key] = self.read_overview(reference, (max(1, int(w.height) // f), max(1, int(w.width) // f)))
        return self._previews[key]

    def read_moving_block(self, r0: int, r1: int, c0: int, c1: int) -> Tuple[np.ndarray, np.ndarray]:
        """Every band of the aligned moving image in rows ``[r0, r1)``, columns ``[c0, c1)`` of the
        reference grid, for warping: ``(data (C, h, w) float64, valid (h, w) bool)``."""
        window = Window(c0, r0, c1 - c0, r1 - r0)
        try:
            with self._locks[False]:
                data = self.mov.read(list(range(1, self.moving_count + 1)), window=window)
                mask = self.mov.read_masks(1, window=window) > 0
        except RasterioError as exc:
            raise InputError(f"cannot read {self.mov.name}: {exc}") from None
        data = data.astype(np.float64)
        return data, mask & np.isfinite(data).all(0)


def open_pair(
    sar_path: Path,
    opt_path: Path,
    reference: str = "opt",
    bands: Optional[Sequence[int]] = None,
    sar_band: int = 1,
    resampling: str = "bilinear",
) -> AlignedPair:
    """Open both rasters, validate them, and build the moving->reference ``WarpedVRT``, which
    resamples with ``resampling`` (a ``--resampling`` name); a moving raster on the reference grid
    already is read as it is (the same pixels, without a warper's cost: 11 against under 1 ms a
    768 px tile)."""
    if reference not in ("opt", "sar"):
        raise InputError(f"--reference must be 'opt' or 'sar' (got {reference!r})")
    method = rasterio_resampling(resampling)
    stack = ExitStack()
    try:
        sar = stack.enter_context(open_raster(sar_path, "SAR", allow_gcps=reference == "opt", allow_plain=True))
        opt = stack.enter_context(open_raster(opt_path, "optical", allow_gcps=reference == "sar", allow_plain=True))
        _both(lambda: check_readable(sar, "SAR"), lambda: check_readable(opt, "optical"))
        if not 1 <= sar_band <= sar.count:
            raise BandError(f"SAR band {sar_band} out of range: the SAR raster has {sar.count} band(s)")
        if sar.count >= 3:
            warnings.warn(SomaWarning(f"the SAR raster {Path(sar_path).name} has {sar.count} bands, like an optical "
                                      f"image; using band {sar_band} (SAR and optical swapped?)"), stacklevel=2)
        optical_bands = resolve_bands(opt.count, bands)
        ref, mov = (opt, sar) if reference == "opt" else (sar, opt)
        plain = [(role, p) for role, ds, p in (("SAR", sar, sar_path), ("optical", opt, opt_path))
                 if not_georeferenced(ds)]
        if plain:  # image chips: the moving raster is read as it is
            window = pixel_grid_window(sar, opt, plain)
            reader, same_grid, same_crs = mov, True, False
        else:
            window = overlap_window(ref, mov)
            same_crs = ref.crs == mov.crs  # False for a GCP-only raster (no CRS)
            same_grid = same_crs and ref.transform == mov.transform and ref.shape == mov.shape
            if same_grid:  # already on the reference grid: read as it is, not through a warper
                reader = mov
            elif has_gcps_only(mov):
                reader = GcpWarpedReader(mov, ref.crs, ref.transform, method)
                stack.callback(reader.close)
            else:
                vrt_kw = dict(crs=ref.crs, transform=ref.transform, width=ref.width, height=ref.height,
                              resampling=method)
                if mov.nodata is not None:
                    vrt_kw["src_nodata"] = mov.nodata
                    vrt_kw["nodata"] = mov.nodata
                else:  # an alpha band marks the pixels outside the moving raster
                    vrt_kw["add_alpha"] = True
                reader = stack.enter_context(WarpedVRT(mov, **vrt_kw))
        pair = AlignedPair(ref, mov, reader, window, reference == "opt", optical_bands, sar_band,
                           same_grid, same_crs, stack)
        check_overlap_has_data(pair)
        return pair
    except BaseException:
        stack.close()
        raise


def pixel_grid_window(sar: rasterio.DatasetReader, opt: rasterio.DatasetReader, plain) -> Window:
    """The whole image, when the rasters named in ``plain`` (``[(role, path)]``, those without any
    georeferencing) are both of them and have one size: image chips share their pixel grid, pixel
    (c, r) of one being pixel (c, r) of the other before registration.  One georeferenced and one
    plain raster cannot be placed."""
    if len(plain) == 1:
        role, path = plain[0]
        raise GeoreferenceError(f"{role} raster has no CRS: {path} (the other raster is georeferenced)")
    if (sar.height, sar.width) != (opt.height, opt.width):
        raise GeoreferenceError(
            f"neither raster is georeferenced and their sizes differ (SAR {sar.width}x{sar.height}, "
            f"optical {opt.width}x{opt.height}), so nothing places them on one grid")
    return Window(0, 0, opt.width, opt.height)


def overlap_window(ref: rasterio.DatasetReader, mov: rasterio.DatasetReader) -> Window:
    """The window of ``ref`` covered by ``mov`` (through the georeferencing), rounded outward."""
    try:
        mov_crs, mov_bounds = georef_bounds(mov)
        mb = transform_bounds(mov_crs, ref.crs, *mov_bounds, densify_pts=21)
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


def _both(first: Callable[[], Any], second: Callable[[], Any]) -> Tuple[Any, Any]:
    """``(first(), second())``, computed in two threads (reads of two rasters: GDAL decodes them in
    parallel); the first's error is raised first."""
    with ThreadPoolExecutor(2, thread_name_prefix=HELPER_THREADS) as pool:
        a, b = pool.submit(first), pool.submit(second)
        return a.result(), b.result()


def check_overlap_has_data(pair: AlignedPair, max_side: int = 512) -> None:
    """Fail early when the overlap holds no valid pixel in either raster."""
    (_, rv), (_, mv) = _both(lambda: pair.read_preview(True, max_side), lambda: pair.read_preview(False, max_side))
    if not rv.any():
        raise InputError("the reference raster is all nodata inside the overlap")
    if not mv.any():
        raise InputError("the moving raster is all nodata inside the overlap")
    if not (rv & mv).any():
        raise InputError("the overlap holds no pixel that is valid in both rasters")
