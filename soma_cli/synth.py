"""Seeded synthetic deformations with exact ground truth (used by ``evaluate`` and ``train``).

A deformation moves the content of the (co-registered) SAR chip: content at pixel ``q`` moves to
``q + D(q)``.  ``D`` is therefore the ground-truth flow on the reference (optical) grid in the
convention of :mod:`soma_cli.coords`: optical pixel ``q`` matches the deformed SAR at ``q + D(q)``.
The deformed SAR is made by backward sampling, ``S'(p) = S(p + G(p))`` with ``G`` the exact inverse
of ``D`` (affine part inverted in closed form, the smooth local part by fixed-point iteration).

The forward map is ``q -> a = A q -> p = a + L(a)``: a global affine ``A`` about the chip centre,
then a smooth local field ``L`` made of Gaussian bumps (defined everywhere, so the inverse is exact
at the borders too).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import coords


@dataclass(frozen=True)
class DeformParams:
    """Ranges of a deformation distribution (all uniform, symmetric)."""

    rot_deg: float = 0.0
    trans_px: float = 0.0  # at a 512 px chip; scaled with chip size
    scale: float = 0.0  # relative, e.g. 0.03 for +-3 %
    shear: float = 0.0
    local_px: float = 0.0  # maximum |L|
    n_bumps: tuple = (3, 7)


PAPER = DeformParams(rot_deg=20.0, trans_px=50.0)
GEO = DeformParams(rot_deg=3.0, trans_px=12.0, scale=0.03, local_px=4.0)


def params_for(protocol: str) -> DeformParams:
    if protocol == "paper":
        return PAPER
    if protocol == "geo":
        return GEO
    raise ValueError(f"unknown protocol {protocol!r}; expected one of paper, geo")


def rng_for(seed: int, *keys) -> np.random.Generator:
    """Deterministic generator from a seed and any strings/ints (same on every machine)."""
    ints = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        ints.append(zlib.crc32(str(k).encode()) & 0xFFFFFFFF)
    return np.random.default_rng(ints)


@dataclass
class Bumps:
    """Smooth field ``L(x, y) = sum_k v_k exp(-|(x, y) - c_k|^2 / (2 s_k^2))``."""

    centres: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    sigmas: np.ndarray = field(default_factory=lambda: np.zeros(0))
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))

    def __call__(self, x: np.ndarray, y: np.ndarray):
        lx = np.zeros_like(x, dtype=np.float64)
        ly = np.zeros_like(y, dtype=np.float64)
        for (cx, cy), s, (vx, vy) in zip(self.centres, self.sigmas, self.vectors):
            g = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2.0 * s * s))
            lx += vx * g
            ly += vy * g
        return lx, ly


@dataclass
class Deformation:
    """A drawn deformation for an ``h x w`` chip."""

    affine: np.ndarray  # 2x3, reference pixel -> intermediate pixel
    bumps: Bumps
    h: int
    w: int

    def forward(self) -> np.ndarray:
        """Ground-truth flow ``D`` (2, h, w) on the reference grid."""
        g = coords.base_grid_np(self.h, self.w, np.float64)
        af = coords.affine_to_flow_np(self.affine, self.h, self.w).astype(np.float64)
        ax, ay = g[0] + af[0], g[1] + af[1]
        lx, ly = self.bumps(ax, ay)
        return np.stack([ax + lx - g[0], ay + ly - g[1]]).astype(np.float32)

    def backward(self, iters: int = 30) -> np.ndarray:
        """``G`` (2, h, w): the deformed image is ``S'(p) = S(p + G(p))``; exact inverse of ``D``."""
        g = coords.base_grid_np(self.h, self.w, np.float64)
        px, py = g[0], g[1]
        ax, ay = px.copy(), py.copy()
        for _ in range(iters):  # a = p - L(a)
            lx, ly = self.bumps(ax, ay)
            ax, ay = px - lx, py - ly
        inv = np.linalg.inv(coords.to3x3(self.affine))
        qx = inv[0, 0] * ax + inv[0, 1] * ay + inv[0, 2]
        qy = inv[1, 0] * ax + inv[1, 1] * ay + inv[1, 2]
        return np.stack([qx - px, qy - py]).astype(np.float32)

    def apply(self, image: np.ndarray, order: int = 1) -> np.ndarray:
        """Deform ``image`` ((H, W) or (C, H, W)); pixels from outside the chip become NaN."""
        return coords.warp_np(image, self.backward(), order=order, cval=np.nan)


def draw(rng: np.random.Generator, h: int, w: int, params: DeformParams) -> Deformation:
    """Draw one deformation for an ``h x w`` chip from ``params``."""
    size = float(min(h, w))
    theta = np.deg2rad(rng.uniform(-params.rot_deg, params.rot_deg))
    s = 1.0 + rng.uniform(-params.scale, params.scale)
    sh = rng.uniform(-params.shear, params.shear)
    t = rng.uniform(-params.trans_px, params.trans_px, size=2) * size / 512.0
    lin = s * np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    lin = lin @ np.array([[1.0, sh], [0.0, 1.0]])
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    trans = c - lin @ c + t
    affine = np.concatenate([lin, trans[:, None]], axis=1)
    bumps = Bumps()
    if params.local_px > 0:
        k = int(rng.integers(params.n_bumps[0], params.n_bumps[1] + 1))
        centres = rng.uniform([0, 0], [w - 1, h - 1], size=(k, 2))
        sigmas = rng.uniform(0.08, 0.25, size=k) * size
        vectors = rng.normal(size=(k, 2))
        bumps = Bumps(centres, sigmas, vectors)
        # scale so that the largest |L| on the chip is a drawn value up to local_px
        g = coords.base_grid_np(h // 8 + 1, w // 8 + 1, np.float64) * 8
        lx, ly = bumps(g[0], g[1])
        peak = float(np.hypot(lx, ly).max())
        target = rng.uniform(0.3, 1.0) * params.local_px
        bumps = Bumps(centres, sigmas, vectors * (target / max(peak, 1e-9)))
    return Deformation(affine=affine, bumps=bumps, h=h, w=w)


def draw_for(protocol: str, seed: int, name: str, chip: int, h: int, w: int,
             params: Optional[DeformParams] = None) -> Deformation:
    """The deformation of chip ``chip`` of pair ``name`` under ``protocol`` and ``seed``."""
    p = params if params is not None else params_for(protocol)
    return draw(rng_for(seed, protocol, name, chip), h, w, p)
