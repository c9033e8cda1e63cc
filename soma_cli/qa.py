"""Quality-assurance products of a registration run (``soma register --qa-out DIR``).

Two entry points, both numpy + matplotlib (Agg backend, no display needed):

* :func:`tile_scores` scores one tile: median flow, mean certainty, and a similarity score before
  and after correction. The similarity is the normalised cross-correlation (NCC, in [-1, 1]) of
  the Gaussian-smoothed (sigma 1.5 px) *gradient magnitudes* of the reference and the moving
  image, over the pixels valid in all three images (so before and after compare the same
  pixels): SAR and optical intensities are not comparable, their edges are. A correct
  registration should raise it.
* :func:`write_products` writes the scene-level pictures and tables into a QA folder and returns
  the summary dict (also written as ``summary.json``), from a decimated overview of the scene whose
  flow :class:`FlowOverview` gathers strip by strip, and from one full-resolution region.

The pictures (:mod:`soma_cli.qa_figures`) read in reference pixels (axes, colour bars,
histogram): ``alignment.png`` shows the optical image's edges over the SAR image before and after
on a full-resolution crop of that region (where a misalignment of a pixel or two is visible); the
overview pictures (checkerboards, flow, certainty) outline that crop; the histogram says how many
values lie beyond its range.

Outlier tiles (``outlier`` column of ``tiles.csv``; decided in :func:`write_products`, where the
scene median is known). A tile with scores is an outlier when either

* ``degraded``: its similarity after correction is lower than before by more than
  :data:`DEGRADE_TOL` (the correction made the tile worse), or
* ``flow_deviates``: its median flow vector is further from the scene median flow vector than
  ``max(FLOW_DEV_MIN_PX, FLOW_DEV_K * robust sigma)``, the robust sigma being
  ``1.4826 * MAD`` of the tiles' distances to the scene median.

Tiles with fewer than :data:`MIN_VALID` valid pixels get no scores (NaN, ``null`` in JSON) and
are never outliers.

Every file is written atomically: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import csv
import io
import math
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from . import coords
from .atomic import atomic_write, to_jsonable, write_bytes, write_json
from .errors import OutputError
from .qa_figures import (
    CERTAIN, _certainty_figure, _checker_figure, _error_figure, _extent, _finite, _flow_figure, _hist_figure,
    _hist_summary, _save_fig, alignment_figure, crop_window, input_names,
)

DEGRADE_TOL = 0.02
FLOW_DEV_MIN_PX = 2.0
FLOW_DEV_K = 3.0
MIN_VALID = 64
GRAD_SIGMA = 1.5  # px, Gaussian derivative scale of the similarity score
GRAD_REACH = math.ceil(4 * GRAD_SIGMA)  # px, support of that derivative (scipy truncates at 4 sigma)
FLAT = 1e-3  # a gradient magnitude varying by less than this share of its mean has no edges
OVERVIEW_MAX = 2048  # px, longest side of the overview
REGION = 512  # px, side of the full-resolution region kept for the alignment picture

TILE_FIELDS = (
    "row_off", "col_off", "height", "width", "valid_fraction", "median_dx", "median_dy", "median_flow",
    "mean_certainty", "similarity_before", "similarity_after", "degraded", "flow_deviation",
    "outlier", "outlier_reason",
)

ALIGNMENT = "alignment.png"  # written when the caller gives a full-resolution crop
ESTIMATED_ERROR = "estimated_error.png"  # written when the overview has an estimated error
#: beside it, how the estimate compared with the true error on the held-out tile
#: (benchmarks/check_validation.py's plot, shipped in the package)
CHECK_CALIBRATION = "check_calibration.png"
PRODUCTS = (
    "checkerboard_before.png", "checkerboard_after.png", "flow.png", "certainty.png", "flow_hist.png",
    "tiles.csv", "tiles.json", "summary.json",
)

# ----------------------------------------------------------------------------- scores


def _gradient_magnitude(img: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Gaussian gradient magnitude (sigma :data:`GRAD_SIGMA`, damps speckle); invalid pixels are
    filled with the valid mean first."""
    x = np.asarray(img, dtype=np.float32)
    fill = float(np.mean(x[valid])) if valid.any() else 0.0
    return ndimage.gaussian_gradient_magnitude(np.where(valid, x, fill), GRAD_SIGMA, mode="nearest")


def _ncc(u: np.ndarray, v: np.ndarray) -> float:
    flat = any(float(x.std()) <= FLAT * abs(float(x.mean())) for x in (u, v))
    u = u.astype(np.float64) - u.mean()
    v = v.astype(np.float64) - v.mean()
    den = math.sqrt(float(np.dot(u, u)) * float(np.dot(v, v)))
    return float(np.dot(u, v) / den) if den > 1e-12 and not flat else float("nan")


def gradient_nccs(ref: np.ndarray, movs: Sequence[np.ndarray], valid: Optional[np.ndarray] = None) -> List[float]:
    """NCC of the gradient magnitude of ``ref`` with that of each of ``movs``, all over the SAME
    pixels: ``valid`` and finite in every image, beyond the derivative's reach
    (:data:`GRAD_REACH`) from invalid ones and from the image border, so that neither the filling
    of invalid pixels nor the border shows up as an edge. NaN when fewer than :data:`MIN_VALID`
    pixels are usable or an image has no edges there (its gradient magnitude varies by less than
    :data:`FLAT` of its mean, as on a ramp)."""
    ref = np.asarray(ref, np.float32)
    ok = np.isfinite(ref)
    for m in movs:
        ok &= np.isfinite(m)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    inner = ndimage.minimum_filter(ok.view(np.uint8), size=2 * GRAD_REACH + 1, mode="constant", cval=0).astype(bool)
    if inner.sum() < MIN_VALID:
        return [float("nan")] * len(movs)
    g = _gradient_magnitude(ref, ok)[inner]
    return [_ncc(g, _gradient_magnitude(np.asarray(m, np.float32), ok)[inner]) for m in movs]


def tile_scores(
    ref: np.ndarray,
    mov_before: np.ndarray,
    mov_after: np.ndarray,
    flow: np.ndarray,
    certainty: np.ndarray,
    valid: Optional[np.ndarray] = None,
) -> Dict[str, object]:
    """Scores of one tile (all arrays on the reference grid, float32; NaN = nodata).

    ``flow`` is ``(2, H, W)`` (dx, dy in reference pixels), ``certainty`` ``(H, W)`` in [0, 1],
    ``valid`` an optional bool ``(H, W)`` mask of pixels where both images have data.
    Returns ``valid_fraction``, ``median_dx``, ``median_dy``, ``median_flow`` (median of |flow|),
    ``mean_certainty``, ``similarity_before``, ``similarity_after`` (gradient NCC) and
    ``degraded`` (similarity after < before - DEGRADE_TOL). The caller adds the tile window.
    """
    ref = np.asarray(ref, np.float32)
    flow = np.asarray(flow, np.float32)
    certainty = np.asarray(certainty, np.float32)
    if flow.shape != (2,) + ref.shape or certainty.shape != ref.shape:
        raise ValueError(f"tile_scores: shapes differ (ref {ref.shape}, flow {flow.shape}, "
                         f"certainty {certainty.shape})")
    ok = np.isfinite(ref) & np.isfinite(flow).all(axis=0) & np.isfinite(certainty)
    if valid is not None:
        ok &= np.asarray(valid, bool)
    n = int(ok.sum())
    out: Dict[str, object] = {"valid_fraction": n / max(ref.size, 1)}
    nan = float("nan")
    if n < MIN_VALID:
        out.update(median_dx=nan, median_dy=nan, median_flow=nan, mean_certainty=nan,
                   similarity_before=nan, similarity_after=nan, degraded=False)
        return out
    dx, dy = flow[0][ok], flow[1][ok]
    before, after = gradient_nccs(ref, [mov_before, mov_after], ok)
    out.update(
        median_dx=float(np.median(dx)),
        median_dy=float(np.median(dy)),
        median_flow=float(np.median(np.hypot(dx, dy))),
        mean_certainty=float(np.mean(certainty[ok])),
        similarity_before=before,
        similarity_after=after,
        degraded=bool(np.isfinite(before) and np.isfinite(after) and after < before - DEGRADE_TOL),
    )
    return out


def flag_outliers(tile_rows: Sequence[dict]) -> List[dict]:
    """Copies of ``tile_rows`` with ``flow_deviation``, ``outlier`` and ``outlier_reason`` set
    (rule in the module docstring)."""
    rows = [dict(r) for r in tile_rows]
    scored = [r for r in rows if _finite(r.get("median_dx")) and _finite(r.get("median_dy"))]
    if scored:
        mdx = float(np.median([r["median_dx"] for r in scored]))
        mdy = float(np.median([r["median_dy"] for r in scored]))
        dev = np.array([math.hypot(r["median_dx"] - mdx, r["median_dy"] - mdy) for r in scored])
        sigma = 1.4826 * float(np.median(np.abs(dev - np.median(dev)))) if len(dev) > 2 else 0.0
        limit = max(FLOW_DEV_MIN_PX, FLOW_DEV_K * sigma)
        for r, d in zip(scored, dev):
            r["flow_deviation"] = float(d)
            r["_deviates"] = bool(d > limit)
    for r in rows:
        r.setdefault("flow_deviation", float("nan"))
        reasons = []
        if r.get("degraded"):
            reasons.append("degraded")
        if r.pop("_deviates", False):
            reasons.append("flow_deviates")
        r["outlier"] = bool(reasons)
        r["outlier_reason"] = "+".join(reasons)
    return rows


# ----------------------------------------------------------------------------- atomic writes


def _write_csv(path: Path, rows: Iterable[dict], fields: Sequence[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v)
                    for k, v in to_jsonable(r).items()})
    data = buf.getvalue().encode()
    return atomic_write(path, lambda fh: fh.write(data))


# ----------------------------------------------------------------------------- products

def choose_region(tile_rows: Sequence[dict], height: int, width: int, origin=(0, 0), size: int = REGION):
    """The full-resolution region ``(row, col, height, width)`` kept for the alignment picture,
    relative to the ``height x width`` area whose top-left reference pixel is ``origin`` (tile
    rows are in reference pixels): ``size`` square (smaller when the area is), centred on the tile
    where the matcher had the most to go on, the highest ``valid_fraction * (mean_certainty +
    max(similarity_before, similarity_after))``, or on the area's centre when no tile is scored."""
    h, w = min(size, height), min(size, width)
    cy, cx = height / 2, width / 2
    best = -math.inf
    for r in tile_rows:
        vals = [r.get(k) for k in ("valid_fraction", "mean_certainty", "similarity_before", "similarity_after")]
        if not all(_finite(v) for v in vals):
            continue
        score = vals[0] * (vals[1] + max(vals[2], vals[3]))
        if score > best:
            best = score
            cy = r["row_off"] - origin[0] + r["height"] / 2
            cx = r["col_off"] - origin[1] + r["width"] / 2
    row = int(min(max(round(cy - h / 2), 0), height - h))
    col = int(min(max(round(cx - w / 2), 0), width - w))
    return row, col, h, w


def overview_grid(height: int, width: int) -> Tuple[int, Tuple[int, int]]:
    """``(step, shape)`` of the overview of a ``height x width`` area: every ``step``-th row and
    column, the longest side at most :data:`OVERVIEW_MAX`."""
    step = max(1, math.ceil(max(height, width) / OVERVIEW_MAX))
    return step, (math.ceil(height / step), math.ceil(width / step))


class FlowOverview:
    """What the QA pictures need of the final flow, gathered from the strips as they stream past:
    the flow and certainty of the ``height x width`` area decimated to the overview (every
    ``step``-th row and column, :func:`soma_cli.coords.stride_offsets`; the longest side at most
    :data:`OVERVIEW_MAX`), and at full resolution in one region for the alignment picture.  The
    region (:func:`choose_region` over ``tile_rows``, the area's top left being reference pixel
    ``origin``) is chosen when the first strip arrives: strips are final only once every tile is
    matched and scored."""

    def __init__(self, height: int, width: int, tile_rows: Optional[Sequence[dict]] = None, origin=(0, 0)):
        self.step, self.shape = overview_grid(height, width)
        self.area_shape, self.origin, self._tile_rows = (height, width), tuple(origin), tile_rows
        self.region: Optional[Tuple[int, int, int, int]] = None
        self._flow: List[np.ndarray] = []
        self._cert: List[np.ndarray] = []
        self._error: List[np.ndarray] = []
        self._region_flow = self._region_cert = None

    def add(self, strip) -> None:
        """Keep the overview rows and the region's part of a :class:`~soma_cli.stitch.Strip`."""
        rows = coords.stride_offsets(strip.row0, strip.flow.shape[1], self.step)
        if rows.size:
            self._flow.append(strip.flow[:, rows, ::self.step])
            self._cert.append(strip.certainty[rows, ::self.step])
            if strip.error is not None:
                self._error.append(strip.error[rows, ::self.step])
        if self.region is None:
            self.region = choose_region(self._tile_rows or [], *self.area_shape, self.origin)
            self._region_flow = np.full((2,) + self.region[2:], np.nan, np.float32)
            self._region_cert = np.full(self.region[2:], np.nan, np.float32)
        r, c, h, w = self.region
        a, b = max(r, strip.row0), min(r + h, strip.row0 + strip.flow.shape[1])
        if a < b:
            self._region_flow[:, a - r:b - r] = strip.flow[:, a - strip.row0:b - strip.row0, c:c + w]
            self._region_cert[a - r:b - r] = strip.certainty[a - strip.row0:b - strip.row0, c:c + w]

    def arrays(self):
        """``(flow (2, h, w) in full-resolution pixels, certainty (h, w))`` of the overview."""
        h, w = self.shape
        return (np.concatenate(self._flow, axis=1)[:, :h, :w], np.concatenate(self._cert, axis=0)[:h, :w])

    def errors(self) -> Optional[np.ndarray]:
        """The estimated error (h, w) of the overview, or None when the strips carried none."""
        h, w = self.shape
        return np.concatenate(self._error, axis=0)[:h, :w] if self._error else None

    def region_arrays(self):
        """``(flow (2, h, w), certainty (h, w))`` of :attr:`region` at full resolution (NaN where
        no strip passed)."""
        return self._region_flow, self._region_cert


def median_flow(overview: dict) -> float:
    """Median |flow| of the applied field over the overview pixels where both images are valid
    (the ``median_flow`` of :func:`write_products` and of ``soma register``'s summary)."""
    flow = np.asarray(overview["flow"], np.float32)
    ok = np.isfinite(overview["ref"]) & np.isfinite(overview["mov_before"]) & np.isfinite(flow).all(axis=0)
    return float(np.median(np.hypot(flow[0][ok], flow[1][ok]))) if ok.any() else float("nan")


def scene_similarity(overview: dict) -> List[float]:
    """Edge similarity (:func:`gradient_nccs`) of the reference with the moving image before and
    after, over the overview pixels where both images are valid."""
    ref, before = overview["ref"], overview["mov_before"]
    return gradient_nccs(ref, [before, overview["mov_after"]], np.isfinite(ref) & np.isfinite(before))


def _median(vals) -> float:
    v = [float(x) for x in vals if _finite(x)]
    return float(np.median(v)) if v else float("nan")


def write_products(qa_dir: Path, overview: dict, tile_rows: Sequence[dict], meta: Optional[dict] = None,
                   crop: Optional[dict] = None, verdict: Optional[dict] = None) -> dict:
    """Write the QA folder and return the scene summary (also ``summary.json``).

    ``overview``: decimated whole-scene arrays ``ref``, ``mov_before``, ``mov_after`` (float32,
    NaN = nodata), ``flow`` (2, h, w) in full-resolution reference pixels, ``certainty`` (h, w),
    ``scale`` (the decimation factor) and ``origin`` (reference pixel (row, col) of its top left,
    default (0, 0)); optional ``est_error`` (h, w), the estimated error in px
    (``estimated_error.png``).  ``tile_rows``: one dict per tile, :func:`tile_scores` plus the window
    ``row_off``, ``col_off``, ``height``, ``width``.  ``meta``: the run (inputs, method, versions,
    settings; :func:`soma_cli.pipeline.register` fills it), kept as ``run`` in the summary and
    naming the inputs in the pictures.  ``crop``: a full-resolution region for
    :func:`alignment_figure`, which shows its :func:`crop_window` (``alignment.png``, only
    written with it).  ``verdict``: the registration's (:func:`soma_cli.verdict.judge`), kept in
    the summary as it is.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)

    qa_dir = Path(qa_dir)
    try:
        qa_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{qa_dir}: cannot create the QA folder ({exc.strerror})") from None
    ref = np.asarray(overview["ref"], np.float32)
    before = np.asarray(overview["mov_before"], np.float32)
    after = np.asarray(overview["mov_after"], np.float32)
    flow = np.asarray(overview["flow"], np.float32)
    cert = np.asarray(overview["certainty"], np.float32)
    scale = float(overview.get("scale", 1))
    extent = _extent(ref.shape, scale, overview.get("origin", (0, 0)))
    names = input_names(meta)
    ref_is_optical = (meta or {}).get("reference", "opt") == "opt"
    window = crop_window(crop, ref_is_optical) if crop is not None else None
    crop_box = ((crop["origin"][0] + window[0], crop["origin"][1] + window[1]) + window[2:]
                if crop is not None else None)

    valid = np.isfinite(ref) & np.isfinite(before)
    flow_ok = valid & np.isfinite(flow).all(axis=0)
    flow_v = np.where(flow_ok[None], flow, np.nan)
    cert_v = np.where(valid, cert, np.nan)
    mag = np.hypot(flow_v[0], flow_v[1])

    files = list(PRODUCTS)
    if crop is not None:
        _save_fig(alignment_figure(crop, window, names, ref_is_optical), qa_dir / ALIGNMENT)
        files.insert(0, ALIGNMENT)
    _save_fig(_checker_figure(ref, before, "before", names, extent, crop_box), qa_dir / "checkerboard_before.png")
    _save_fig(_checker_figure(ref, after, "after", names, extent, crop_box), qa_dir / "checkerboard_after.png")
    _save_fig(_flow_figure(flow_v, cert_v, scale, extent, crop_box), qa_dir / "flow.png")
    _save_fig(_certainty_figure(cert_v, extent, crop_box), qa_dir / "certainty.png")
    _save_fig(_hist_figure(mag, scale), qa_dir / "flow_hist.png")
    if "est_error" in overview:
        est = np.where(valid, np.asarray(overview["est_error"], np.float32), np.nan)
        _save_fig(_error_figure(est, extent, crop_box), qa_dir / ESTIMATED_ERROR)
        files.insert(files.index("flow_hist.png"), ESTIMATED_ERROR)
        write_bytes(qa_dir / CHECK_CALIBRATION, (resources.files("soma_cli") / CHECK_CALIBRATION).read_bytes())
        files.insert(files.index("flow_hist.png"), CHECK_CALIBRATION)

    rows = flag_outliers(tile_rows)
    fields = list(TILE_FIELDS) + sorted({k for r in rows for k in r} - set(TILE_FIELDS))
    _write_csv(qa_dir / "tiles.csv", rows, fields)
    write_json(qa_dir / "tiles.json", rows)

    scored = [r for r in rows if _finite(r.get("similarity_before")) and _finite(r.get("similarity_after"))]
    sim_b = _median(r["similarity_before"] for r in scored)
    sim_a = _median(r["similarity_after"] for r in scored)
    scene_sim = scene_similarity(overview)
    mv = mag[np.isfinite(mag)]
    cv = cert_v[np.isfinite(cert_v)]
    n_out = sum(1 for r in rows if r["outlier"])
    summary = {
        "tiles": len(rows),
        "tiles_scored": len(scored),
        "similarity_before_median": sim_b,
        "similarity_after_median": sim_a,
        "similarity_gain": sim_a - sim_b,
        "tiles_improved_share": (sum(1 for r in scored if r["similarity_after"] > r["similarity_before"])
                                 / len(scored)) if scored else float("nan"),
        "scene_similarity_before": scene_sim[0],
        "scene_similarity_after": scene_sim[1],
        "outlier_tiles": n_out,
        "outlier_share": n_out / len(rows) if rows else float("nan"),
        "degraded_tiles": sum(1 for r in rows if r.get("degraded")),
        "median_dx": float(np.median(flow_v[0][np.isfinite(mag)])) if mv.size else float("nan"),
        "median_dy": float(np.median(flow_v[1][np.isfinite(mag)])) if mv.size else float("nan"),
        "median_flow": median_flow(overview),
        "p95_flow": float(np.percentile(mv, 95)) if mv.size else float("nan"),
        "mean_certainty": float(np.mean(cv)) if cv.size else float("nan"),
        "certainty_coverage": float(np.mean(cv > CERTAIN)) if cv.size else float("nan"),
        "valid_fraction": float(valid.mean()) if valid.size else 0.0,
        "overview_scale": scale,
        "overview_shape": list(ref.shape),
        "similarity": f"NCC of Gaussian (sigma {GRAD_SIGMA} px) gradient magnitudes over valid pixels, reference vs moving",
        "outlier_rule": (f"similarity_after < similarity_before - {DEGRADE_TOL}, or |tile median flow - "
                         f"scene median flow| > max({FLOW_DEV_MIN_PX} px, {FLOW_DEV_K} * 1.4826 * MAD)"),
        "flow_hist": _hist_summary(mag),
        "alignment_crop": list(crop_box) if crop_box is not None else None,
        "files": files,
    }
    if meta is not None:
        summary["run"] = dict(meta)
    if verdict is not None:
        summary["verdict"] = verdict
    write_json(qa_dir / "summary.json", summary)
    return to_jsonable(summary)
