"""``--method auto``: the network, and on the tiles its check finds unreliable the ``gradient``
matcher too, keeping per tile the answer with the lower estimated error (:mod:`soma_cli.check`).

The network's flow is checked on every tile (one more network pass); a tile whose
:func:`~soma_cli.check.tile_error` exceeds :data:`RETRY_PX` is matched and checked with
``gradient`` (two passes of it), and takes ``gradient``'s answer when that one's tile error is
lower.  ``gradient``'s certainty is mapped onto the network's scale (its evidence level onto the
network's, linearly on either side), so that the evidence rules of :mod:`soma_cli.verdict` hold
for both.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .. import check
from . import evidence_certainty, min_size, trust_certainty

#: a tile whose estimated error (:func:`~soma_cli.check.tile_error`) exceeds this many pixels is
#: tried with ``gradient`` too: on T11SMT, 0.5 px tried twice as many geo chips for no gain
#: (benchmarks/check_validation.py)
RETRY_PX = 1.0


def rescale_certainty(cert: np.ndarray, level_from: float, level_to: float) -> np.ndarray:
    """Map certainties in [0, 1] piecewise linearly so that ``level_from`` becomes ``level_to``."""
    c = np.clip(np.asarray(cert, np.float32), 0.0, 1.0)
    return np.where(c < level_from, c * (level_to / level_from),
                    level_to + (c - level_from) * ((1.0 - level_to) / (1.0 - level_from))).astype(np.float32)


def choose(network_error: float, fallback_error: Optional[float]) -> bool:
    """Does a tile take the fallback's answer?  Only when it was tried (the network's tile error
    above :data:`RETRY_PX`) and its tile error is lower (a NaN error loses)."""
    if fallback_error is None or not np.isfinite(fallback_error):
        return False
    return not np.isfinite(network_error) or fallback_error < network_error


def needs_fallback(network_error: float, retry_px: float = RETRY_PX) -> bool:
    """Is a tile with the network's tile error ``network_error`` tried with the fallback?"""
    return not np.isfinite(network_error) or network_error > retry_px


class AutoMatcher:
    """The matcher contract of :mod:`soma_cli.matchers` over a ``network`` and a ``fallback``
    matcher; :meth:`checked_match` also returns the estimated error of the answer kept."""

    name = "auto"

    def __init__(self, network, fallback):
        self.network, self.fallback = network, fallback
        self.trust_certainty = trust_certainty(network)
        self.evidence_certainty = evidence_certainty(network)
        self.min_size = max(min_size(m) for m in (network, fallback))
        self.fallback_tiles = 0  # tiles that took the fallback's answer, over the matcher's life

    @property
    def metadata(self) -> dict:
        """The network's weights metadata (recorded in the QA summary)."""
        return getattr(self.network, "metadata", {}) or {}

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        flow, cert, _ = self.checked_match(opt, sar, opt_valid, sar_valid)
        return flow, cert

    def checked_match(self, opt, sar, opt_valid=None, sar_valid=None):
        flow, cert, est = check.checked_match(self.network, opt, sar, opt_valid, sar_valid)
        scores = [check.tile_error(e) for e in est]
        retry = [i for i, s in enumerate(scores) if needs_fallback(s)]
        if not retry:
            return flow, cert, est
        def sub(a):
            return None if a is None else np.asarray(a)[retry]

        f_g, c_g, e_g = check.checked_match(self.fallback, sub(opt), sub(sar), sub(opt_valid), sub(sar_valid))
        c_g = rescale_certainty(c_g, evidence_certainty(self.fallback), self.evidence_certainty)
        flow, cert, est = flow.copy(), cert.copy(), est.copy()
        for k, i in enumerate(retry):
            if choose(scores[i], check.tile_error(e_g[k])):
                flow[i], cert[i], est[i] = f_g[k], c_g[k], e_g[k]
                self.fallback_tiles += 1
        return flow, cert, est
