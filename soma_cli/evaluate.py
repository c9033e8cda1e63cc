"""``soma evaluate``: accuracy benchmark on co-registered SAR/optical pairs with synthetic deformations.

Protocol
--------
* Pairs come from ``DATA_DIR/sar/NAME.tif`` + ``DATA_DIR/opt/NAME.tif`` (+ optional ``pairs.csv``),
  through :mod:`soma_cli.io.dataset`; ``split`` keeps the pairs whose :meth:`PairEntry.group` matches
  (for s1s2_calif, ``T11SLT`` is the held-out tile).  ``limit`` keeps the first ``limit`` *pairs* in
  listing order (``pairs.csv`` order, else sorted by name).
* Each pair is cut into non-overlapping ``chip x chip`` chips on a fixed grid anchored at the top-left
  corner (rows and columns ``0, chip, 2*chip, ...``; a remainder at the right/bottom is not used).  A
  chip is skipped (counted in ``skipped``) when under half of its pixels are valid in both images.
  Chip ``k`` is numbered row-major within its pair.
* Chips are prepared as ``soma register``'s tiles (:func:`soma_cli.preprocess.prepare`): optical
  :func:`select_bands` -> :func:`optical_to_gray` -> :func:`standardise`; SAR :func:`sar_to_log`
  -> :func:`standardise`.  The deformed SAR copy: :meth:`Deformation.apply` in the log domain with
  invalid pixels as NaN, then :func:`standardise` over the still-valid pixels.  The deformation of chip ``k``
  of pair ``NAME`` is ``synth.draw_for(protocol, seed, NAME, k, chip, chip)``: the same on every
  machine.
* Each method predicts the flow of the deformed pair (``F1``) and of the undeformed pair (``F0``).

Metrics (per method and protocol)
---------------------------------
Absolute, against the ground truth ``D`` (over the pixels ``q`` with a valid optical and
``q + D(q)`` inside the chip): per chip the RMSE and the mean endpoint error of ``F1 - D`` and the
share of pixels under 1 px; ``cmrK`` is the share of chips with RMSE < K px; ``rmse_mean``,
``rmse_median``, ``aepe`` (mean over chips of the per-chip mean endpoint error), ``px1`` (mean over
chips of the share of pixels under 1 px).

Relative (self-consistency), insensitive to the residual misregistration of real "co-registered"
pairs: the expected ``F1(q) = F0(q) + D(q + F0(q))`` (``coords.compose_flow_np(D, F0)``); the same
statistics over ``F1 - expected`` are reported with the prefix ``rel_``.

``s_per_mpx``: matching seconds per megapixel of the deformed chips (the ``F1`` calls only).

Non-finite predicted flow at an evaluated pixel counts as an infinite error (JSON writes ``null``
for non-finite numbers).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import atomic, synth, tiling
from .errors import ConfigError, DataError, OutputError
from .io.dataset import list_pairs, pair_size, read_pair
from .matchers import Matcher, get_matcher
from .metrics import aggregate, chip_metrics, error_metrics, eval_mask, relative_error
from .preprocess import optical_to_gray, prepare, select_bands, standardise, to_gray

PROTOCOL_CHOICES = ("geo", "paper", "both")
MIN_VALID_SHARE = 0.5
#: Metric keys of one method, in table order (the ``rel_`` ones are the self-consistency metrics).
METRIC_KEYS = (
    "cmr1", "cmr2", "cmr3", "cmr5", "rmse_mean", "rmse_median", "aepe", "px1",
    "rel_cmr1", "rel_cmr2", "rel_cmr3", "rel_cmr5", "rel_rmse_mean", "rel_rmse_median", "rel_aepe",
    "rel_px1", "s_per_mpx", "n",
)

ProgressFn = Callable[[int, int, dict], None]
MethodSpec = Union[str, Matcher]


# ----------------------------------------------------------------------------- chips


@dataclass
class BaseChip:
    """One undeformed chip, preprocessed."""

    pair: str
    index: int
    opt: np.ndarray  # (H, W) standardised
    opt_valid: np.ndarray  # bool
    sar_log: np.ndarray  # (H, W) log domain, NaN where invalid
    sar: np.ndarray  # (H, W) standardised, undeformed
    sar_valid: np.ndarray  # bool


@dataclass
class Sample:
    """A chip under a protocol: the deformed SAR and the ground-truth flow."""

    base: BaseChip
    protocol: str
    sar: np.ndarray  # (H, W) standardised, deformed
    sar_valid: np.ndarray  # bool
    gt: np.ndarray  # (2, H, W) ground truth D on the optical grid


def base_chip(pair: str, index: int, opt_gray: np.ndarray, opt_valid: np.ndarray, sar: np.ndarray,
              sar_valid: np.ndarray) -> Optional[BaseChip]:
    """Preprocess one chip window: the optical already grey (:func:`optical_to_gray`), the SAR as
    read.  ``None`` when under :data:`MIN_VALID_SHARE` of the pixels are valid in both."""
    ov = np.asarray(opt_valid, bool) & np.isfinite(opt_gray)
    sv = np.asarray(sar_valid, bool) & np.isfinite(sar)
    if (ov & sv).mean() < MIN_VALID_SHARE:
        return None
    slog = np.where(sv, to_gray(sar, sv, optical=False), np.nan).astype(np.float32)
    return BaseChip(pair=pair, index=index, opt=prepare(opt_gray, ov, optical=True), opt_valid=ov,
                    sar_log=slog, sar=prepare(sar, sv, optical=False), sar_valid=sv)


def base_chips(arrays, chip: int) -> Tuple[List[BaseChip], int]:
    """Cut a :class:`~soma_cli.io.dataset.PairArrays` into preprocessed :class:`BaseChip` s.

    Returns the usable chips and the number skipped (under half of the pixels valid in both).
    """
    h, w = arrays.sar.shape[-2:]
    opt_gray = optical_to_gray(select_bands(arrays.opt))
    chips: List[BaseChip] = []
    skipped = 0
    for k, t in enumerate(tiling.grid(h, w, chip)):
        win = (t.rows, t.cols)
        bc = base_chip(arrays.name, k, opt_gray[win], arrays.opt_valid[win], arrays.sar[win], arrays.sar_valid[win])
        if bc is None:
            skipped += 1
            continue
        chips.append(bc)
    return chips, skipped


def deform_chip(base: BaseChip, protocol: str, seed: int) -> Sample:
    """Deform the SAR of ``base`` (log domain, then standardised) under ``protocol`` and ``seed``."""
    h, w = base.opt.shape
    d = synth.draw_for(protocol, seed, base.pair, base.index, h, w)
    moved = d.apply(base.sar_log)
    valid = np.isfinite(moved)
    return Sample(base, protocol, standardise(moved, valid), valid, d.forward())


# ----------------------------------------------------------------------------- running


def _resolve_methods(methods: Sequence[MethodSpec], options: Mapping) -> Dict[str, Matcher]:
    out: Dict[str, Matcher] = {}
    if not methods:
        raise ConfigError("no method to evaluate")
    for m in methods:
        if isinstance(m, str):
            matcher = get_matcher(m, **dict(options))
            name = m
        else:
            matcher = m
            name = str(getattr(m, "name", type(m).__name__))
        if name in out:
            raise ConfigError(f"method {name!r} given twice")
        out[name] = matcher
    return out


def _protocols(protocol: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    ps = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    out: List[str] = []
    for p in ps:
        if p == "both":
            out += ["geo", "paper"]
        elif p in ("geo", "paper"):
            out.append(p)
        else:
            raise ConfigError(f"unknown protocol {p!r}; expected one of {', '.join(PROTOCOL_CHOICES)}")
    return tuple(dict.fromkeys(out))


def _match(matcher: Matcher, opt, sar, opt_valid, sar_valid, batch: int) -> Tuple[List[np.ndarray], float]:
    """Run ``matcher`` on stacked chips in sub-batches; returns flows and the matching seconds."""
    flows: List[np.ndarray] = []
    seconds = 0.0
    for i in range(0, len(opt), batch):
        sl = slice(i, i + batch)
        t0 = time.perf_counter()
        flow, _ = matcher.match(
            np.stack(opt[sl]).astype(np.float32), np.stack(sar[sl]).astype(np.float32),
            np.stack(opt_valid[sl]), np.stack(sar_valid[sl]),
        )
        seconds += time.perf_counter() - t0
        flow = np.asarray(flow, dtype=np.float32)
        n = len(opt[sl])
        h, w = opt[i].shape
        if flow.shape != (n, 2, h, w):
            raise ConfigError(
                f"method {getattr(matcher, 'name', matcher)!r} returned a flow of shape {flow.shape}, "
                f"expected {(n, 2, h, w)}"
            )
        flows.extend(flow)
    return flows, seconds


def run(
    data_dir: Union[str, Path],
    protocols: Union[str, Sequence[str]] = "geo",
    methods: Sequence[MethodSpec] = ("identity",),
    seed: int = 0,
    chip: int = 512,
    limit: Optional[int] = None,
    split: Optional[str] = None,
    matcher_options: Optional[Mapping] = None,
    progress: Optional[ProgressFn] = None,
    batch: int = 4,
) -> dict:
    """Evaluate ``methods`` on ``data_dir`` under ``protocols`` (``geo``, ``paper`` or ``both``).

    ``methods`` are matcher names for :func:`get_matcher` (built with ``matcher_options``) or matcher
    objects with a ``name``.  ``progress(done, total, info)`` is called after each chip.

    Returns, for one protocol, ``{"protocol", "methods": {name: {metric: value}}, "seed", "chip",
    "split", "data", "limit", "pairs", "chips", "skipped"}``; for several, ``{"protocols": {protocol:
    <that object>}, "seed", "chip", "split", "data", "limit"}``.
    """
    protos = _protocols(protocols)
    if int(chip) < 32:
        raise ConfigError(f"--chip must be at least 32 px, got {chip}")
    if limit is not None and int(limit) < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if int(batch) < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    chip, batch = int(chip), int(batch)
    entries = list_pairs(Path(data_dir), [split] if split else None)
    if limit is not None:
        entries = entries[: int(limit)]
    sizes = [pair_size(e) for e in entries]
    for e, (h, w) in zip(entries, sizes):
        if h < chip or w < chip:
            fits = 32 * (min(h, w) // 32)
            hint = f" (try --chip {fits})" if fits >= 32 else ""
            raise DataError(f"pair {e.name} ({w}x{h}) is smaller than the chip size {chip}{hint}")
    total = sum(len(tiling.grid(h, w, chip)) for h, w in sizes)
    matchers = _resolve_methods(methods, matcher_options or {})

    recs = {p: {m: {"abs": [], "rel": []} for m in matchers} for p in protos}
    secs = {p: {m: 0.0 for m in matchers} for p in protos}
    mpx = {p: 0.0 for p in protos}
    done = skipped = used = 0
    for entry in entries:
        arrays = read_pair(entry)
        good, n_skip = base_chips(arrays, chip)
        skipped += n_skip
        used += len(good)
        if good:
            opt = [c.opt for c in good]
            ov = [c.opt_valid for c in good]
            samples = {p: [deform_chip(c, p, seed) for c in good] for p in protos}
            for name, matcher in matchers.items():
                f0s, _ = _match(matcher, opt, [c.sar for c in good], ov, [c.sar_valid for c in good], batch)
                for p in protos:
                    ss = samples[p]
                    f1s, t = _match(matcher, opt, [s.sar for s in ss], ov, [s.sar_valid for s in ss], batch)
                    secs[p][name] += t
                    for s, f0, f1 in zip(ss, f0s, f1s):
                        recs[p][name]["abs"].append(chip_metrics(f1, s.gt, eval_mask(s.gt, s.base.opt_valid)))
                        err, mask = relative_error(f0, f1, s.gt)
                        recs[p][name]["rel"].append(error_metrics(err, mask & s.base.opt_valid))
            for p in protos:
                mpx[p] += sum(c.opt.size for c in good) / 1e6
        done += len(good) + n_skip
        if progress is not None:
            progress(done, total, {"pair": entry.name, "chips": len(good), "skipped": skipped})

    common = {"seed": int(seed), "chip": chip, "split": split, "data": str(data_dir), "limit": limit}
    per: Dict[str, dict] = {}
    for p in protos:
        res = {}
        for name in matchers:
            m = aggregate(recs[p][name]["abs"])
            m.update(aggregate(recs[p][name]["rel"], prefix="rel_"))
            m.pop("rel_n", None)
            m["s_per_mpx"] = secs[p][name] / mpx[p] if mpx[p] > 0 else math.nan
            res[name] = {k: m[k] for k in METRIC_KEYS}
        per[p] = {"protocol": p, "methods": res, **common, "pairs": len(entries), "chips": used,
                  "skipped": skipped}
    if len(protos) == 1:
        return per[protos[0]]
    return {"protocols": per, **common}


def protocol_results(result: dict) -> Dict[str, dict]:
    """``{protocol: per-protocol result}`` for a :func:`run` result of one or several protocols."""
    if "protocols" in result:
        return dict(result["protocols"])
    return {result["protocol"]: result}


# ----------------------------------------------------------------------------- output


#: Table columns: (header, metric key, format); shares are shown in percent.
TABLE_COLUMNS = (
    ("CMR\n@1", "cmr1", "pct"), ("CMR\n@2", "cmr2", "pct"), ("CMR\n@3", "cmr3", "pct"),
    ("CMR\n@5", "cmr5", "pct"), ("RMSE\nmean", "rmse_mean", "px"), ("RMSE\nmed", "rmse_median", "px"),
    ("AEPE", "aepe", "px"), ("<1px", "px1", "pct"), ("rel\nCMR1", "rel_cmr1", "pct"),
    ("rel\nCMR3", "rel_cmr3", "pct"), ("rel\nRMSE\nmed", "rel_rmse_median", "px"),
    ("s/\nMPx", "s_per_mpx", "s"), ("n", "n", "int"),
)


def format_value(value, kind: str) -> str:
    """Text of one table cell (``pct``: a share in percent, ``px``: pixels, ``s``: seconds)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "inf" if isinstance(value, float) and math.isinf(value) else "-"
    if kind == "pct":
        return f"{100.0 * value:.0f}"
    if kind == "px":
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    if kind == "s":
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"
    return str(int(value))


def table_rows(result: dict) -> Tuple[List[str], List[List[str]]]:
    """Headers and rows (one per method) of a per-protocol result, as text."""
    headers = ["method"] + [h for h, _, _ in TABLE_COLUMNS]
    rows = [[name] + [format_value(m.get(k), kind) for _, k, kind in TABLE_COLUMNS]
            for name, m in result["methods"].items()]
    return headers, rows


def write_json(path: Union[str, Path], result: dict) -> Path:
    """Write ``result`` as JSON atomically (temporary file in the destination folder, then rename)."""
    try:
        return atomic.write_json(Path(path), result)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
