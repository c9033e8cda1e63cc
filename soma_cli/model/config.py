"""The hyper-parameters of :class:`~soma_cli.model.net.SomaNet`, as one frozen dataclass.

A :class:`SomaConfig` is built once and handed to the network, which copies what each stage needs
into that stage.  It travels with the weights: training checkpoints and the exported metadata JSON
record it (``"config": {...}``, :meth:`SomaConfig.to_dict`), and :meth:`SomaConfig.from_dict` reads
it back, refusing unknown, missing or mistyped keys.

Units: radii are search half-widths and windows are square window sides, both in pixels of their
level (stride 8, 4, 2 or 1, "cells" at the coarse levels); windows and smoothing sizes are odd.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

#: :mod:`soma_cli.infer` pads tiles to a multiple of this before the network (whose coarsest level
#: has stride 8), and the weights metadata records it.
TILE_MULTIPLE = 32


@dataclass(frozen=True)
class EncoderConfig:
    """Per-modality encoder: CNN channels at strides 2, 4, 8, the channel groups of the FGE after
    each block, the learnt descriptor channels per level, and the Gaussian sigmas (px; kernels
    reach 2 sigma) of the smoothing before the level-0 oriented gradients and of the
    full-resolution descriptor."""

    channels: Tuple[int, int, int] = (16, 32, 64)
    fge_groups: Tuple[int, int, int] = (4, 8, 8)
    learnt: int = 16
    gradient_sigma: float = 1.0
    full_res_sigma: float = 2.0


@dataclass(frozen=True)
class GlobalConfig:
    """Global rotation x translation search at stride 8.

    Rotations from ``-max_rotation_deg`` to ``+max_rotation_deg`` in steps of ``rotation_step_deg``;
    translations within ``radius`` cells on levels of ``full_radius_cells`` cells (512 px tiles) and
    more, in proportion to the shorter side below, at least ``min_radius``.  The best translations
    of the ``candidates`` best rotations are verified by window support.  A translation's score is
    the mean correlation over the overlap, which counts as at least ``min_overlap`` of the level."""

    max_rotation_deg: float = 20.0
    rotation_step_deg: float = 4.0
    radius: int = 10
    full_radius_cells: int = 64
    min_radius: int = 2
    candidates: int = 3
    min_overlap: float = 0.3


@dataclass(frozen=True)
class AffineLevelConfig:
    """One affine refinement level: how many times it runs, its search radius, its window, and the
    sampling step of the window centres whose peaks the affine is fitted to (1: every pixel)."""

    iterations: int
    radius: int
    window: int
    step: int = 1


@dataclass(frozen=True)
class DenseLevelConfig:
    """One dense level: search radius, correlation window, consensus window (``smooth``), the
    sampling step of matching and consensus (1: every pixel), and the sub-pixel peak fit
    (``cone``: the equiangular V fit, else a parabola)."""

    radius: int
    window: int
    smooth: int
    step: int
    cone: bool


@dataclass(frozen=True)
class SomaConfig:
    """Every hyper-parameter of the shipped network (see :mod:`soma_cli.model.net`).

    ``fit_cauchy_px`` and ``fit_iterations``: Cauchy scale (level px) and re-weighting rounds of the
    robust affine fits of the verification and refinement; ``consensus_iterations`` and
    ``consensus_shrink``: re-weighting rounds of the dense consensus and the support at which it is
    shrunk halfway towards no update; ``border_margin``: px along image and coverage borders that the
    stages after the global one do not match on; ``cert_gain``: scale of the consensus supports in
    the certainty calibration; ``blend_*``: the global-local blend's affine fit (every
    ``blend_step``-th pixel, Cauchy scale in px, re-weighting rounds)."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    global_search: GlobalConfig = field(default_factory=GlobalConfig)
    affine8: AffineLevelConfig = field(default_factory=lambda: AffineLevelConfig(iterations=3, radius=3, window=5))
    affine4: AffineLevelConfig = field(default_factory=lambda: AffineLevelConfig(iterations=2, radius=3, window=9))
    affine2: AffineLevelConfig = field(
        default_factory=lambda: AffineLevelConfig(iterations=2, radius=3, window=63, step=4))
    dense4: DenseLevelConfig = field(
        default_factory=lambda: DenseLevelConfig(radius=3, window=15, smooth=61, step=1, cone=True))
    dense2: DenseLevelConfig = field(
        default_factory=lambda: DenseLevelConfig(radius=3, window=31, smooth=61, step=2, cone=True))
    dense1: DenseLevelConfig = field(
        default_factory=lambda: DenseLevelConfig(radius=1, window=63, smooth=121, step=4, cone=False))
    fit_cauchy_px: float = 1.0
    fit_iterations: int = 3
    consensus_iterations: int = 2
    consensus_shrink: float = 0.02
    head_hidden: int = 16
    border_margin: int = 8
    cert_gain: float = 10.0
    blend_step: int = 8
    blend_cauchy_px: float = 1.0
    blend_iterations: int = 6

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready dict (tuples as lists)."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> "SomaConfig":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming the first bad key."""
        return _build(cls, data, "config")


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    missing = [n for n in names if n not in data]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}")
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    return cls(**{n: _value(hints[n], data[n], f"{where}.{n}") for n in names})


def _value(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if typing.get_origin(kind) is tuple:
        args = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values")
        return tuple(_value(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:  # float
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    if not ok:
        raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value
