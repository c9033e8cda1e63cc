"""Raster input/output (rasterio only) and the tie point GeoPackage (:mod:`.tiepoints`, pyogrio only)."""

from __future__ import annotations

import warnings

import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning

from ..errors import ConfigError

#: The ``--resampling`` names (those of :data:`soma_cli.coords.SPLINE_ORDERS`) as rasterio's.
RESAMPLING = {"nearest": Resampling.nearest, "bilinear": Resampling.bilinear, "cubic": Resampling.cubic}


def resampling(name: str) -> Resampling:
    """rasterio's resampling for a ``--resampling`` name."""
    try:
        return RESAMPLING[name]
    except KeyError:
        raise ConfigError(f"--resampling must be one of {', '.join(RESAMPLING)} (got {name!r})") from None


def open_quietly(path, mode: str = "r", **kwargs):
    """``rasterio.open`` without rasterio's not-georeferenced warning: image chips, scratch files
    and the outputs of non-georeferenced inputs have no georeferencing, and users would otherwise
    see the warning on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, mode, **kwargs)
