"""GeFolki (Plyer et al., 2015; Brigot et al., 2016) as a peer matcher: ``--method gefolki``.

Optional: ``pip install gefolki`` (or ``pip install 'soma-cli[peers]'``).  GeFolki is a dense,
pyramidal Lucas-Kanade-style flow with rank filtering; its ``GEFolki`` variant adds the local
contrast-inversion handling meant for radar/optical pairs.  It is a *local* method: it expects the
pair to be roughly aligned already (a few pixels), so it is not expected to recover the large
rotations of the ``paper`` protocol.

``GEFolki(I0, I1)`` returns ``u, v`` with ``I1(x + u, y + v) ~ I0(x, y)``; with the optical chip as
``I0`` and the SAR chip as ``I1`` that is exactly the flow convention of :mod:`soma_cli.coords`.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import numpy as np

from ..errors import ConfigError

#: GeFolki's optical/radar demo parameters with 3 pyramid levels (5-6 diverged on 512 px chips).
DEFAULTS = {"iteration": 2, "radius": tuple(range(32, 4, -4)), "rank": 4, "levels": 3}


@contextmanager
def _skimage_compat() -> Iterator[None]:
    """Run GeFolki 1.1 on scikit-image >= 0.19 (scoped; restored afterwards).

    GeFolki's bundled CLAHE indexes a lookup table with ``rescale_intensity(uint_image,
    out_range=(0, n))``, which kept the integer dtype in old scikit-image and returns float64 now
    (``IndexError: arrays used as indices must be of integer ...``).  For the duration of the call,
    the name inside ``gefolki.adapthist`` is bound to a wrapper that casts back to the input's
    integer dtype, as old scikit-image did.
    """
    from gefolki import adapthist

    original = adapthist.rescale_intensity

    def rescale_keep_int(image, *args, **kwargs):
        out = original(image, *args, **kwargs)
        if np.issubdtype(np.asarray(image).dtype, np.integer) and not np.issubdtype(out.dtype, np.integer):
            out = np.round(out).astype(np.asarray(image).dtype)
        return out

    adapthist.rescale_intensity = rescale_keep_int
    try:
        yield
    finally:
        adapthist.rescale_intensity = original


class GefolkiMatcher:
    """Matcher contract around ``gefolki.GEFolki`` (numpy, CPU, one chip at a time)."""

    name = "gefolki"

    def __init__(self, iteration: int = DEFAULTS["iteration"], radius: Sequence[int] = DEFAULTS["radius"],
                 rank: int = DEFAULTS["rank"], levels: int = DEFAULTS["levels"]):
        try:
            from gefolki import GEFolki
        except ImportError:
            raise ConfigError("gefolki is not installed: pip install gefolki") from None
        self._gefolki = GEFolki
        self.params = {"iteration": int(iteration), "radius": list(radius), "rank": int(rank),
                       "levels": int(levels)}

    def match(self, opt: np.ndarray, sar: np.ndarray, opt_valid: Optional[np.ndarray] = None,
              sar_valid: Optional[np.ndarray] = None):
        opt = np.asarray(opt, np.float64)
        sar = np.asarray(sar, np.float64)
        b, h, w = opt.shape
        flow = np.zeros((b, 2, h, w), np.float32)
        for i in range(b):
            o, s = opt[i].copy(), sar[i].copy()
            # invalid pixels are 0 after standardise (the tile median): keep them neutral
            o[~np.isfinite(o)] = 0.0
            s[~np.isfinite(s)] = 0.0
            if np.ptp(o) <= 0 or np.ptp(s) <= 0:
                continue  # flat chip: GeFolki normalises by the range and would divide by zero
            # GeFolki zeroes NaN/inf updates itself (flat windows); keep its warnings off the terminal
            with _skimage_compat(), np.errstate(divide="ignore", invalid="ignore"):
                u, v = self._gefolki(o, s, **dict(self.params))
            flow[i, 0] = u
            flow[i, 1] = v
        certainty = np.ones((b, h, w), np.float32)
        if opt_valid is not None:
            certainty *= np.asarray(opt_valid, bool)
        return flow, certainty
