"""Training of the SOMA network, in two phases: :func:`prepare` builds a cache of co-registered
pairs (:mod:`.data`, needs rasterio), :func:`fit` trains on it (:mod:`.loop`, with the losses of
:mod:`.losses`; torch, numpy and scipy only).  TorchScript export of a checkpoint lives in
:mod:`soma_cli.model.export`."""

from .data import load_cache, prepare
from .loop import FitConfig, check_crop, check_only, fit

__all__ = ["FitConfig", "check_crop", "check_only", "fit", "load_cache", "prepare"]
