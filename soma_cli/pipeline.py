"""The one orchestrator of ``soma register``.

    read and align inputs -> tile -> (scene rotation) -> match -> stitch the flow -> repair -> judge
        -> warp and write -> QA, tie points

Memory is bounded by a strip of rows (about two tiles high) times the scene width, whatever the
scene size: on a large layout the matcher first finds the scene's rotation on a few seed tiles
(:mod:`~soma_cli.scene_rotation`), then tiles are matched in row-major order (each recording its
evidence and, with the check, its estimated error, :mod:`~soma_cli.check`) and stitched into
strips; the strips go to a scratch file.  Once the scene-wide fit of the trusted tiles is known,
they are read back, repaired and written back in place while the applied field is measured (its
overview and the edge similarity it gives, for the verdict); then the scratch file is read once
more to warp and write the field, or, when the verdict is failed, the moving image unmoved.
Tiles are read ahead (beside a CPU matcher at the lowest priority), and strips warped ahead, in
background threads (:func:`soma_cli.cpu.io_threads`).  The stages live in their modules (:mod:`~soma_cli.io.pair`,
:mod:`~soma_cli.tiling`, :mod:`~soma_cli.matchers`, :mod:`~soma_cli.check`,
:mod:`~soma_cli.stitch`, :mod:`~soma_cli.warp`, :mod:`~soma_cli.io.sinks`,
:mod:`~soma_cli.register_qa`, :mod:`~soma_cli.verdict`); this module only wires them together.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import numpy as np

from . import check, coords, cpu, preprocess, qa, register_qa, scene_rotation, tiling
from .errors import ConfigError, GeoreferenceError, InputError, OutputError, RegistrationFailed
from .interrupt import HELPER_THREADS
from .io.pair import AlignedPair, gdal_env, open_pair
from .io.sinks import FlowScratch, FlowSink, ImageSink, strip_rows, write_relocated, write_with_gcps
from .io.tiepoints import write_tiepoints
from .io.write import check_output
from .matchers import (Matcher, evidence_certainty, get_matcher, min_size, rotation_searcher,
                       searching_rotation, sharing_cores, trust_certainty)
from .stitch import FlowPrior, FlowSamples, Strip, StripStitcher
from .tiepoints import TiePoints, TiePointSampler
from .verdict import TileEvidence, coverage, judge
from .warp import RowWarper

Progress = Callable[[int, int], None]
T = TypeVar("T")
R = TypeVar("R")
_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
#: Tiles read ahead beside a CPU matcher: its reader, at the lowest priority, reads in the moments
#: torch's threads leave a core idle, so it is given several tiles' network time to read one (on a
#: whole Sentinel-2 tile 5 min 18 s and 1.63 GB peak with 4, 5 min 46 s and 1.70 GB with 1).
CPU_READ_AHEAD = 4
_NO_FIT = {"rmse": float("nan"), "inliers": 0.0, "n": 0}


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
    tile_size: Optional[int] = None  # None: tiling.choose_size for the overlap window
    overlap: int = tiling.DEFAULT_OVERLAP
    batch_size: int = 4
    device: str = "auto"
    threads: Optional[int] = None
    io_threads: Optional[int] = None  # reading and warping threads beside the matcher; None: cpu.io_threads()
    bands: Optional[Tuple[int, ...]] = None
    sar_band: int = 1
    sar_scale: str = "auto"
    resampling: str = "bilinear"
    weights: Optional[Path] = None
    overwrite: bool = False
    cog: bool = False
    repair: bool = True  # blend low-certainty outliers towards a smooth certainty-weighted prior
    strict: bool = False  # a failed verdict raises RegistrationFailed (exit code 3); the outputs are written
    force: bool = False  # apply a registration whose verdict is failed (when there is evidence to apply)
    tiepoints_out: Optional[Path] = None  # GeoPackage of tie points
    tiepoint_step: int = 64  # reference pixels between tie points (and GCPs before thinning)
    check: bool = False  # estimate the error of every tile (soma_cli.check: one more matcher pass)


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
    tile_size: int
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
    evidence_certainty: float = 0.5
    verdict: Dict[str, object] = field(default_factory=dict)
    check: Optional[dict] = None  # the estimated error over the trusted tiles (check.summary), with --check
    scene_rotation: Optional[float] = None  # degrees, the one rotation every tile searched (None: all)

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
    if opts.io_threads is not None and opts.io_threads < 0:
        raise ConfigError("--io-threads must be 0 or more")
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
    matcher options by :func:`~soma_cli.matchers.get_matcher`).  The result carries the verdict
    (:mod:`soma_cli.verdict`); a failed registration leaves the moving image where it was (unless
    ``opts.force``) and, with ``opts.strict``, raises :class:`~soma_cli.errors.RegistrationFailed`
    after writing."""
    t0 = time.perf_counter()
    _validate(opts)
    with gdal_env(), open_pair(opts.sar, opts.opt, opts.reference, opts.bands, opts.sar_band,
                               opts.resampling) as pair:
        if matcher is None:
            matcher = get_matcher(opts.method, weights=opts.weights, device=opts.device,
                                  batch_size=opts.batch_size, threads=opts.threads)
        result = _register_pair(opts, pair, matcher, progress)
    result.seconds = round(time.perf_counter() - t0, 3)
    if opts.strict and result.verdict["status"] == "failed":
        raise RegistrationFailed(f"registration failed: {result.verdict['reason']} (--strict)", result)
    return result


def scene_sar_scale(pair: AlignedPair, sar_scale: str) -> str:
    """``sar_scale``, with ``auto`` decided once for the scene from a preview of the SAR band."""
    if sar_scale != "auto":
        return sar_scale
    data, valid = pair.read_preview(not pair.ref_is_optical)
    return preprocess.detect_sar_kind(data[0][valid], pair.sar_is_float)


def _check_size(area: tiling.Tile, matcher: Matcher) -> None:
    need = min_size(matcher)
    if min(area.height, area.width) < need:
        raise InputError(f"the overlap is {area.width} x {area.height} px; --method {matcher.name} needs at least "
                         f"{need} px on each side")


class _TileMatcher:
    """Reads, prepares and matches batches of tiles of the overlap window; the flow and certainty
    come out on the reference grid, the certainty of tiles without evidence discarded
    (``evidence``), and with ``check`` the estimated error (:mod:`soma_cli.check`; else None).
    With ``tile_rows`` (a list), each tile's QA scores go there."""

    def __init__(self, pair: AlignedPair, matcher: Matcher, sar_scale: str, evidence: TileEvidence,
                 tile_rows: Optional[list], check: bool):
        self.pair, self.matcher, self.sar_scale = pair, matcher, sar_scale
        self.evidence, self.tile_rows, self.check = evidence, tile_rows, check

    def _match(self, opt, sar, ov, sv):
        """Flow, certainty and estimated error (None without the check), on the optical grid."""
        if self.check:
            return check.checked_match(self.matcher, opt, sar, ov, sv)
        return (*self.matcher.match(opt, sar, ov, sv), None)

    def optical_first(self, tiles: Tuple[np.ndarray, ...]) -> Tuple[np.ndarray, ...]:
        """:meth:`read`'s ``(reference, moving, their masks)`` as matchers take them: optical,
        SAR, optical mask, SAR mask."""
        ref, mov, rv, mv = tiles
        return tiles if self.pair.ref_is_optical else (mov, ref, mv, rv)

    def read(self, batch: List[tiling.Tile]) -> Tuple[np.ndarray, ...]:
        """The prepared tiles of ``batch``: reference, moving, and their valid masks, each
        ``(B, h, w)`` (safe to call from a reading thread while :meth:`__call__` matches)."""
        ref_is_opt = self.pair.ref_is_optical
        refs, movs, rvs, mvs = [], [], [], []
        for t in batch:
            rd, rv = self.pair.read_tile(t, True)
            md, mv = self.pair.read_tile(t, False)
            refs.append(preprocess.prepare(rd, rv, ref_is_opt, self.sar_scale))
            movs.append(preprocess.prepare(md, mv, not ref_is_opt, self.sar_scale))
            rvs.append(rv)
            mvs.append(mv)
        return tuple(np.stack(a) for a in (refs, movs, rvs, mvs))

    def matched(self, batch: List[tiling.Tile], tiles: Optional[Tuple[np.ndarray, ...]] = None
                ) -> Tuple[Tuple[np.ndarray, ...], Tuple]:
        """Match ``batch``, whose :meth:`read` is ``tiles`` (read here when None): ``(tiles, (flow,
        certainty, estimated error))`` on the reference grid, for :meth:`record` (safe to call from
        several threads)."""
        tiles = self.read(batch) if tiles is None else tiles
        flow, cert, err = self._match(*self.optical_first(tiles))
        if not self.pair.ref_is_optical:  # matchers work on the optical grid: carry the match onto the SAR grid
            maps = [coords.invert_match_np(f, c, *([] if err is None else [err[i]]))
                    for i, (f, c) in enumerate(zip(flow, cert))]
            flow, cert = np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps])
            err = None if err is None else np.stack([m[2] for m in maps])
        return tiles, (flow, cert, err)

    def record(self, batch: List[tiling.Tile], tiles: Tuple[np.ndarray, ...], match: Tuple):
        """Record the :meth:`matched` ``match`` of ``batch`` (in layout order): flow, certainty
        (without the tiles that lack evidence), reference valid mask and estimated error (None
        without the check)."""
        ref, mov, rv, mv = tiles
        flow, cert, err = match
        flow = np.asarray(flow, np.float32)
        cert = np.clip(np.asarray(cert, np.float32), 0.0, 1.0) * rv
        cert = np.stack([self.evidence.record(t, c, r & m) for t, c, r, m in zip(batch, cert, rv, mv)])
        if err is not None:
            err = np.where(rv, err, np.nan).astype(np.float32)
        if self.tile_rows is not None:
            self._score(batch, ref, mov, rv, mv, flow, cert, err)
        return flow, cert, rv, err

    def _score(self, batch, ref, mov, rv, mv, flow, cert, err) -> None:
        area = self.pair.area
        first = len(self.evidence.coverage) - len(batch)
        for i, t in enumerate(batch):
            after = coords.warp_np(mov[i], flow[i], order=1, cval=np.nan)
            before = np.where(mv[i], mov[i], np.nan)
            scores = qa.tile_scores(np.where(rv[i], ref[i], np.nan), before, after, flow[i], cert[i], rv[i])
            self.tile_rows.append({"row_off": area.row + t.row, "col_off": area.col + t.col,
                                   "height": t.height, "width": t.width, **scores,
                                   "coverage": self.evidence.coverage[first + i],
                                   **({} if err is None else {"est_error": check.tile_error(err[i])})})


def _scene_rotation(tiles: List[tiling.Tile], match: _TileMatcher) -> Optional[float]:
    """The rotation (degrees) the matcher's global stage picks on most seed tiles
    (:mod:`soma_cli.scene_rotation`), or None: a small layout, a matcher without such a stage, or
    seeds that disagree."""
    searcher = rotation_searcher(match.matcher)
    if searcher is None or len(tiles) < scene_rotation.MIN_TILES:
        return None
    tiles = match.read(scene_rotation.seeds(tiles))
    both_valid = (tiles[2] & tiles[3]).mean(axis=(1, 2))
    return scene_rotation.agreed(searcher.seed_rotations(*match.optical_first(tiles)), both_valid)


def _ahead(items: Iterable[T], load: Callable[[T], R], threads: int,
           initializer: Optional[Callable[[], None]] = None, depth: int = 0) -> Iterator[Tuple[T, R]]:
    """``(item, load(item))`` in order, with up to ``depth`` items (at least ``threads``) loaded
    ahead in ``threads`` background threads (each started by ``initializer``) while the caller
    works on the current one (no threads: loaded in turn)."""
    if threads < 1:
        for item in items:
            yield item, load(item)
        return
    depth = max(depth, threads)
    pool = ThreadPoolExecutor(threads, thread_name_prefix=HELPER_THREADS, initializer=initializer)
    pending: Deque = deque()
    try:
        for item in items:
            pending.append((item, pool.submit(load, item)))
            if len(pending) > depth:
                first, fut = pending.popleft()
                yield first, fut.result()
        while pending:
            first, fut = pending.popleft()
            yield first, fut.result()
    finally:
        # stopped early (an error, an interrupt), what has not started is not loaded, and what is
        # loading is not waited for (a tile in the network takes seconds; see soma_cli.interrupt)
        pool.shutdown(wait=not pending, cancel_futures=True)


def _stitched_strips(tiles: List[tiling.Tile], match: _TileMatcher, area: tiling.Tile, overlap: int,
                     batch_size: int, io_threads: int, progress: Optional[Progress],
                     on_gpu: bool) -> Iterator[Strip]:
    """Match the tiles row by row in batches and yield the finished strips of the window, in
    order.  On a GPU the next batches are read meanwhile in ``io_threads`` threads.  A CPU
    matcher takes one tile at a time: as many tiles as it can match at once
    (:func:`~soma_cli.matchers.sharing_cores`: two tiles of one thread each on two cores, with
    no OpenMP team waiting at every operation) are read and matched together in as many threads
    while this thread records and stitches the previous ones in layout order; a matcher that
    takes one tile at a time has the next tiles read meanwhile in ``io_threads`` threads at the
    lowest priority (:func:`soma_cli.cpu.background_priority`), :data:`CPU_READ_AHEAD` tiles ahead."""
    stitcher = StripStitcher(area.height, area.width, overlap, errors=match.check, strip_rows=strip_rows(area.width))
    batch_size = batch_size if on_gpu else 1
    rows = list(tiling.rows_of(tiles))
    batches = [(i, trow[j:j + batch_size]) for i, trow in enumerate(rows) for j in range(0, len(trow), batch_size)]
    done, total = 0, len(tiles)
    with sharing_cores(match.matcher) as lanes:
        if lanes > 1:
            matched = _ahead(batches, lambda b: match.matched(b[1]), lanes)
        else:
            read = _ahead(batches, lambda b: match.read(b[1]), io_threads,
                          None if on_gpu else cpu.background_priority, 0 if on_gpu else CPU_READ_AHEAD)
            matched = ((b, match.matched(b[1], t)) for b, t in read)
        for n, ((i, batch), (inputs, result)) in enumerate(matched):
            flow, cert, rv, err = match.record(batch, inputs, result)
            for k, t in enumerate(batch):
                stitcher.add(t, flow[k], cert[k], rv[k], None if err is None else err[k])
            done += len(batch)
            if progress:
                progress(done, total)
            if n + 1 == len(batches) or batches[n + 1][0] != i:  # the last batch of tile row i
                yield from stitcher.flush(rows[i + 1][0].row if i + 1 < len(rows) else area.height)
    yield from stitcher.finish()


class _SceneField:
    """The flow a registration applies, read back strip by strip from the scratch file: the
    stitched flow with its pixels without evidence, and with ``repair`` its outliers, blended
    towards the scene prior; the prior is fitted to the trusted tiles only (``raw``: the samples
    of the stitched flow).  ``prior`` is None when no trusted sample can carry a fit: there is
    nothing to apply then, and :meth:`unmoved` is the field."""

    def __init__(self, raw: FlowSamples, area: tiling.Tile, repair: bool, trust: float):
        self.area, self.repair, self.trust = area, repair, trust
        self.prior = None
        if np.count_nonzero(raw.trusted_mask()) >= 6:
            affine, _ = raw.fit()
            self.prior = FlowPrior(*raw.arrays(), affine, area.height, area.width, area.row, area.col)

    def apply(self, scratch: FlowScratch) -> Iterator[Tuple[Strip, int]]:
        """``(strip, pixels repaired)``, top to bottom; each repaired strip replaces the stitched
        one in ``scratch``, which then holds the field to apply (float32 both ways: exact)."""
        area = self.area
        for strip in scratch.strips():
            if self.repair:
                out = self.prior.repair(strip, area.row + strip.row0, area.col, trust_cert=self.trust)
                n = int(np.count_nonzero(strip.valid & (out.certainty < strip.certainty)))
            else:
                out, n = self.prior.fill(strip, area.row + strip.row0, area.col), 0
            scratch.write(out)
            yield out, n

    @staticmethod
    def unmoved(scratch: FlowScratch) -> Iterator[Tuple[Strip, int]]:
        """Flow 0 and certainty 0 wherever there was an estimate: the moving image stays as it is."""
        for strip in scratch.strips():
            zero = np.zeros_like(strip.certainty)
            yield Strip(strip.row0, np.where(strip.valid, zero, np.nan)[None].repeat(2, 0), zero, strip.valid), 0


@dataclass
class _FieldLog:
    """What a pass over the field leaves behind: samples for the fit, the repair count and the
    overview."""

    overview: qa.FlowOverview
    trusted_rows: Callable[[int, int], np.ndarray]
    samples: FlowSamples = field(default_factory=FlowSamples)
    repaired: int = 0
    valid_px: int = 0

    def add(self, strip: Strip, repaired: int, area: tiling.Tile) -> None:
        self.repaired += repaired
        self.valid_px += int(np.count_nonzero(strip.valid))
        self.samples.add(strip, area.row, area.col, self.trusted_rows(strip.row0, strip.flow.shape[1]))
        self.overview.add(strip)


def _register_pair(opts: RegisterOptions, pair: AlignedPair, matcher: Matcher,
                   progress: Optional[Progress]) -> RegisterResult:
    area = pair.area
    if opts.mode == "gcps" and pair.mov_src.crs is None:
        raise GeoreferenceError("--mode gcps needs a moving raster with a CRS and a geotransform "
                                "(not ground control points only, nor a plain image)")
    _check_size(area, matcher)
    sar_scale = scene_sar_scale(pair, opts.sar_scale)
    if opts.tile_size is None:
        opts = replace(opts, tile_size=tiling.choose_size(area.height, area.width, opts.overlap))
    tiles = tiling.layout(area.height, area.width, opts.tile_size, opts.overlap)
    level = evidence_certainty(matcher)
    evidence = TileEvidence(area.height, area.width, level)
    tile_rows: Optional[list] = [] if opts.qa_out is not None else None
    match = _TileMatcher(pair, matcher, sar_scale, evidence, tile_rows, opts.check)
    warper = RowWarper(pair.read_moving_block, pair.moving_count, pair.height, pair.width, area.col,
                       coords.SPLINE_ORDERS[opts.resampling])
    tags = {"SOMA_METHOD": opts.method}
    out_transform = None
    on_gpu = getattr(getattr(matcher, "device", None), "type", "cpu") == "cuda"
    read_ahead, warp_ahead = cpu.io_threads(on_gpu) if opts.io_threads is None else (opts.io_threads,) * 2

    def measure(strips: Iterator[Tuple[Strip, int]]) -> _FieldLog:
        log = _FieldLog(qa.FlowOverview(area.height, area.width, tile_rows, (area.row, area.col)),
                        evidence.trusted_rows)
        for strip, repaired in strips:
            log.add(strip, repaired, area)
        return log

    with ExitStack() as stack:
        scratch = stack.enter_context(FlowScratch(Path(opts.out).parent, area.height, area.width, opts.check))
        raw = FlowSamples()
        rotation = _scene_rotation(tiles, match)
        with searching_rotation(matcher, rotation):
            for strip in _stitched_strips(tiles, match, area, opts.overlap, opts.batch_size, read_ahead, progress,
                                          on_gpu):
                scratch.write(strip)
                raw.add(strip, area.row, area.col, evidence.trusted_rows(strip.row0, strip.flow.shape[1]))
        cpu.release_heap()  # what the matcher kept for its next tile (cpu.tune_allocator)
        # both images on the overview grid, read in a thread while the field is repaired
        images = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix=HELPER_THREADS)).submit(
            register_qa.overview_images, pair, sar_scale, qa.overview_grid(area.height, area.width)[1])
        scene = _SceneField(raw, area, opts.repair, trust_certainty(matcher))
        # measure the field before writing it, so that a failed registration is never written
        log = measure(scene.apply(scratch) if scene.prior is not None else scene.unmoved(scratch))
        affine, stats = log.samples.fit() if scene.prior is not None else (_IDENTITY, _NO_FIT)
        products = register_qa.overview_products(images.result(), area, log.overview,
                                                 affine if opts.mode == "affine" else None)
        checked = check.summary(raw.errors()[raw.trusted_mask()]) if opts.check else None
        verdict = judge(coverage(raw.certainties(), level), *qa.scene_similarity(products),
                        log.repaired / max(log.valid_px, 1),
                        # no trusted sample to fit: no tile counts as having evidence
                        evidence.coverage if scene.prior is not None else [0.0] * len(evidence.coverage),
                        evidence.pixels, checked)
        apply = verdict["status"] != "failed" or (opts.force and scene.prior is not None)
        if verdict["status"] == "failed":
            if apply:
                verdict["reason"] += "; applied anyway (--force)"
            elif scene.prior is not None:  # what is written and shown: the moving image unmoved
                log, affine, stats = measure(scene.unmoved(scratch)), _IDENTITY, _NO_FIT
                products = register_qa.overview_products(images.result(), area, log.overview, None)
        tiepoints = TiePointSampler(opts.tiepoint_step, area, level) if opts.tiepoints_out is not None or opts.mode == "gcps" \
            else None
        flow_sink = None
        if opts.flow_out is not None:
            flow_sink = stack.enter_context(FlowSink(pair, opts.flow_out, cog=opts.cog, tags=tags,
                                                     error_band=opts.check))
        image = stack.enter_context(ImageSink(pair, opts.out, cog=opts.cog, tags=tags)) if opts.mode == "dense" \
            else None
        # the scratch file holds the repaired field now (scene.apply); the next strips are warped in
        # warp_ahead threads while this one is written
        strips = scratch.strips() if apply else (s for s, _ in scene.unmoved(scratch))
        warp = (lambda st: warper(st.flow, area.row + st.row0)) if image is not None else (lambda st: None)
        for strip, warped in _ahead(strips, warp, warp_ahead):
            row_abs = area.row + strip.row0
            if image is not None:
                image.write(*warped, row_abs)
            if flow_sink is not None:
                flow_sink.write(strip, row_abs)
            if tiepoints is not None:
                tiepoints.add(strip)
        if opts.mode == "affine" or (opts.mode == "gcps" and not apply):
            out_transform = _write_affine(opts, pair, affine, warper, tags)
        # before the flow sink closes: a failure here leaves no displacement raster behind
        tie_summary = _write_tiepoints(opts, pair, tiepoints.table(pair.ref.transform), tags, apply) \
            if tiepoints is not None else None
    return RegisterResult(
        out=str(opts.out), flow_out=str(opts.flow_out) if opts.flow_out else None,
        qa_out=str(opts.qa_out) if opts.qa_out else None, method=opts.method, mode=opts.mode,
        reference=opts.reference, tiles=len(tiles), tile_size=opts.tile_size,
        window={"col_off": area.col, "row_off": area.row, "width": area.width, "height": area.height},
        median_flow=qa.median_flow(products), certainty_coverage=verdict["coverage"], evidence_certainty=level,
        affine=[[float(v) for v in row] for row in affine], affine_rmse=stats["rmse"],
        affine_inliers=stats["inliers"],
        repaired_share=verdict["repaired_share"],
        output_transform=list(out_transform)[:6] if out_transform is not None else None,
        sar_scale=sar_scale,
        qa=register_qa.write_qa(opts, pair, matcher, sar_scale, log.overview, products, affine, tile_rows, verdict)
        if opts.qa_out is not None else None,
        tiepoints_out=str(opts.tiepoints_out) if opts.tiepoints_out else None, tiepoints=tie_summary,
        verdict=verdict, check=checked, scene_rotation=rotation,
    )


def _write_tiepoints(opts: RegisterOptions, pair: AlignedPair, points: TiePoints, tags: dict, apply: bool) -> dict:
    """GCP mode's output image (from the reliable tie points; not when the registration is not
    applied) and the tie point GeoPackage."""
    gcps = None
    if opts.mode == "gcps" and apply:
        gcps = write_with_gcps(pair, opts.out, points.take(points.gcp_indices()), cog=opts.cog, tags=tags)
    if opts.tiepoints_out is not None:
        write_tiepoints(opts.tiepoints_out, points, pair.ref.crs)
    return {"points": len(points), "reliable": int(np.count_nonzero(points.reliable)), "gcps": gcps}


def _write_affine(opts: RegisterOptions, pair: AlignedPair, affine: np.ndarray, warper: RowWarper, tags: dict):
    """Affine mode: same CRS -> the moving pixels unchanged under a corrected geotransform (returned);
    otherwise the moving image resampled with the fitted affine field (``None``).  A registration
    that is not applied writes the identity so in every mode but dense."""
    if pair.same_crs:
        return write_relocated(pair, opts.out, affine, cog=opts.cog, tags=tags)
    area = pair.area
    with ImageSink(pair, opts.out, cog=opts.cog, tags=tags) as sink:
        rows = strip_rows(area.width)
        for a in range(area.row, area.row + area.height, rows):
            h = min(rows, area.row + area.height - a)
            sink.write(*warper(coords.affine_to_flow_np(affine, h, area.width, col0=area.col, row0=a), a), a)
    return None
