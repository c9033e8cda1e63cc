"""The one orchestrator of ``soma register``.

    read and align inputs -> tile -> match -> stitch the flow -> warp and write -> QA

Memory is bounded by a strip of rows (about two tiles high) times the scene width, whatever the
scene size: tiles are matched in row-major order, finished rows are warped and written at once.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from . import coords, tiling
from .errors import ConfigError, MatchError, OutputError
from .io.pair import AlignedPair, gdal_env, open_pair
from .io.write import atomic_raster, check_output, scratch_raster
from .matchers import Matcher, get_matcher, trust_certainty
from . import preprocess
from .stitch import FlowPrior, Strip, StripStitcher

Progress = Callable[[int, int], None]

FLOW_NODATA = -9999.0
FLOW_DESCRIPTIONS = (
    "dx: column displacement in reference pixels; reference pixel (c, r) matches the moving image "
    "(on the reference grid) at (c + dx, r + dy)",
    "dy: row displacement in reference pixels (see band 1)",
    "certainty of the match, 0..1",
)
RESAMPLING_ORDERS = {"nearest": 0, "bilinear": 1, "cubic": 3}
OVERVIEW_MAX = 2048  # QA overviews: longest side
SAMPLE_STEP = 8  # flow samples kept for the global fit and the summary


@dataclass
class RegisterOptions:
    """What ``soma register`` does; see ``soma register --help``."""

    sar: Path
    opt: Path
    out: Path
    reference: str = "opt"
    method: str = "soma"
    mode: str = "dense"
    flow_out: Optional[Path] = None
    qa_out: Optional[Path] = None
    tile_size: int = 512
    overlap: int = 128
    batch_size: int = 4
    device: str = "auto"
    threads: Optional[int] = None
    bands: Optional[Tuple[int, ...]] = None
    sar_band: int = 1
    sar_scale: str = "auto"
    resampling: str = "bilinear"
    weights: Optional[Path] = None
    overwrite: bool = False
    cog: bool = False
    repair: bool = True  # blend low-certainty outliers towards a smooth certainty-weighted prior


@dataclass
class RegisterResult:
    out: str
    flow_out: Optional[str]
    qa_out: Optional[str]
    method: str
    mode: str
    reference: str
    tiles: int
    window: Dict[str, int]
    median_flow: float
    certainty_coverage: float
    affine: List[List[float]]
    affine_rmse: float
    affine_inliers: float
    repaired_share: float = 0.0
    output_transform: Optional[List[float]] = None
    sar_scale: str = "auto"
    seconds: float = 0.0
    qa: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Samples:
    """Flow samples on a coarse grid (absolute reference pixels) for the fit and the summary."""

    x: List[np.ndarray] = field(default_factory=list)
    y: List[np.ndarray] = field(default_factory=list)
    dx: List[np.ndarray] = field(default_factory=list)
    dy: List[np.ndarray] = field(default_factory=list)
    cert: List[np.ndarray] = field(default_factory=list)

    def add(self, strip: Strip, row_abs0: int, col_abs0: int) -> None:
        h = strip.flow.shape[1]
        rows = [r for r in range(h) if (r + strip.row0) % SAMPLE_STEP == 0]
        if not rows:
            return
        f = strip.flow[:, rows, ::SAMPLE_STEP]
        c = strip.certainty[rows, ::SAMPLE_STEP]
        ok = np.isfinite(f).all(0)
        yy, xx = np.meshgrid(np.asarray(rows) + strip.row0 + row_abs0,
                             np.arange(0, strip.flow.shape[2], SAMPLE_STEP) + col_abs0, indexing="ij")
        self.x.append(xx[ok]), self.y.append(yy[ok]), self.dx.append(f[0][ok]), self.dy.append(f[1][ok])
        self.cert.append(c[ok])

    def arrays(self):
        cat = lambda a: np.concatenate(a) if a else np.zeros(0)  # noqa: E731
        return cat(self.x), cat(self.y), cat(self.dx), cat(self.dy), cat(self.cert)

    def fit(self):
        """Robust, certainty-weighted global affine of the samples: ``(2x3, stats)``."""
        x, y, dx, dy, cert = self.arrays()
        if x.size < 6:
            raise MatchError("no valid flow estimate in the overlap")
        return coords.fit_affine_points_np(x, y, x + dx, y + dy, np.maximum(cert, 1e-3))


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _validate(opts: RegisterOptions) -> None:
    if opts.reference not in ("opt", "sar"):
        raise ConfigError(f"--reference must be 'opt' or 'sar' (got {opts.reference!r})")
    if opts.mode not in ("dense", "affine"):
        raise ConfigError(f"--mode must be 'dense' or 'affine' (got {opts.mode!r})")
    if opts.resampling not in RESAMPLING_ORDERS:
        raise ConfigError(f"--resampling must be one of {', '.join(RESAMPLING_ORDERS)}")
    if opts.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    if opts.sar_scale not in preprocess.SAR_KINDS:
        raise ConfigError(f"--sar-scale must be one of {', '.join(preprocess.SAR_KINDS)}")
    tiling.validate(opts.tile_size, opts.overlap)
    for flag, path in (("--out", opts.out), ("--flow-out", opts.flow_out)):
        if path is not None and Path(path).suffix.lower() not in (".tif", ".tiff"):
            raise OutputError(f"{flag} is written as a GeoTIFF: give it a .tif or .tiff name (got {Path(path).name})")
    inputs = (opts.sar, opts.opt)
    check_output(opts.out, opts.overwrite, inputs)
    if opts.flow_out is not None:
        check_output(opts.flow_out, opts.overwrite, inputs)
        if Path(opts.flow_out).resolve() == Path(opts.out).resolve():
            raise OutputError("--flow-out must differ from the output image")
    if opts.qa_out is not None:
        q = Path(opts.qa_out)
        if not q.parent.is_dir():
            raise OutputError(f"QA folder's parent does not exist: {q.parent}")
        if q.exists() and not q.is_dir():
            raise OutputError(f"--qa-out is not a directory: {q}")
        if q.is_dir() and any(q.iterdir()) and not opts.overwrite:
            raise OutputError(f"QA folder is not empty: {q} (use --overwrite to replace its files)")


class _Preparer:
    """Turns raw tiles into the matcher's standardised single-channel inputs."""

    def __init__(self, pair: AlignedPair, sar_scale: str):
        self.pair = pair
        if sar_scale == "auto":
            w = pair.window
            f = max(1, int(math.ceil(max(w.height, w.width) / 512)))
            shape = (max(1, int(w.height) // f), max(1, int(w.width) // f))
            sar_is_ref = not pair.ref_is_optical
            data, valid = pair.read(w, sar_is_ref, out_shape=shape)
            src = pair.ref if sar_is_ref else pair.mov_src
            is_float = np.issubdtype(np.dtype(src.dtypes[pair.sar_band - 1]), np.floating)
            sar_scale = preprocess.detect_sar_kind(data[0][valid], is_float)
        self.sar_scale = sar_scale

    def __call__(self, data: np.ndarray, valid: np.ndarray, optical: bool) -> np.ndarray:
        if optical:
            gray = preprocess.optical_to_gray(data)
        else:
            gray = preprocess.sar_to_log(data[0], self.sar_scale, valid)
        return preprocess.standardise(gray, valid)


def register(opts: RegisterOptions, progress: Optional[Progress] = None,
             matcher: Optional[Matcher] = None) -> RegisterResult:
    """Co-register ``opts.sar`` and ``opts.opt``; write the aligned image (and flow, QA)."""
    t0 = time.perf_counter()
    _validate(opts)
    if opts.threads:
        import torch

        torch.set_num_threads(int(opts.threads))
    resampling = Resampling.cubic if opts.resampling == "cubic" else Resampling.bilinear
    with gdal_env(), open_pair(opts.sar, opts.opt, opts.reference, opts.bands, opts.sar_band, resampling) as pair:
        if matcher is None:
            matcher = get_matcher(opts.method, weights=opts.weights, device=opts.device,
                                  batch_size=opts.batch_size, threads=opts.threads or default_threads())
        run = _Run(opts, pair, matcher, progress)
        result = run.execute()
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


class _Run:
    """One registration: state shared by the streaming passes."""

    def __init__(self, opts: RegisterOptions, pair: AlignedPair, matcher: Matcher, progress: Optional[Progress]):
        self.opts, self.pair, self.matcher, self.progress = opts, pair, matcher, progress
        self.win = pair.window
        self.prep = _Preparer(pair, opts.sar_scale)
        self.tiles = tiling.layout(int(self.win.height), int(self.win.width), opts.tile_size, opts.overlap)
        self.samples = _Samples()
        self.tile_rows: List[dict] = []
        self.order = RESAMPLING_ORDERS[opts.resampling]
        self.qa = opts.qa_out is not None
        w = self.win
        self.ov_step = max(1, int(math.ceil(max(w.height, w.width) / OVERVIEW_MAX)))
        self.repaired = 0
        self.valid_px = 0
        self.ov_flow: List[np.ndarray] = []
        self.ov_cert: List[np.ndarray] = []

    # -- matching ---------------------------------------------------------------------------------
    def _match_batch(self, batch: List[tiling.Tile]):
        ref_is_opt = self.pair.ref_is_optical
        refs, movs, rvs, mvs = [], [], [], []
        for t in batch:
            window = Window(self.win.col_off + t.col, self.win.row_off + t.row, t.width, t.height)
            rd, rv = self.pair.read(window, True)
            md, mv = self.pair.read(window, False)
            refs.append(self.prep(rd, rv, ref_is_opt))
            movs.append(self.prep(md, mv, not ref_is_opt))
            rvs.append(rv)
            mvs.append(mv)
        ref, mov, rv, mv = (np.stack(a) for a in (refs, movs, rvs, mvs))
        if ref_is_opt:
            flow, cert = self.matcher.match(ref, mov, rv, mv)
        else:  # matchers work on the optical grid: match, then invert onto the SAR grid
            flow_o, cert_o = self.matcher.match(mov, ref, mv, rv)
            flow = np.stack([coords.invert_flow_np(f) for f in flow_o])
            cert = np.stack([coords.warp_np(c, f, order=1, edge=True) for c, f in zip(cert_o, flow)])
        flow = np.asarray(flow, np.float32)
        cert = np.clip(np.asarray(cert, np.float32), 0.0, 1.0) * rv
        if self.qa:
            from . import qa

            for i, t in enumerate(batch):
                after = coords.warp_np(mov[i], flow[i], order=1, cval=np.nan)
                before = np.where(mv[i], mov[i], np.nan)
                scores = qa.tile_scores(np.where(rv[i], ref[i], np.nan), before, after, flow[i], cert[i], rv[i])
                self.tile_rows.append({"row_off": int(self.win.row_off + t.row),
                                       "col_off": int(self.win.col_off + t.col),
                                       "height": t.height, "width": t.width, **scores})
        return flow, cert, rv

    def _strips(self):
        """Match all tiles; yield finished strips of the window, in order."""
        stitcher = StripStitcher(int(self.win.height), int(self.win.width), self.opts.overlap)
        done, total = 0, len(self.tiles)
        rows = list(tiling.rows_of(self.tiles))
        bs = self.opts.batch_size
        for i, trow in enumerate(rows):
            for j in range(0, len(trow), bs):
                batch = trow[j:j + bs]
                flow, cert, rv = self._match_batch(batch)
                for k, t in enumerate(batch):
                    stitcher.add(t, flow[k], cert[k], rv[k])
                done += len(batch)
                if self.progress:
                    self.progress(done, total)
            upto = rows[i + 1][0].row if i + 1 < len(rows) else int(self.win.height)
            yield from stitcher.flush(upto)
        yield from stitcher.finish()

    def _final_strips(self, scratch) -> Iterator[Strip]:
        """Pass 1: match and stitch into ``scratch`` (window-sized dx, dy, certainty); fit the prior.
        Pass 2: read the strips back, repair outliers, observe and yield them."""
        raw = _Samples()
        r0, c0 = int(self.win.row_off), int(self.win.col_off)
        for strip in self._strips():
            h = strip.flow.shape[1]
            data = np.concatenate([strip.flow, strip.certainty[None]]).astype(np.float32)
            data[:, ~strip.valid] = np.nan
            scratch.write(data, window=Window(0, strip.row0, data.shape[2], h))
            raw.add(strip, r0, c0)
        prior = None
        if self.opts.repair:
            affine, _ = raw.fit()
            x, y, dx, dy, cert = raw.arrays()
            prior = FlowPrior(x, y, dx, dy, cert, affine, int(self.win.height), int(self.win.width), r0, c0)
        total = int(self.win.height)
        for a in range(0, total, 512):
            h = min(512, total - a)
            data = scratch.read(window=Window(0, a, int(self.win.width), h))
            valid = np.isfinite(data).all(0)
            strip = Strip(a, data[:2], np.nan_to_num(data[2]), valid)
            if prior is not None:
                before = strip.certainty
                strip = prior.repair(strip, r0 + a, c0, trust_cert=trust_certainty(self.matcher))
                self.repaired += int(np.count_nonzero(valid & (strip.certainty < before)))
            self.valid_px += int(np.count_nonzero(valid))
            self._observe(strip)
            yield strip

    def _observe(self, strip: Strip) -> None:
        self.samples.add(strip, int(self.win.row_off), int(self.win.col_off))
        if self.qa:
            s = self.ov_step
            rows = [r for r in range(strip.flow.shape[1]) if (r + strip.row0) % s == 0]
            if rows:
                self.ov_flow.append(strip.flow[:, rows, ::s])
                self.ov_cert.append(strip.certainty[rows, ::s])

    # -- writing ----------------------------------------------------------------------------------
    def _out_profile(self) -> Tuple[dict, Optional[float], bool]:
        ref, mov = self.pair.ref, self.pair.mov_src
        bands = mov.count
        dtype = mov.dtypes[0]
        nodata = mov.nodata
        use_mask = False
        if nodata is None:
            if np.issubdtype(np.dtype(dtype), np.floating):
                nodata = float("nan")
            else:
                use_mask = True
        prof = dict(driver="GTiff", width=ref.width, height=ref.height, count=bands, dtype=dtype,
                    crs=ref.crs, transform=ref.transform, nodata=nodata)
        return prof, nodata, use_mask

    def _warp_rows(self, flow: np.ndarray, row_abs: int) -> Tuple[np.ndarray, np.ndarray]:
        """Warp the aligned moving image (all bands) for window rows starting at ``row_abs``.

        ``flow`` (2, h, window width) may hold NaN (no estimate): those pixels come out invalid.
        Returns ``(data (C, h, ref width) float64, valid (h, ref width))``.
        """
        pair, win = self.pair, self.win
        h = flow.shape[1]
        col_abs = int(win.col_off)
        fin = np.isfinite(flow).all(0)
        out = np.full((pair.mov_src.count, h, pair.width), np.nan)
        valid = np.zeros((h, pair.width), bool)
        if not fin.any():
            return out, valid
        rr, cc = np.nonzero(fin)
        ys = rr + row_abs + flow[1][fin]
        xs = cc + col_abs + flow[0][fin]
        r0 = max(int(math.floor(ys.min())) - 3, 0)
        r1 = min(int(math.ceil(ys.max())) + 4, pair.height)
        c0 = max(int(math.floor(xs.min())) - 3, 0)
        c1 = min(int(math.ceil(xs.max())) + 4, pair.width)
        if r1 <= r0 or c1 <= c0:
            return out, valid
        bands = list(range(1, out.shape[0] + 1))
        src = pair.mov.read(bands, window=Window(c0, r0, c1 - c0, r1 - r0)).astype(np.float64)
        src_valid = (pair.mov.read_masks(1, window=Window(c0, r0, c1 - c0, r1 - r0)) > 0) & np.isfinite(src).all(0)
        fill = np.where(src_valid, src, np.nanmean(src[:, src_valid], axis=1)[:, None, None] if src_valid.any() else 0)
        shifted = np.where(fin, flow, 0.0) + np.array([col_abs - c0, row_abs - r0], np.float64)[:, None, None]
        warped = coords.warp_np(fill, shifted, order=self.order, cval=np.nan)
        vmask = coords.warp_np(src_valid.astype(np.float64), shifted, order=1, cval=0.0) > 1.0 - 1e-6
        ok = fin & vmask & np.isfinite(warped).all(0)
        sl = slice(col_abs, col_abs + flow.shape[2])
        out[:, :, sl] = np.where(ok, warped, np.nan)
        valid[:, sl] = ok
        return out, valid

    def _write_image_rows(self, dst, data: np.ndarray, valid: np.ndarray, row_abs: int, nodata, use_mask: bool):
        dtype = np.dtype(dst.dtypes[0])
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            vals = np.clip(np.rint(np.nan_to_num(data)), info.min, info.max)
        else:
            vals = data
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            vals = np.where(valid, vals, nodata)
        elif nodata is not None:
            vals = np.where(valid, vals, np.nan)
        window = Window(0, row_abs, dst.width, data.shape[1])
        dst.write(vals.astype(dtype), window=window)
        if use_mask:
            dst.write_mask((valid * 255).astype(np.uint8), window=window)

    def _blank_rows(self, dst, r0: int, r1: int, nodata, use_mask: bool, bands: int, chunk: int = 512):
        for a in range(r0, r1, chunk):
            b = min(a + chunk, r1)
            self._write_image_rows(dst, np.full((bands, b - a, dst.width), np.nan),
                                   np.zeros((b - a, dst.width), bool), a, nodata, use_mask)

    def _write_flow_rows(self, fdst, strip: Strip, row_abs: int) -> None:
        w = fdst.width
        h = strip.flow.shape[1]
        out = np.full((3, h, w), FLOW_NODATA, np.float32)
        sl = slice(int(self.win.col_off), int(self.win.col_off) + strip.flow.shape[2])
        v = strip.valid & np.isfinite(strip.flow).all(0)
        out[0, :, sl] = np.where(v, strip.flow[0], FLOW_NODATA)
        out[1, :, sl] = np.where(v, strip.flow[1], FLOW_NODATA)
        out[2, :, sl] = np.where(v, strip.certainty, FLOW_NODATA)
        fdst.write(out, window=Window(0, row_abs, w, h))

    def _blank_flow(self, fdst, r0: int, r1: int, chunk: int = 512) -> None:
        for a in range(r0, r1, chunk):
            b = min(a + chunk, r1)
            fdst.write(np.full((3, b - a, fdst.width), FLOW_NODATA, np.float32), window=Window(0, a, fdst.width, b - a))

    # -- the run ----------------------------------------------------------------------------------
    def execute(self) -> RegisterResult:
        opts, pair, win = self.opts, self.pair, self.win
        prof, nodata, use_mask = self._out_profile()
        nb = prof["count"]
        top, bottom = int(win.row_off), int(win.row_off + win.height)
        flow_ctx = None
        if opts.flow_out is not None:
            fprof = dict(driver="GTiff", width=pair.width, height=pair.height, count=3, dtype="float32",
                         crs=pair.ref.crs, transform=pair.ref.transform, nodata=FLOW_NODATA)
            flow_ctx = atomic_raster(opts.flow_out, fprof, cog=opts.cog, descriptions=FLOW_DESCRIPTIONS,
                                     units=("pixel", "pixel", "1"),
                                     tags={"SOMA_CONVENTION": FLOW_DESCRIPTIONS[0], "SOMA_METHOD": opts.method})
        dense = opts.mode == "dense"
        out_transform = None
        scratch_ctx = scratch_raster(Path(opts.out).parent, int(win.width), int(win.height), 3)
        scratch = scratch_ctx.__enter__()
        fdst = flow_ctx.__enter__() if flow_ctx else None
        try:
            if fdst is not None:
                self._blank_flow(fdst, 0, top)
            if dense:
                with atomic_raster(opts.out, prof, cog=opts.cog, tags={"SOMA_METHOD": opts.method}) as dst:
                    self._blank_rows(dst, 0, top, nodata, use_mask, nb)
                    for strip in self._final_strips(scratch):
                        row_abs = top + strip.row0
                        data, valid = self._warp_rows(strip.flow, row_abs)
                        self._write_image_rows(dst, data, valid, row_abs, nodata, use_mask)
                        if fdst is not None:
                            self._write_flow_rows(fdst, strip, row_abs)
                    self._blank_rows(dst, bottom, pair.height, nodata, use_mask, nb)
                affine, stats = self.samples.fit()
            else:
                for strip in self._final_strips(scratch):
                    if fdst is not None:
                        self._write_flow_rows(fdst, strip, top + strip.row0)
                affine, stats = self.samples.fit()
                out_transform = self._write_affine(affine, prof, nodata, use_mask)
            if fdst is not None:
                self._blank_flow(fdst, bottom, pair.height)
        except BaseException as exc:
            if flow_ctx:
                flow_ctx.__exit__(type(exc), exc, exc.__traceback__)
            scratch_ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        if flow_ctx:
            flow_ctx.__exit__(None, None, None)
        scratch_ctx.__exit__(None, None, None)
        x, y, dx, dy, cert = self.samples.arrays()
        mag = np.hypot(dx, dy)
        qa_summary = self._write_qa(affine) if self.qa else None
        return RegisterResult(
            out=str(opts.out), flow_out=str(opts.flow_out) if opts.flow_out else None,
            qa_out=str(opts.qa_out) if opts.qa_out else None, method=opts.method, mode=opts.mode,
            reference=opts.reference, tiles=len(self.tiles),
            window={"col_off": int(win.col_off), "row_off": int(win.row_off),
                    "width": int(win.width), "height": int(win.height)},
            median_flow=float(np.median(mag)) if mag.size else float("nan"),
            certainty_coverage=float(np.mean(cert > 0.5)) if cert.size else 0.0,
            affine=[[float(v) for v in row] for row in affine], affine_rmse=stats["rmse"],
            affine_inliers=stats["inliers"],
            repaired_share=self.repaired / max(self.valid_px, 1),
            output_transform=list(out_transform)[:6] if out_transform is not None else None,
            sar_scale=self.prep.sar_scale, qa=qa_summary,
        )

    def _write_affine(self, affine: np.ndarray, prof: dict, nodata, use_mask: bool):
        """Affine mode: same CRS -> the moving pixels unchanged under a corrected geotransform;
        otherwise resample the moving image with the fitted affine field."""
        pair, opts = self.pair, self.opts
        if pair.same_crs:
            mov = pair.mov_src
            new_t = coords.corrected_transform(pair.ref.transform, affine, mov.transform)
            mprof = dict(mov.profile)
            mprof.update(transform=new_t)
            with atomic_raster(opts.out, mprof, cog=opts.cog, tags={"SOMA_METHOD": opts.method}) as dst:
                for _, window in mov.block_windows(1):
                    dst.write(mov.read(window=window), window=window)
                    if nodata is None or use_mask:
                        m = mov.read_masks(1, window=window)
                        if (m == 0).any() or use_mask:
                            dst.write_mask(m, window=window)
            return new_t
        win = self.win
        top, bottom = int(win.row_off), int(win.row_off + win.height)
        nb = prof["count"]
        with atomic_raster(opts.out, prof, cog=opts.cog, tags={"SOMA_METHOD": opts.method}) as dst:
            self._blank_rows(dst, 0, top, nodata, use_mask, nb)
            for a in range(top, bottom, 512):
                b = min(a + 512, bottom)
                flow = coords.affine_to_flow_np(affine, b - a, int(win.width), col0=int(win.col_off), row0=a)
                data, valid = self._warp_rows(flow, a)
                self._write_image_rows(dst, data, valid, a, nodata, use_mask)
            self._blank_rows(dst, bottom, pair.height, nodata, use_mask, nb)
        return None

    def _write_qa(self, affine: np.ndarray) -> dict:
        from . import qa

        win, s = self.win, self.ov_step
        shape = (int(math.ceil(win.height / s)), int(math.ceil(win.width / s)))
        ref, rv = self.pair.read(win, True, out_shape=shape)
        mov, mv = self.pair.read(win, False, out_shape=shape)
        ref_g = np.where(rv, self.prep(ref, rv, self.pair.ref_is_optical), np.nan)
        mov_g = np.where(mv, self.prep(mov, mv, not self.pair.ref_is_optical), np.nan)
        flow = np.concatenate(self.ov_flow, axis=1)[:, :shape[0], :shape[1]]
        cert = np.concatenate(self.ov_cert, axis=0)[:shape[0], :shape[1]]
        if self.opts.mode == "affine":  # the field that was applied: the fitted affine
            yy, xx = np.meshgrid(win.row_off + s * np.arange(shape[0]), win.col_off + s * np.arange(shape[1]),
                                 indexing="ij")
            m = coords.to3x3(affine)
            flow = np.stack([m[0, 0] * xx + m[0, 1] * yy + m[0, 2] - xx, m[1, 0] * xx + m[1, 1] * yy + m[1, 2] - yy])
        after = coords.warp_np(np.nan_to_num(mov_g), np.nan_to_num(flow) / s, order=1, cval=np.nan)
        after = np.where(np.isfinite(flow).all(0), after, np.nan)
        overview = {"ref": ref_g.astype(np.float32), "mov_before": mov_g.astype(np.float32),
                    "mov_after": after.astype(np.float32), "flow": flow.astype(np.float32),
                    "certainty": cert.astype(np.float32), "scale": s}
        qa_dir = Path(self.opts.qa_out)
        qa_dir.mkdir(exist_ok=True)
        return qa.write_products(qa_dir, overview, self.tile_rows)
