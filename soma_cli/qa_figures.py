"""The pictures of the QA folder (:func:`soma_cli.qa.write_products`), numpy + matplotlib (Agg
backend): checkerboards, flow, certainty, estimated error and the |flow| histogram over the decimated overview, and
``alignment.png``, the optical image's edges (:func:`edge_map`) over the SAR image on a
full-resolution crop. They read in reference pixels (axes, colour bars, histogram).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from .atomic import atomic_write

CERTAIN = 0.5  # certainty threshold for "certainty coverage"

_PNG = {"compress_level": 1}  # fast zlib: the products are for viewing, not archiving


def _save_fig(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        return atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100, bbox_inches="tight", pil_kwargs=_PNG))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- pictures

EDGE_SIGMA = 2.0  # px, Gaussian derivative scale of the edge map in the alignment picture
EDGE_SHARE = 0.08  # share of the ridge pixels that seed an edge (the strongest ones)
EDGE_COLOUR = (1.0, 0.85, 0.0)  # yellow: stands out on a grey SAR background
CROP_COLOUR = "#00c8ff"  # the outline of the alignment crop on the overview pictures
FLOW_OVER_COLOUR = "#3cb44b"  # |flow| in a long tail beyond the colour bar's range (:func:`hist_range`)
SAR_DISPLAY_SIGMA = 1.0  # px, display smoothing of the SAR in the alignment picture
CROP = 256  # px, side of the window of that region the alignment picture shows
AXIS_LABELS = ("column (reference px)", "row (reference px)")
ARROW_CERTAINTY = 0.05  # flow arrows are drawn where the certainty exceeds this
HIST_BINS = 60
MOVING_TINT = (1.0, 0.75, 0.45)  # the moving image's squares of the checkerboard (orange)
NODATA_RGB = (0.05, 0.07, 0.2)  # nodata in the checkerboard (dark blue)


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def stretch(img: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> np.ndarray:
    """Robust contrast stretch to [0, 1] between the ``lo``/``hi`` percentiles; NaN stays NaN."""
    x = np.asarray(img, np.float32)
    ok = np.isfinite(x)
    if not ok.any():
        return np.full(x.shape, np.nan, np.float32)
    a, b = np.percentile(x[ok], [lo, hi])
    if b - a <= 1e-12:
        b = a + 1.0
    return np.clip((x - a) / (b - a), 0.0, 1.0).astype(np.float32)


def checkerboard(ref: np.ndarray, mov: np.ndarray, cells: int = 8) -> np.ndarray:
    """RGB composite: reference (grey) and moving image (orange tint) in alternating squares of
    about ``1/cells`` of the short side, each with its own robust stretch; nodata is dark blue."""
    r, m = stretch(ref), stretch(mov)
    h, w = r.shape
    size = max(1, min(h, w) // cells)
    rows = (np.arange(h) // size)[:, None]
    cols = (np.arange(w) // size)[None, :]
    use_mov = ((rows + cols) % 2).astype(bool)
    grey = np.where(use_mov, m, r)
    tint = np.where(use_mov[..., None], np.array(MOVING_TINT), np.array([1.0, 1.0, 1.0]))
    rgb = grey[..., None] * tint
    rgb[~np.isfinite(grey)] = NODATA_RGB
    return rgb.astype(np.float32)


def edge_map(img: np.ndarray, sigma: float = EDGE_SIGMA, share: float = EDGE_SHARE) -> np.ndarray:
    """Thin edges of ``img`` (bool, Canny-like): Gaussian derivatives at ``sigma``, non-maximum
    suppression across the edge, then hysteresis: ridge pixels among the strongest ``share`` seed
    an edge, which follows connected ridge pixels down to half that strength.  NaN pixels and
    those within ``2 sigma`` of them are never edges (the nodata border is not an edge)."""
    x = np.asarray(img, np.float64)
    ok = np.isfinite(x)
    if not ok.any():
        return np.zeros(x.shape, bool)
    x = np.where(ok, x, float(np.mean(x[ok])))
    gy = ndimage.gaussian_filter(x, sigma, order=(1, 0), mode="nearest")
    gx = ndimage.gaussian_filter(x, sigma, order=(0, 1), mode="nearest")
    mag = np.hypot(gx, gy)
    # gradient direction quantised to 0, 45, 90, 135 degrees; (d_row, d_col) steps across the edge
    sector = np.round(np.degrees(np.arctan2(gy, gx)) % 180.0 / 45.0).astype(int) % 4
    pad = np.pad(mag, 1)
    h, w = mag.shape
    ridge = np.zeros(mag.shape, bool)
    for k, (dr, dc) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = pad[1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
        behind = pad[1 - dr:1 - dr + h, 1 - dc:1 - dc + w]
        ridge |= (sector == k) & (mag >= ahead) & (mag > behind)
    ridge &= ndimage.binary_erosion(ok, iterations=max(1, math.ceil(2 * sigma)), border_value=1)
    ridge &= mag > 1e-12
    if not ridge.any():
        return ridge
    strong = float(np.quantile(mag[ridge], 1.0 - share))
    weak = ridge & (mag >= 0.5 * strong)
    labels, _ = ndimage.label(weak, structure=np.ones((3, 3), bool))
    seeds = np.unique(labels[weak & (mag >= strong)])
    return np.isin(labels, seeds[seeds > 0])


def _extent(shape, step: float, origin) -> List[float]:
    """imshow extent of a stride-``step`` grid whose first pixel is reference pixel ``origin`` =
    (row, col): the axes then read in full-resolution reference pixels."""
    h, w = shape
    r0, c0 = origin
    return [c0 - 0.5 * step, c0 + (w - 0.5) * step, r0 + (h - 0.5) * step, r0 - 0.5 * step]


def _axes_in_px(ax) -> None:
    ax.set_xlabel(AXIS_LABELS[0])
    ax.set_ylabel(AXIS_LABELS[1])


def _outline_crop(ax, crop_box) -> None:
    """The alignment crop ``(row, col, height, width)`` (reference px) as a labelled rectangle."""
    if crop_box is None:
        return
    from matplotlib.patches import Rectangle

    r, c, h, w = crop_box
    ax.autoscale(False)  # the picture's extent stays the axes' limits
    ax.add_patch(Rectangle((c - 0.5, r - 0.5), w, h, fill=False, ec=CROP_COLOUR, lw=1.5))
    ax.annotate("alignment.png", (c - 0.5, r - 0.5), xytext=(0, 3), textcoords="offset points", color="white",
                fontsize=8, va="bottom", bbox={"boxstyle": "square,pad=0.15", "fc": "black", "ec": CROP_COLOUR})


def _panel_size(shape, longest: float) -> Tuple[float, float]:
    """(width, height) in inches of a picture of ``shape`` whose longest side is ``longest``."""
    h, w = shape
    m = max(h, w, 1)
    return max(longest * w / m, 2.0), max(longest * h / m, 2.0)


def _overview_axes(shape, extra_height: float = 0.3):
    import matplotlib.pyplot as plt

    w, h = _panel_size(shape, 7.0)
    return plt.subplots(figsize=(w, h + extra_height))


def _checker_figure(ref: np.ndarray, mov: np.ndarray, when: str, names, extent, crop_box):
    from matplotlib.patches import Patch

    fig, ax = _overview_axes(ref.shape, 1.0)
    ax.imshow(checkerboard(ref, mov), extent=extent, interpolation="nearest")
    _outline_crop(ax, crop_box)
    _axes_in_px(ax)
    ax.set_title(f"checkerboard, {when} correction\n(aligned: lines continue across the squares)")
    ax.legend(handles=[Patch(fc="0.75", ec="k", label=f"reference: {names[0]}"),
                       Patch(fc=MOVING_TINT, ec="k", label=f"moving: {names[1]}"),
                       Patch(fc=NODATA_RGB, ec="k", label="no data")],
              loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    return fig


def _flow_figure(flow: np.ndarray, certainty: Optional[np.ndarray], scale: float, extent, crop_box):
    import matplotlib.pyplot as plt

    mag = np.hypot(flow[0], flow[1])
    h, w = mag.shape
    fig, ax = _overview_axes(mag.shape, 0.6)
    finite = mag[np.isfinite(mag)]
    vmax, beyond = hist_range(finite)
    cmap = plt.get_cmap("magma").with_extremes(over=FLOW_OVER_COLOUR)
    im = ax.imshow(np.ma.masked_invalid(mag), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest", extent=extent)
    step = max(1, max(h, w) // 24)
    ys, xs = np.mgrid[step // 2:h:step, step // 2:w:step]
    u, v = flow[0][ys, xs], flow[1][ys, xs]
    keep = np.isfinite(u) & np.isfinite(v)
    if certainty is not None:
        keep &= np.nan_to_num(certainty[ys, xs]) > ARROW_CERTAINTY
    amax = float(np.max(np.hypot(u[keep], v[keep]))) if keep.any() else 0.0
    arrows = ""
    if amax > 1e-6:
        # arrows point from the reference pixel towards its match in the moving image; the longest
        # spans 0.9 grid cells (so arrow length is relative, the colour bar gives pixels)
        x0, y0 = extent[0] + 0.5 * scale, extent[3] + 0.5 * scale
        ax.quiver(x0 + xs[keep] * scale, y0 + ys[keep] * scale, u[keep], v[keep], color="cyan", angles="xy",
                  scale_units="xy", scale=amax / (0.9 * step * scale), width=0.003)
        arrows = f"\narrows: towards the match (certainty > {ARROW_CERTAINTY:g}), longest {amax:.2f} px"
    _outline_crop(ax, crop_box)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, extend="max" if beyond else "neither")
    cb.set_label("|flow| (reference px)" + (f"; green: > {vmax:.2f} px" if beyond else ""))
    med = float(np.median(finite)) if finite.size else float("nan")
    ax.set_title(f"flow applied: |(dx, dy)|, median {med:.2f} px{arrows}", fontsize=10)
    _axes_in_px(ax)
    return fig


def _certainty_figure(certainty: np.ndarray, extent, crop_box):
    fig, ax = _overview_axes(certainty.shape)
    im = ax.imshow(np.ma.masked_invalid(certainty), cmap="viridis", vmin=0, vmax=1, interpolation="nearest",
                   extent=extent)
    _outline_crop(ax, crop_box)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label("certainty (0 = guess, 1 = sure)")
    ok = np.isfinite(certainty)
    cov = float(np.mean(certainty[ok] > CERTAIN)) if ok.any() else float("nan")
    ax.set_title(f"matcher certainty: {100 * cov:.0f}% of the pixels > {CERTAIN}", fontsize=10)
    _axes_in_px(ax)
    return fig


ERROR_MAX = 5.0  # px, top of the estimated error's colour bar


def _error_figure(error: np.ndarray, extent, crop_box):
    import matplotlib.pyplot as plt

    fig, ax = _overview_axes(error.shape)
    cmap = plt.get_cmap("RdYlGn_r")
    im = ax.imshow(np.ma.masked_invalid(error), cmap=cmap, vmin=0, vmax=ERROR_MAX, interpolation="nearest",
                   extent=extent)
    _outline_crop(ax, crop_box)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, extend="max")
    cb.set_label("estimated error (reference px)")
    v = error[np.isfinite(error)]
    if v.size:
        title = (f"estimated error (self-consistency check): median {np.median(v):.2f} px, "
                 f"{100 * np.mean(v > 1):.0f}% > 1 px, {100 * np.mean(v > 3):.0f}% > 3 px")
    else:
        title = "estimated error (self-consistency check): no estimate"
    ax.set_title(title, fontsize=10)
    _axes_in_px(ax)
    return fig


def hist_range(mag: np.ndarray) -> Tuple[float, int]:
    """``(upper, beyond)``: the histogram's range ``[0, upper]`` px and how many values exceed it.
    ``upper`` is the maximum unless it lies beyond 1.5 x the 99.5th percentile (a long tail), then
    that percentile."""
    v = mag[np.isfinite(mag)]
    if not v.size:
        return 1.0, 0
    top, p = float(v.max()), float(np.percentile(v, 99.5))
    upper = max(top if top <= 1.5 * p else p, 1e-3)
    return upper, int(np.count_nonzero(v > upper))


def _hist_summary(mag: np.ndarray) -> dict:
    upper, beyond = hist_range(mag)
    n = int(np.count_nonzero(np.isfinite(mag)))
    return {"upper_px": upper, "beyond": beyond, "beyond_share": beyond / n if n else 0.0}


def _hist_figure(mag: np.ndarray, scale: float):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    v = mag[np.isfinite(mag)]
    if v.size:
        upper, beyond = hist_range(v)
        counts, edges = np.histogram(v[v <= upper], bins=HIST_BINS, range=(0, upper))
        width = edges[1] - edges[0]
        ax.bar(edges[:-1], counts, width=width, align="edge", color="tab:blue", label="pixels")
        if beyond:
            share = beyond / v.size
            ax.bar(upper + width, beyond, width=width, align="edge", color="tab:orange", hatch="//",
                   label=f"> {upper:.2f} px: {beyond} pixels ({100 * share:.2g}%), max {float(v.max()):.2f} px")
            ax.annotate(f"{beyond}", (upper + 1.5 * width, beyond), xytext=(0, 3), textcoords="offset points",
                        ha="center", fontsize=8, color="tab:orange")
        med = float(np.median(v))
        ax.axvline(med, color="tab:red", lw=1.5, label=f"median {med:.2f} px")
        ax.legend(fontsize=8)
        ax.set_title(f"|flow| histogram ({v.size} overview pixels)", fontsize=10)
    else:
        ax.text(0.5, 0.5, "no valid flow", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("|flow| histogram", fontsize=10)
    ax.set_xlabel("|flow| (reference px)")
    ax.set_ylabel(f"pixels (overview 1:{scale:g})")
    return fig


def _display_sar(img: np.ndarray) -> np.ndarray:
    """SAR for display: Gaussian-smoothed over :data:`SAR_DISPLAY_SIGMA` px (tames speckle, moves
    nothing), then :func:`stretch`; nodata stays NaN."""
    x = np.asarray(img, np.float32)
    ok = np.isfinite(x)
    w = ndimage.gaussian_filter(ok.astype(np.float32), SAR_DISPLAY_SIGMA)
    s = ndimage.gaussian_filter(np.where(ok, x, 0.0), SAR_DISPLAY_SIGMA)
    return stretch(np.where(ok, s / np.maximum(w, 1e-6), np.nan))


def _optical_of(crop: dict, ref_is_optical: bool) -> Tuple[np.ndarray, np.ndarray]:
    """(before, after) of the optical image of ``crop``: the fixed reference twice, or the moving one."""
    if ref_is_optical:
        return crop["ref"], crop["ref"]
    return crop["mov_before"], crop["mov_after"]


def crop_window(crop: dict, ref_is_optical: bool, size: int = CROP) -> Tuple[int, int, int, int]:
    """``(row, col, height, width)`` inside ``crop`` (:func:`alignment_figure`) of the ``size``
    window (smaller when the crop is) with the most optical edges (after correction) weighted
    by the matcher's certainty: where a person can judge the alignment."""
    opt = np.asarray(_optical_of(crop, ref_is_optical)[1], np.float32)
    h, w = min(size, opt.shape[0]), min(size, opt.shape[1])
    weight = edge_map(opt) * np.nan_to_num(np.asarray(crop["certainty"], np.float64))
    s = np.pad(weight.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]
    r, c = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(r), int(c), h, w


def alignment_figure(crop: dict, window: Tuple[int, int, int, int], names: Sequence[str], ref_is_optical: bool):
    """Before / after at full resolution: the optical image's edges (:func:`edge_map`) in yellow
    over the SAR image, on ``window`` (row, col, height, width) of ``crop``.  Aligned when the
    yellow lines sit on the SAR's own edges.

    ``crop``: ``ref``, ``mov_before``, ``mov_after`` (H, W) float32 on the reference grid (NaN =
    nodata), ``flow`` (2, H, W) applied there, ``certainty`` (H, W), ``origin`` (row, col)
    reference pixel of its top left.  ``names``: (reference, moving) labels."""
    import matplotlib.pyplot as plt

    r, c, h, w = window
    cut = np.s_[r:r + h, c:c + w]
    opt_before, opt_after = (edge_map(np.asarray(x, np.float32))[cut] for x in _optical_of(crop, ref_is_optical))
    if ref_is_optical:  # the SAR moves under fixed optical edges
        sars = (crop["mov_before"], crop["mov_after"])
        sar_name, opt_name = names[1], names[0]
    else:  # the optical edges move over the fixed SAR
        sars = (crop["ref"], crop["ref"])
        sar_name, opt_name = names[0], names[1]
    extent = _extent((h, w), 1, (crop["origin"][0] + r, crop["origin"][1] + c))
    pw, ph = _panel_size((h, w), 6.0)
    fig, axes = plt.subplots(1, 2, figsize=(2 * pw, ph + 1.2), sharex=True, sharey=True)
    for ax, sar, edges, when in zip(axes, sars, (opt_before, opt_after), ("before", "after")):
        ax.imshow(_display_sar(np.asarray(sar, np.float32))[cut], cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest", extent=extent)
        overlay = np.zeros((h, w, 4), np.float32)
        overlay[edges] = EDGE_COLOUR + (1.0,)
        ax.imshow(overlay, interpolation="nearest", extent=extent)
        ax.set_title(when, fontsize=12, fontweight="bold")
        _axes_in_px(ax)
    axes[1].set_ylabel("")
    flow = np.asarray(crop["flow"], np.float32)[(slice(None),) + cut]
    ok = np.isfinite(flow).all(0)
    shift = (f"; flow applied here: median dx {np.median(flow[0][ok]):+.2f}, dy {np.median(flow[1][ok]):+.2f} px"
             if ok.any() else "")
    fig.suptitle(f"full resolution: edges of {opt_name} (yellow) over {sar_name} (grey, smoothed "
                 f"{SAR_DISPLAY_SIGMA:g} px){shift}\naligned when the yellow lines sit on the grey image's own edges",
                 fontsize=10)
    fig.tight_layout()
    return fig


def input_names(meta: Optional[dict]) -> Tuple[str, str]:
    """(reference, moving) file names from the run metadata (with their folder when the two names
    are the same), or generic labels without them."""
    inputs = (meta or {}).get("inputs") or {}
    paths = [Path(str(inputs[k])) if inputs.get(k) else None for k in ("sar", "opt")]
    same = None not in paths and paths[0].name == paths[1].name
    sar, opt = (label if p is None else Path(p.parent.name, p.name).as_posix() if same else p.name
                for p, label in zip(paths, ("SAR", "optical")))
    return (opt, sar) if (meta or {}).get("reference", "opt") == "opt" else (sar, opt)
