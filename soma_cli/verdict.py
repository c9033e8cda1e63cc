"""The evidence a registration rests on, and its verdict: ``ok``, ``doubtful`` or ``failed``
(numpy only).

Evidence
--------
A pixel has evidence when the matcher's certainty there reaches the matcher's
``evidence_certainty`` (:func:`soma_cli.matchers.evidence_certainty`).  The level is measured, not
assumed: it is where, on the training tile T11SMT (``soma evaluate``'s 512 px chips under the geo
and paper deformations), the pixels at or above it were within 1 px of the self-consistent flow
in more than nine cases out of ten, while the optical chip matched against the SAR of *another* pair
(unrelated content) reached it on at most 7 % of its pixels.

* ``soma``: the network's certainty is calibrated as the probability of an error under 1 px, and
  in distribution it is (45 % of the pixels at 0.50-0.55 were within 1 px); unrelated content,
  however, gets 0.4-0.6 almost everywhere (12-40 % of such a chip above 0.5), so the level is 0.7
  (95 % of the pixels above it within 1 px; unrelated chips at most 7 % above it).
* ``gradient``: its certainty is the window quality (peak height times its margin over the second
  peak times the valid share), conservative as a probability: 0.1 (93 % within 1 px; unrelated
  chips at most 6 % above it).
* matchers without a measured level (``identity``, ``gefolki``: certainty 1) use 0.5; their
  verdict rests on the edge similarity.

A **tile** has evidence when at least :data:`TILE_EVIDENCE` of its valid pixels do.  A tile
without it is not trusted: its certainty is discarded, so its flow follows the trusted part of
the scene (:meth:`TileEvidence.record`), and the scene-wide fit uses trusted tiles only.

The **coverage** is the share of the overlap with evidence, the **trusted share** the share of the
tiles' valid pixels in tiles with evidence.

Verdict
-------
:func:`judge` is a pure function of a few statistics, so the same rules judge a scene in
``soma register`` and a chip in a study.  ``failed`` when any of

* no tile has evidence, or the coverage is under :data:`COVERAGE_FAILED`;
* the edge similarity after registration (:func:`soma_cli.qa.gradient_nccs`: NCC of the
  gradient magnitudes of reference and moving image) is below the input's by more than
  :data:`SIMILARITY_DROP`: the result is worse than doing nothing;
* with the error estimate (:mod:`soma_cli.check`), its median over the trusted tiles exceeds
  :data:`ERROR_FAILED_PX`: the matcher's answer is not even consistent with itself;

``doubtful`` when any of

* the coverage is under :data:`COVERAGE_DOUBTFUL`;
* some tiles had no evidence and followed the trusted fit;
* more than :data:`REPAIRED_DOUBTFUL` of the pixels were repaired towards the scene prior;
* with the error estimate, its median over the trusted tiles exceeds :data:`ERROR_DOUBTFUL_PX`, or
  more than :data:`OVER_3PX_DOUBTFUL` of them are estimated above 3 px (blocks of large errors);

``ok`` otherwise.  The thresholds were chosen on T11SMT (the first six pairs) and checked on the
held-out tile T11SLT; docs/register.md gives the numbers.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from .tiling import Tile

#: a tile (or a scene) with evidence on fewer of its pixels has none: unrelated chips reached at
#: most 7 % (network) and 6 % (gradient) on T11SMT, correct ones at least 17 %
TILE_EVIDENCE = 0.10
#: a scene with less coverage is failed (the same level as a tile: below it nothing is trusted)
COVERAGE_FAILED = TILE_EVIDENCE
#: a scene with less coverage is doubtful: on T11SMT every chip of the network under it was
#: wrong by more than 3 px, and the gradient matcher's chips under it by more than 1 px
COVERAGE_DOUBTFUL = 0.25
#: edge similarity may fall by this much before the result counts as worse than the input: a
#: margin for the score's noise (on T11SMT every correct chip gained at least 0.017)
SIMILARITY_DROP = 0.01
#: more repaired pixels than this: the flow is mostly the smooth prior, not the matcher's own (on
#: T11SMT the gradient matcher repaired 14-69 % of correct chips and 58-82 % of wrong ones; the
#: network, none)
REPAIRED_DOUBTFUL = 0.6
#: a median estimated error above this fails the scene: on T11SMT (the network, 32 chips of 512 px
#: under the geo and paper deformations) all 5 cases above it were wrong by more than 3 px (relative
#: RMSE), and none of the 46 right within 1 px was above it
ERROR_FAILED_PX = 3.0
#: a median estimated error above this makes the scene doubtful: 8 of the 9 such cases on T11SMT
#: were wrong by more than 3 px, 1 was right within 1 px
ERROR_DOUBTFUL_PX = 1.0
#: a larger share of the trusted pixels estimated above 3 px makes the scene doubtful (on T11SMT, 8
#: of the 9 such cases were wrong by more than 3 px)
OVER_3PX_DOUBTFUL = 0.25

STATUSES = ("ok", "doubtful", "failed")


def coverage(certainty: np.ndarray, level: float, valid: Optional[np.ndarray] = None) -> float:
    """Share of the ``valid`` pixels (default: all) whose ``certainty`` reaches ``level`` (0 without any)."""
    c = np.asarray(certainty)
    c = c if valid is None else c[np.asarray(valid, bool)]
    return float(np.count_nonzero(c >= level)) / c.size if c.size else 0.0


class TileEvidence:
    """The evidence of each tile of a layout over an ``height x width`` area, recorded as the
    tiles are matched, and where the trusted tiles lie."""

    def __init__(self, height: int, width: int, level: float):
        self.height, self.width, self.level = height, width, float(level)
        self.tiles: List[Tile] = []
        self.coverage: List[float] = []
        self.pixels: List[int] = []

    def record(self, tile: Tile, certainty: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Record a matched tile; return its certainty, all 0 when the tile has no evidence."""
        cov = coverage(certainty, self.level, valid)
        self.tiles.append(tile)
        self.coverage.append(cov)
        self.pixels.append(int(np.count_nonzero(valid)))
        return certainty if cov >= TILE_EVIDENCE else np.zeros_like(certainty)

    def trusted(self) -> np.ndarray:
        """Per recorded tile: has it evidence?"""
        return np.asarray(self.coverage, np.float64) >= TILE_EVIDENCE

    def trusted_rows(self, row0: int, h: int) -> np.ndarray:
        """``(h, width)`` bool: the area rows ``[row0, row0 + h)`` covered by a trusted tile."""
        out = np.zeros((h, self.width), bool)
        for t, ok in zip(self.tiles, self.trusted()):
            r0, r1 = max(t.row, row0), min(t.row + t.height, row0 + h)
            if ok and r1 > r0:
                out[r0 - row0:r1 - row0, t.cols] = True
        return out


def _pct(share: float) -> str:
    return f"{100 * share:.1f} %"


def judge(coverage: float, similarity_before: float, similarity_after: float, repaired_share: float = 0.0,
          tile_coverage: Sequence[float] = (), tile_pixels: Optional[Sequence[int]] = None,
          estimated_error: Optional[Dict[str, float]] = None) -> Dict[str, object]:
    """The verdict (rules in the module docstring) on a registration described by

    ``coverage``            share of the overlap with evidence (in trusted tiles);
    ``similarity_before``, ``similarity_after``
                            edge similarity of the input and of the result (NaN: not measurable,
                            the rule is skipped);
    ``repaired_share``      share of the pixels repaired towards the scene prior;
    ``tile_coverage``       per tile, the share of its valid pixels with evidence (empty: one tile
                            with ``coverage``), ``tile_pixels`` its valid pixels (default: equal);
    ``estimated_error``     :func:`soma_cli.check.summary` over the trusted tiles (None: no check;
                            NaN statistics: no estimate, the rules are skipped).

    Returns ``status``, ``reason`` (one line: every rule that fired, or what makes it ok) and the
    statistics: ``coverage``, ``trusted_share``, ``similarity_before``, ``similarity_after``,
    ``repaired_share``, ``tiles``, ``tile_failures``, and ``estimated_error`` as given (when given).
    """
    cov_t = np.asarray(tile_coverage if len(tile_coverage) else [coverage], np.float64)
    px = np.ones_like(cov_t) if tile_pixels is None else np.asarray(tile_pixels, np.float64)
    scored = px > 0
    trusted = scored & (cov_t >= TILE_EVIDENCE)
    trusted_share = float(px[trusted].sum() / px[scored].sum()) if scored.any() else 0.0
    failures = int(np.count_nonzero(scored & ~trusted))
    sb, sa = float(similarity_before), float(similarity_after)
    failed, doubtful = [], []
    if not trusted.any():
        best = float(cov_t[scored].max()) if scored.any() else 0.0
        failed.append(f"no evidence: no tile is certain on {100 * TILE_EVIDENCE:.0f} % of its pixels (at best "
                      f"{_pct(best)})")
    elif coverage < COVERAGE_FAILED:
        failed.append(f"too little evidence: the matcher is certain on {_pct(coverage)} of the overlap")
    elif coverage < COVERAGE_DOUBTFUL:
        doubtful.append(f"little evidence: the matcher is certain on {_pct(coverage)} of the overlap")
    if math.isfinite(sb) and math.isfinite(sa) and sa < sb - SIMILARITY_DROP:
        failed.append(f"edge similarity fell from {sb:.3f} to {sa:.3f}")
    if trusted.any() and failures:
        doubtful.append(f"{failures} of {int(scored.sum())} tiles had no evidence and followed the trusted "
                        f"{_pct(trusted_share)}")
    if repaired_share > REPAIRED_DOUBTFUL:
        doubtful.append(f"{_pct(repaired_share)} of the flow repaired towards the scene prior")
    med = float((estimated_error or {}).get("median_px", math.nan))
    over3 = float((estimated_error or {}).get("share_over_3px", math.nan))
    if trusted.any() and med > ERROR_FAILED_PX:
        failed.append(f"estimated error {med:.2f} px (median over the trusted tiles)")
    elif trusted.any() and (med > ERROR_DOUBTFUL_PX or over3 > OVER_3PX_DOUBTFUL):
        doubtful.append(f"estimated error {med:.2f} px (median), {_pct(over3)} of the trusted tiles above 3 px")
    status = "failed" if failed else "doubtful" if doubtful else "ok"
    if failed or doubtful:
        reason = "; ".join(failed + doubtful)
    else:
        reason = f"certain on {_pct(coverage)} of the overlap"
        reason += (f", edge similarity {sb:.3f} -> {sa:.3f}" if math.isfinite(sb) and math.isfinite(sa)
                   else ", no edges to compare")
    return {"status": status, "reason": reason, "coverage": float(coverage), "trusted_share": trusted_share,
            "similarity_before": sb, "similarity_after": sa, "repaired_share": float(repaired_share),
            "tiles": int(scored.sum()), "tile_failures": failures,
            **({} if estimated_error is None else {"estimated_error": estimated_error})}
