"""The one orchestrator of ``soma register``.

    read and align inputs -> tile -> match -> stitch the flow -> repair -> warp and write -> QA
                                                                        -> tie points

Memory is bounded by a strip of rows (about two tiles high) times the scene width, whatever the
scene size: tiles are matched in row-major order and stitched into strips; the strips go to a
scratch file, are read back and repaired once the scene-wide fit is known, and are warped and
written at once.  The stages live in their modules (:mod:`~soma_cli.io.pair`, :mod:`~soma_cli.tiling`,
:mod:`~soma_cli.matchers`, :mod:`~soma_cli.stitch`, :mod:`~soma_cli.warp`, :mod:`~soma_cli.io.sinks`,
:mod:`~soma_cli.qa`); this module only wires them together.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import __version__, coords, preprocess, qa, tiling
from .errors import ConfigError, GeoreferenceError, OutputError
from .io.pair import AlignedPair, gdal_env, open_pair
from .io.sinks import CHUNK, FlowScratch, FlowSink, ImageSink, write_relocated, write_with_gcps
from .io.tiepoints import write_tiepoints
from .io.write import check_output
from .matchers import Matcher, get_matcher, trust_certainty
from .stitch import FlowPrior, FlowSamples, Strip, StripStitcher
from .tiepoints import TiePoints, TiePointSampler
from .warp import RowWarper

Progress = Callable[[int, int], None]


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
    tiepoints_out: Optional[Path] = None  # GeoPackage of tie points
    tiepoint_step: int = 64  # reference pixels between tie points (and GCPs before thinning)


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
    tiepoints_out: Optional[str] = None
    tiepoints: Optional[dict] = None  # {"points", "reliable", "gcps"} when tie points were sampled

    def to_dict(self) -> dict:
        return asdict(self)


def _validate(opts: RegisterOptions) -> None:
    if opts.reference not in ("opt", "sar"):
        raise ConfigError(f"--reference must be 'opt' or 'sar' (got {opts.reference!r})")
    if opts.mode not in ("dense", "affine", "gcps"):
        raise ConfigError(f"--mode must be 'dense', 'affine' or 'gcps' (got {opts.mode!r})")
    if opts.tiepoint_step < 1:
        raise ConfigError("--tiepoint-step must be at least 1")
    if opts.resampling not in coords.SPLINE_ORDERS:
        raise ConfigError(f"--resampling must be one of {', '.join(coords.SPLINE_ORDERS)}")
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
    if opts.tiepoints_out is not None:
        tp = Path(opts.tiepoints_out)
        if tp.suffix.lower() != ".gpkg":
            raise OutputError(f"--tiepoints-out is written as a GeoPackage: give it a .gpkg name (got {tp.name})")
        check_output(tp, opts.overwrite, inputs)
    if opts.qa_out is not None:
        q = Path(opts.qa_out)
        if not q.parent.is_dir():
            raise OutputError(f"QA folder's parent does not exist: {q.parent}")
        if q.exists() and not q.is_dir():
            raise OutputError(f"--qa-out is not a directory: {q}")
        if q.is_dir() and any(q.iterdir()) and not opts.overwrite:
            raise OutputError(f"QA folder is not empty: {q} (use --overwrite to replace its files)")


def register(opts: RegisterOptions, progress: Optional[Progress] = None,
             matcher: Optional[Matcher] = None) -> RegisterResult:
    """Co-register ``opts.sar`` and ``opts.opt``; write the aligned image (and flow, QA).

    ``matcher`` replaces the one ``opts`` names (built with ``opts.threads`` and the other
    matcher options by :func:`~soma_cli.matchers.get_matcher`)."""
    t0 = time.perf_counter()
    _validate(opts)
    with gdal_env(), open_pair(opts.sar, opts.opt, opts.reference, opts.bands, opts.sar_band,
                               opts.resampling) as pair:
        if matcher is None:
            matcher = get_matcher(opts.method, weights=opts.weights, device=opts.device,
                                  batch_size=opts.batch_size, threads=opts.threads)
        result = _register_pair(opts, pair, matcher, progress)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def scene_sar_scale(pair: AlignedPair, sar_scale: str) -> str:
    """``sar_scale``, with ``auto`` decided once for the scene from a preview of the SAR band."""
    if sar_scale != "auto":
        return sar_scale
    data, valid = pair.read_preview(not pair.ref_is_optical)
    return preprocess.detect_sar_kind(data[0][valid], pair.sar_is_float)


class _TileMatcher:
    """Reads, prepares and matches batches of tiles of the overlap window; the flow and certainty
    come out on the reference grid.  With ``tile_rows`` (a list), each tile's QA scores go there."""

    def __init__(self, pair: AlignedPair, matcher: Matcher, sar_scale: str, tile_rows: Optional[list]):
        self.pair, self.matcher, self.sar_scale, self.tile_rows = pair, matcher, sar_scale, tile_rows

    def __call__(self, batch: List[tiling.Tile]):
        ref_is_opt = self.pair.ref_is_optical
        refs, movs, rvs, mvs = [], [], [], []
        for t in batch:
            rd, rv = self.pair.read_tile(t, True)
            md, mv = self.pair.read_tile(t, False)
            refs.append(preprocess.prepare(rd, rv, ref_is_opt, self.sar_scale))
            movs.append(preprocess.prepare(md, mv, not ref_is_opt, self.sar_scale))
            rvs.append(rv)
            mvs.append(mv)
        ref, mov, rv, mv = (np.stack(a) for a in (refs, movs, rvs, mvs))
        if ref_is_opt:
            flow, cert = self.matcher.match(ref, mov, rv, mv)
        else:  # matchers work on the optical grid: match there, then carry the match onto the SAR grid
            flow_o, cert_o = self.matcher.match(mov, ref, mv, rv)
            flow, cert = (np.stack(a) for a in zip(*(coords.invert_match_np(f, c) for f, c in zip(flow_o, cert_o))))
        flow = np.asarray(flow, np.float32)
        cert = np.clip(np.asarray(cert, np.float32), 0.0, 1.0) * rv
        if self.tile_rows is not None:
            self._score(batch, ref, mov, rv, mv, flow, cert)
        return flow, cert, rv

    def _score(self, batch, ref, mov, rv, mv, flow, cert) -> None:
        area = self.pair.area
        for i, t in enumerate(batch):
            after = coords.warp_np(mov[i], flow[i], order=1, cval=np.nan)
            before = np.where(mv[i], mov[i], np.nan)
            scores = qa.tile_scores(np.where(rv[i], ref[i], np.nan), before, after, flow[i], cert[i], rv[i])
            self.tile_rows.append({"row_off": area.row + t.row, "col_off": area.col + t.col,
                                   "height": t.height, "width": t.width, **scores})


def _stitched_strips(tiles: List[tiling.Tile], match: _TileMatcher, area: tiling.Tile, overlap: int,
                     batch_size: int, progress: Optional[Progress]) -> Iterator[Strip]:
    """Match the tiles row by row in batches; yield the finished strips of the window, in order."""
    stitcher = StripStitcher(area.height, area.width, overlap)
    rows = list(tiling.rows_of(tiles))
    done, total = 0, len(tiles)
    for i, trow in enumerate(rows):
        for j in range(0, len(trow), batch_size):
            batch = trow[j:j + batch_size]
            flow, cert, rv = match(batch)
            for k, t in enumerate(batch):
                stitcher.add(t, flow[k], cert[k], rv[k])
            done += len(batch)
            if progress:
                progress(done, total)
        yield from stitcher.flush(rows[i + 1][0].row if i + 1 < len(rows) else area.height)
    yield from stitcher.finish()


@dataclass
class _FieldLog:
    """What the final strips leave behind: samples for the fit and the summary, the repair count,
    and the QA overview."""

    samples: FlowSamples = field(default_factory=FlowSamples)
    overview: Optional[qa.FlowOverview] = None
    tiepoints: Optional[TiePointSampler] = None
    repaired: int = 0
    valid_px: int = 0


def _final_strips(strips: Iterator[Strip], scratch: FlowScratch, area: tiling.Tile, repair: bool,
                  trust: float, log: _FieldLog) -> Iterator[Strip]:
    """Pass 1: the stitched strips go to ``scratch`` and are sampled for the scene prior.
    Pass 2: read back, outliers repaired towards the prior, logged and yielded."""
    raw = FlowSamples()
    for strip in strips:
        scratch.write(strip)
        raw.add(strip, area.row, area.col)
    prior = None
    if repair:
        affine, _ = raw.fit()
        prior = FlowPrior(*raw.arrays(), affine, area.height, area.width, area.row, area.col)
    for strip in scratch.strips():
        valid = strip.valid
        if prior is not None:
            before = strip.certainty
            strip = prior.repair(strip, area.row + strip.row0, area.col, trust_cert=trust)
            log.repaired += int(np.count_nonzero(valid & (strip.certainty < before)))
        log.valid_px += int(np.count_nonzero(valid))
        log.samples.add(strip, area.row, area.col)
        if log.overview is not None:
            log.overview.add(strip)
        if log.tiepoints is not None:
            log.tiepoints.add(strip)
        yield strip


def _register_pair(opts: RegisterOptions, pair: AlignedPair, matcher: Matcher,
                   progress: Optional[Progress]) -> RegisterResult:
    area = pair.area
    if opts.mode == "gcps" and pair.mov_src.crs is None:
        raise GeoreferenceError("--mode gcps needs a moving raster with a CRS and a geotransform "
                                "(not ground control points only, nor a plain image)")
    sar_scale = scene_sar_scale(pair, opts.sar_scale)
    tiles = tiling.layout(area.height, area.width, opts.tile_size, opts.overlap)
    tile_rows: Optional[list] = [] if opts.qa_out is not None else None
    log = _FieldLog(overview=qa.FlowOverview(area.height, area.width, tile_rows, (area.row, area.col))
                    if opts.qa_out is not None else None)
    if opts.tiepoints_out is not None or opts.mode == "gcps":
        log.tiepoints = TiePointSampler(opts.tiepoint_step, area)
    match = _TileMatcher(pair, matcher, sar_scale, tile_rows)
    warper = RowWarper(pair.read_moving_block, pair.moving_count, pair.height, pair.width, area.col,
                       coords.SPLINE_ORDERS[opts.resampling])
    tags = {"SOMA_METHOD": opts.method}
    out_transform = None
    with ExitStack() as stack:
        scratch = stack.enter_context(FlowScratch(Path(opts.out).parent, area.height, area.width))
        flow_sink = None
        if opts.flow_out is not None:
            flow_sink = stack.enter_context(FlowSink(pair, opts.flow_out, cog=opts.cog, tags=tags))
        strips = _final_strips(_stitched_strips(tiles, match, area, opts.overlap, opts.batch_size, progress),
                               scratch, area, opts.repair, trust_certainty(matcher), log)
        if opts.mode == "dense":
            with ImageSink(pair, opts.out, cog=opts.cog, tags=tags) as sink:
                for strip in strips:
                    row_abs = area.row + strip.row0
                    sink.write(*warper(strip.flow, row_abs), row_abs)
                    if flow_sink is not None:
                        flow_sink.write(strip, row_abs)
            affine, stats = log.samples.fit()
        else:
            for strip in strips:
                if flow_sink is not None:
                    flow_sink.write(strip, area.row + strip.row0)
            affine, stats = log.samples.fit()
            if opts.mode == "affine":
                out_transform = _write_affine(opts, pair, affine, warper, tags)
        # before the flow sink closes: a failure here leaves no displacement raster behind
        tie_summary = _write_tiepoints(opts, pair, log.tiepoints.table(pair.ref.transform), tags) \
            if log.tiepoints is not None else None
    _, _, dx, dy, cert = log.samples.arrays()
    mag = np.hypot(dx, dy)
    return RegisterResult(
        out=str(opts.out), flow_out=str(opts.flow_out) if opts.flow_out else None,
        qa_out=str(opts.qa_out) if opts.qa_out else None, method=opts.method, mode=opts.mode,
        reference=opts.reference, tiles=len(tiles),
        window={"col_off": area.col, "row_off": area.row, "width": area.width, "height": area.height},
        median_flow=float(np.median(mag)) if mag.size else float("nan"),
        certainty_coverage=float(np.mean(cert > 0.5)) if cert.size else 0.0,
        affine=[[float(v) for v in row] for row in affine], affine_rmse=stats["rmse"],
        affine_inliers=stats["inliers"],
        repaired_share=log.repaired / max(log.valid_px, 1),
        output_transform=list(out_transform)[:6] if out_transform is not None else None,
        sar_scale=sar_scale,
        qa=_write_qa(opts, pair, matcher, sar_scale, log.overview, affine, tile_rows) if opts.qa_out is not None
        else None,
        tiepoints_out=str(opts.tiepoints_out) if opts.tiepoints_out else None, tiepoints=tie_summary,
    )


def _write_tiepoints(opts: RegisterOptions, pair: AlignedPair, points: TiePoints, tags: dict) -> dict:
    """GCP mode's output image (from the reliable tie points) and the tie point GeoPackage."""
    gcps = None
    if opts.mode == "gcps":
        gcps = write_with_gcps(pair, opts.out, points.take(points.gcp_indices()), cog=opts.cog, tags=tags)
    if opts.tiepoints_out is not None:
        write_tiepoints(opts.tiepoints_out, points, pair.ref.crs)
    return {"points": len(points), "reliable": int(np.count_nonzero(points.reliable)), "gcps": gcps}


def _write_affine(opts: RegisterOptions, pair: AlignedPair, affine: np.ndarray, warper: RowWarper, tags: dict):
    """Affine mode: same CRS -> the moving pixels unchanged under a corrected geotransform (returned);
    otherwise the moving image resampled with the fitted affine field (``None``)."""
    if pair.same_crs:
        return write_relocated(pair, opts.out, affine, cog=opts.cog, tags=tags)
    area = pair.area
    with ImageSink(pair, opts.out, cog=opts.cog, tags=tags) as sink:
        for a in range(area.row, area.row + area.height, CHUNK):
            h = min(CHUNK, area.row + area.height - a)
            sink.write(*warper(coords.affine_to_flow_np(affine, h, area.width, col0=area.col, row0=a), a), a)
    return None


def _run_meta(opts: RegisterOptions, pair: AlignedPair, matcher: Matcher, sar_scale: str) -> dict:
    """What the QA summary records of the run: inputs, outputs, method, versions, date, settings."""
    weights = None
    if opts.method == "soma":
        from .model.loader import default_weights_path

        meta = getattr(matcher, "metadata", {}) or {}
        weights = {"file": Path(opts.weights or default_weights_path()).name, "sha256": meta.get("sha256"),
                   "version": meta.get("version")}
    return {
        "inputs": {"sar": str(opts.sar), "opt": str(opts.opt)},
        "outputs": {"image": str(opts.out), "flow": str(opts.flow_out) if opts.flow_out else None,
                    "tiepoints": str(opts.tiepoints_out) if opts.tiepoints_out else None},
        "method": opts.method, "mode": opts.mode, "reference": opts.reference,
        "soma_version": __version__, "weights": weights,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"tile_size": opts.tile_size, "overlap": opts.overlap, "bands": list(pair.optical_bands),
                     "sar_band": opts.sar_band, "sar_scale": opts.sar_scale, "sar_scale_used": sar_scale,
                     "resampling": opts.resampling, "repair": opts.repair, "device": opts.device},
    }


def _qa_crop(opts: RegisterOptions, pair: AlignedPair, sar_scale: str, overview: qa.FlowOverview,
             affine: np.ndarray) -> dict:
    """The overview's full-resolution region for the QA alignment picture: reference, moving before
    and after the flow that was applied (read with a margin the flow can reach, prepared as the
    matcher saw them), that flow and the certainty."""
    area, (r, c, h, w) = pair.area, overview.region
    flow, cert = overview.region_arrays()
    if opts.mode == "affine":
        yy, xx = np.mgrid[area.row + r:area.row + r + h, area.col + c:area.col + c + w]
        flow = np.stack(coords.affine_flow_points_np(affine, xx, yy)).astype(np.float32)
    m = int(np.ceil(np.nanmax(np.abs(flow), initial=0.0))) + 2
    r0, c0 = max(0, r - m), max(0, c - m)
    ref, rv = pair.read_tile(tiling.Tile(r, c, h, w), True)
    mov, mv = pair.read_tile(tiling.Tile(r0, c0, min(area.height, r + h + m) - r0, min(area.width, c + w + m) - c0),
                             False)
    ref = np.where(rv, preprocess.prepare(ref, rv, pair.ref_is_optical, sar_scale), np.nan)
    mov = np.where(mv, preprocess.prepare(mov, mv, not pair.ref_is_optical, sar_scale), np.nan)
    shift = np.array([c - c0, r - r0], np.float32)[:, None, None]
    return {"ref": ref, "mov_before": mov[r - r0:r - r0 + h, c - c0:c - c0 + w],
            "mov_after": coords.warp_np(mov, np.nan_to_num(flow) + shift, order=1, cval=np.nan),
            "flow": flow, "certainty": cert, "origin": (area.row + r, area.col + c)}


def _write_qa(opts: RegisterOptions, pair: AlignedPair, matcher: Matcher, sar_scale: str,
              overview: qa.FlowOverview, affine: np.ndarray, tile_rows: list) -> dict:
    """The QA folder, from an overview of both images and of the flow that was applied."""
    s, shape, area = overview.step, overview.shape, pair.area
    ref, rv = pair.read_overview(True, shape)
    mov, mv = pair.read_overview(False, shape)
    ref_g = np.where(rv, preprocess.prepare(ref, rv, pair.ref_is_optical, sar_scale), np.nan)
    mov_g = np.where(mv, preprocess.prepare(mov, mv, not pair.ref_is_optical, sar_scale), np.nan)
    flow, cert = overview.arrays()
    if opts.mode == "affine":  # the field that was applied: the fitted affine
        yy, xx = np.meshgrid(area.row + coords.stride_offsets(0, area.height, s),
                             area.col + coords.stride_offsets(0, area.width, s), indexing="ij")
        flow = np.stack(coords.affine_flow_points_np(affine, xx, yy))
    after = coords.warp_np(np.nan_to_num(mov_g), coords.flow_to_stride_np(np.nan_to_num(flow), s), order=1,
                           cval=np.nan)
    after = np.where(np.isfinite(flow).all(0), after, np.nan)
    products = {"ref": ref_g.astype(np.float32), "mov_before": mov_g.astype(np.float32),
                "mov_after": after.astype(np.float32), "flow": flow.astype(np.float32),
                "certainty": cert.astype(np.float32), "scale": s, "origin": (area.row, area.col)}
    qa_dir = Path(opts.qa_out)
    qa_dir.mkdir(exist_ok=True)
    return qa.write_products(qa_dir, products, tile_rows, meta=_run_meta(opts, pair, matcher, sar_scale),
                             crop=_qa_crop(opts, pair, sar_scale, overview, affine))
