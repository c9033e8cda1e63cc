"""The QA of a registration (``soma register --qa-out``), read from the aligned pair: the run
metadata, both images and the applied field on the overview grid (also the verdict's edge
similarity), and the full-resolution alignment crop; :func:`write_qa` hands them to
:func:`soma_cli.qa.write_products`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Tuple

import numpy as np

from . import __version__, coords, preprocess, qa, tiling
from .io.pair import AlignedPair
from .matchers import Matcher

if TYPE_CHECKING:
    from .pipeline import RegisterOptions


def run_meta(opts: RegisterOptions, pair: AlignedPair, matcher: Matcher, sar_scale: str) -> dict:
    """What the QA summary records of the run: inputs, outputs, method, versions, date, settings."""
    weights = None
    if opts.method in ("soma", "auto"):
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


def qa_crop(opts: RegisterOptions, pair: AlignedPair, sar_scale: str, overview: qa.FlowOverview,
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
    ref, mov = _prepared(pair, sar_scale, ref, rv, True), _prepared(pair, sar_scale, mov, mv, False)
    shift = np.array([c - c0, r - r0], np.float32)[:, None, None]
    return {"ref": ref, "mov_before": mov[r - r0:r - r0 + h, c - c0:c - c0 + w],
            "mov_after": coords.warp_np(mov, np.nan_to_num(flow) + shift, order=1, cval=np.nan),
            "flow": flow, "certainty": cert, "origin": (area.row + r, area.col + c)}


def overview_images(pair: AlignedPair, sar_scale: str, shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Both images of the overlap window decimated to ``shape`` (the overview grid,
    :func:`soma_cli.qa.overview_grid`) and prepared as the matcher sees them (NaN where invalid):
    ``(reference, moving)``, for :func:`overview_products` (safe to call from another thread while
    the field is repaired)."""
    ref, rv = pair.read_overview(True, shape)
    mov, mv = pair.read_overview(False, shape)
    return _prepared(pair, sar_scale, ref, rv, True), _prepared(pair, sar_scale, mov, mv, False)


def _prepared(pair: AlignedPair, sar_scale: str, data: np.ndarray, valid: np.ndarray, reference: bool) -> np.ndarray:
    """A read of the reference (``reference``) or moving image prepared as the matcher sees it, NaN
    where invalid."""
    return np.where(valid, preprocess.prepare(data, valid, reference == pair.ref_is_optical, sar_scale), np.nan)


def overview_products(images: Tuple[np.ndarray, np.ndarray], area: tiling.Tile, overview: qa.FlowOverview,
                      affine: Optional[np.ndarray]) -> dict:
    """Both images (:func:`overview_images`) and the applied field on the overview grid
    (:func:`soma_cli.qa.write_products`' ``overview``) of the overlap window ``area``: the verdict's
    edge similarity and the QA pictures come from it.  ``affine``: the field is that affine
    (``--mode affine``), else the overview's flow."""
    s = overview.step
    ref_g, mov_g = images
    flow, cert = overview.arrays()
    if affine is not None:
        yy, xx = np.meshgrid(area.row + coords.stride_offsets(0, area.height, s),
                             area.col + coords.stride_offsets(0, area.width, s), indexing="ij")
        flow = np.stack(coords.affine_flow_points_np(affine, xx, yy))
    after = coords.warp_np(np.nan_to_num(mov_g), coords.flow_to_stride_np(np.nan_to_num(flow), s), order=1,
                           cval=np.nan)
    after = np.where(np.isfinite(flow).all(0), after, np.nan)
    out = {"ref": ref_g.astype(np.float32), "mov_before": mov_g.astype(np.float32),
           "mov_after": after.astype(np.float32), "flow": flow.astype(np.float32),
           "certainty": cert.astype(np.float32), "scale": s, "origin": (area.row, area.col)}
    errors = overview.errors()
    if errors is not None:
        out["est_error"] = errors.astype(np.float32)
    return out


def write_qa(opts: RegisterOptions, pair: AlignedPair, matcher: Matcher, sar_scale: str,
              overview: qa.FlowOverview, products: dict, affine: np.ndarray, tile_rows: list, verdict: dict) -> dict:
    """The QA folder, from the overview products of the field that was applied and the verdict."""
    qa_dir = Path(opts.qa_out)
    qa_dir.mkdir(exist_ok=True)
    return qa.write_products(qa_dir, products, tile_rows, meta=run_meta(opts, pair, matcher, sar_scale),
                             crop=qa_crop(opts, pair, sar_scale, overview, affine), verdict=verdict)
