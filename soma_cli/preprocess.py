"""Input preprocessing shared by every matcher and by training (numpy only).

SAR: brought to a log (dB-like) domain whatever it arrives in, so that amplitude, intensity, dB and
8-bit scaled products look alike after per-tile normalisation.  Optical: the selected bands are
averaged into one luminance-like channel.  Each tile is then standardised robustly (median and
inter-quartile range over valid pixels), clipped to +-5, and invalid pixels are set to 0.
:func:`prepare` is that whole chain, from raw tile data to a matcher's input.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import BandError, ConfigError

SAR_KINDS = ("auto", "db", "amplitude", "intensity")

#: Description stored with the weights (torchgeo-style: the weights carry their preprocessing).
PREPROCESSING = {
    "sar": "log10(x + 0.01*median(x>0)) for linear data, unchanged for dB; tile-robust standardise",
    "optical": "mean of selected bands; tile-robust standardise",
    "standardise": "(x - median) / (IQR/1.349), clip +-5, invalid -> 0",
}


def detect_sar_kind(sample: np.ndarray, is_float: bool) -> str:
    """Decide once per scene whether SAR values are dB (float with negative values) or linear."""
    x = np.asarray(sample, dtype=np.float64)
    x = x[np.isfinite(x)]
    if is_float and x.size and float(np.percentile(x, 50)) < 0:
        return "db"
    return "amplitude"


def sar_to_log(sar: np.ndarray, kind: str = "auto", valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Convert a SAR band (H, W) to a log domain. ``kind``: auto, db, amplitude, intensity."""
    if kind not in SAR_KINDS:
        raise ConfigError(f"unknown SAR scale {kind!r}; expected one of {', '.join(SAR_KINDS)}")
    x = np.asarray(sar, dtype=np.float32)
    ok = np.isfinite(x) if valid is None else (valid & np.isfinite(x))
    if kind == "auto":
        if np.issubdtype(np.asarray(sar).dtype, np.floating) and ok.any() and np.nanmin(np.where(ok, x, 0)) < 0:
            kind = "db"
        else:
            kind = "amplitude"
    if kind == "db":
        return np.where(ok, x, 0).astype(np.float32)
    pos = x[ok & (x > 0)]
    eps = 0.01 * float(np.median(pos)) if pos.size else 1.0
    out = np.log10(np.maximum(np.where(ok, x, 0), 0) + eps)
    return out.astype(np.float32)


def parse_bands(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """A band list as typed (``"4,3,2"``, ``"4 3 2"``) -> ``(4, 3, 2)``, 1-based; ``None`` stays
    ``None`` (the default bands of :func:`resolve_bands`)."""
    if text is None:
        return None
    parts = [p for p in re.split(r"[\s,;]+", str(text).strip()) if p]
    try:
        bands = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"bad band list {text!r}: expected integers like '4,3,2'") from None
    if not bands or min(bands) < 1:
        raise ConfigError(f"bad band list {text!r}: band numbers start at 1")
    return bands


def resolve_bands(count: int, bands: Optional[Sequence[int]] = None) -> tuple:
    """1-based optical bands to use from a ``count``-band image.  Default: 13-band Sentinel-2 ->
    B4,B3,B2 (4,3,2); 3 or 4 bands -> the first three; otherwise all."""
    if bands is None:
        if count >= 13:
            return (4, 3, 2)
        if count in (3, 4):
            return (1, 2, 3)
        return tuple(range(1, count + 1))
    bad = [b for b in bands if not 1 <= int(b) <= count]
    if bad:
        raise BandError(f"band(s) {bad} out of range: the optical image has {count} band(s)")
    return tuple(int(b) for b in bands)


def select_bands(optical: np.ndarray, bands: Optional[Sequence[int]] = None) -> np.ndarray:
    """Pick the :func:`resolve_bands` bands from ``(C, H, W)`` (or ``(H, W)``)."""
    arr = np.asarray(optical)
    if arr.ndim == 2:
        arr = arr[None]
    return arr[[b - 1 for b in resolve_bands(arr.shape[0], bands)]]


def optical_to_gray(optical: np.ndarray) -> np.ndarray:
    """Average (C, H, W) selected bands into one float32 channel (H, W)."""
    arr = np.asarray(optical, dtype=np.float32)
    if arr.ndim == 2:
        return arr
    return arr.mean(axis=0)


def standardise(x: np.ndarray, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Robust per-tile standardisation; invalid pixels -> 0. Works on (H, W)."""
    x = np.asarray(x, dtype=np.float32)
    ok = np.isfinite(x) if valid is None else (valid & np.isfinite(x))
    if ok.sum() < 16:
        return np.zeros_like(x, dtype=np.float32)
    v = x[ok]
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    scale = (q3 - q1) / 1.349
    if not np.isfinite(scale) or scale < 1e-6:
        scale = float(v.std()) or 1.0
    out = np.clip((x - med) / scale, -5, 5)
    return np.where(ok, out, 0).astype(np.float32)


def to_gray(data: np.ndarray, valid: np.ndarray, optical: bool, sar_scale: str = "auto") -> np.ndarray:
    """Raw tile data -> one float32 channel before standardisation: the optical bands (``(C, H, W)``,
    already selected) averaged, or the SAR band (``(1, H, W)`` or ``(H, W)``) in its log domain."""
    if optical:
        return optical_to_gray(data)
    sar = np.asarray(data)
    return sar_to_log(sar[0] if sar.ndim == 3 else sar, sar_scale, valid)


def prepare(data: np.ndarray, valid: np.ndarray, optical: bool, sar_scale: str = "auto") -> np.ndarray:
    """The matcher's input for one tile: :func:`to_gray`, then :func:`standardise` over ``valid``."""
    return standardise(to_gray(data, valid, optical, sar_scale), valid)
