"""Raster input/output (rasterio only)."""

from __future__ import annotations

import warnings

import rasterio
from rasterio.errors import NotGeoreferencedWarning


def open_quietly(path, mode: str = "r", **kwargs):
    """``rasterio.open`` without rasterio's not-georeferenced warning: image chips, scratch files
    and the outputs of non-georeferenced inputs have no georeferencing, and users would otherwise
    see the warning on every run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, mode, **kwargs)
