"""Matchers: what turns a pair of preprocessed tiles into a flow.

The contract (RoMa-style: images in, warp and certainty out)::

    flow, certainty = matcher.match(opt, sar, opt_valid, sar_valid)

    opt, sar          float32 (B, H, W), standardised by preprocess.standardise; the SAR tile is
                      already resampled onto the optical tile's grid (same H, W) but misaligned.
    opt_valid, ...    bool (B, H, W) or None.
    flow              float32 (B, 2, H, W) on the OPTICAL grid, coords.py convention: optical pixel
                      (c, r) matches the SAR tile at (c + dx, r + dy).
    certainty         float32 (B, H, W) in [0, 1].

Matchers are built by :func:`get_matcher` from a name (``gradient``, ``soma``, ``identity``, ``auto``,
...).  A matcher may also offer ``checked_match(opt, sar, opt_valid, sar_valid) -> (flow, certainty,
estimated error)`` when it checks its answers as it matches (``auto``); :func:`soma_cli.check.checked_match`
uses it instead of checking again.

A matcher may set, depending on what its certainty means (the network's is calibrated as the
probability of being within 1 px):

* ``trust_certainty`` (default :data:`TRUST_CERTAINTY`): the certainty below which ``soma
  register``'s outlier repair replaces a pixel that deviates more than 5 px from the smooth scene
  prior (:meth:`soma_cli.stitch.FlowPrior.repair`);
* ``evidence_certainty`` (default :data:`EVIDENCE_CERTAINTY`): the certainty from which a pixel
  counts as evidence for the verdict and the fallback (:mod:`soma_cli.verdict`);
* ``min_size`` (default 1): the smallest overlap side, in pixels, it can register;
* ``concurrency()`` (default 1) and a ``lanes`` attribute: how many tiles it is best called with
  at once from as many threads, which ``soma register`` then does (:func:`sharing_cores` sets
  ``lanes`` meanwhile, and the matcher shares its CPU threads between the calls).

A matcher whose global stage searches rotations (``soma``, and ``auto`` through its network) also
offers ``seed_rotations(opt, sar, opt_valid, sar_valid) -> (B,)`` (degrees, the rotation it picks
on each tile) and a ``rotation`` attribute (degrees or None): set, its global stage searches that
rotation only (:mod:`soma_cli.scene_rotation`; :func:`searching_rotation` sets it for a
registration).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Protocol, Tuple

import numpy as np


TRUST_CERTAINTY = 0.5
EVIDENCE_CERTAINTY = 0.5


def trust_certainty(matcher) -> float:
    """The matcher's ``trust_certainty``, or :data:`TRUST_CERTAINTY`."""
    return float(getattr(matcher, "trust_certainty", TRUST_CERTAINTY))


def evidence_certainty(matcher) -> float:
    """The matcher's ``evidence_certainty``, or :data:`EVIDENCE_CERTAINTY`."""
    return float(getattr(matcher, "evidence_certainty", EVIDENCE_CERTAINTY))


def rotation_searcher(matcher):
    """The matcher, or the part of it (``auto``'s network), whose global stage can search the
    scene's rotation alone (see the module doc); None when there is none."""
    for m in (matcher, getattr(matcher, "network", None)):
        if m is not None and hasattr(m, "seed_rotations"):
            return m
    return None


@contextmanager
def searching_rotation(matcher, rotation: Optional[float]) -> Iterator[None]:
    """Within the block, the global stage of ``matcher`` (:func:`rotation_searcher`) searches
    ``rotation`` (degrees) only; afterwards all rotations again.  ``rotation`` None: no change."""
    searcher = rotation_searcher(matcher)
    if searcher is None or rotation is None:
        yield
        return
    searcher.rotation = float(rotation)
    try:
        yield
    finally:
        searcher.rotation = None


def min_size(matcher) -> int:
    """The matcher's ``min_size``, or 1."""
    return int(getattr(matcher, "min_size", 1))


class Matcher(Protocol):
    name: str

    def match(
        self,
        opt: np.ndarray,
        sar: np.ndarray,
        opt_valid: Optional[np.ndarray] = None,
        sar_valid: Optional[np.ndarray] = None,
    ) -> Tuple[np.ndarray, np.ndarray]:
        ...


class IdentityMatcher:
    """No correction: zero flow, full certainty (the evaluate baseline)."""

    name = "identity"

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = np.asarray(opt).shape
        return np.zeros((b, 2, h, w), np.float32), np.ones((b, h, w), np.float32)


MATCHERS = ("soma", "gradient", "identity", "gefolki", "auto")
#: The options :func:`get_matcher` takes; a matcher ignores those that do not apply to it.
OPTIONS = ("weights", "device", "batch_size", "threads")


def get_matcher(name: str, **options) -> Matcher:
    """Build a matcher by name.

    Options (:data:`OPTIONS`): ``weights`` and ``device`` (the network), ``batch_size`` (tiles per
    network call), ``threads`` (CPU threads: torch's for the network, set process-wide; tiles
    matched concurrently for ``gradient``).  ``threads=None`` follows the cores other processes
    leave free, re-read before every batch (:class:`soma_cli.cpu.CpuShare`).  An option name not in :data:`OPTIONS` is a
    :class:`~soma_cli.errors.ConfigError`.
    """
    from ..errors import ConfigError

    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ConfigError(f"unknown matcher option(s) {', '.join(unknown)}; expected {', '.join(OPTIONS)}")
    threads = options.get("threads")
    if name == "identity":
        return IdentityMatcher()
    if name == "gradient":
        from .gradient import GradientMatcher

        return GradientMatcher(threads=threads)
    if name == "soma":
        from .soma import SomaMatcher

        return SomaMatcher(weights=options.get("weights"), device=options.get("device") or "auto",
                           batch_size=options.get("batch_size") or 4, threads=threads)
    if name == "auto":
        from .auto import AutoMatcher

        return AutoMatcher(get_matcher("soma", **options), get_matcher("gradient", **options))
    if name == "gefolki":
        from .gefolki import GefolkiMatcher

        return GefolkiMatcher()
    raise ConfigError(f"unknown method {name!r}; expected one of {', '.join(MATCHERS)}")


@contextmanager
def sharing_cores(matcher) -> Iterator[int]:
    """Within the block ``matcher`` is called from ``n`` threads at once, ``n`` what it yields: its
    ``concurrency()`` (1 for a matcher without one), and it shares its CPU threads between them."""
    n = int(matcher.concurrency()) if hasattr(matcher, "concurrency") else 1
    if n <= 1:
        yield 1
        return
    matcher.lanes = n
    try:
        yield n
    finally:
        matcher.lanes = 1
