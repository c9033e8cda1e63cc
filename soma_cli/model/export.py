"""TorchScript export of a training checkpoint (the one place that calls ``torch.jit.script``).

Writes ``NAME.pt`` and the metadata ``NAME.json`` that :mod:`soma_cli.model.loader` checks: sha256 of
the ``.pt``, package version, parameter count, tile sizes, preprocessing, training provenance and
the network's :class:`~soma_cli.model.config.SomaConfig` (``"config"``).
"""

from __future__ import annotations

import datetime
import hashlib
import io
from pathlib import Path

import torch

from .. import __version__, atomic
from ..errors import ConfigError, OutputError
from ..preprocess import PREPROCESSING
from . import loader
from .checkpoint import network, read_checkpoint
from .config import TILE_MULTIPLE
from .net import n_params

#: Tile size the network is trained and benchmarked at (recorded for the user).
RECOMMENDED_TILE = 512


def export(checkpoint: Path, out_path: Path, overwrite: bool = False, training_data: str = "",
           training_command: str = "") -> dict:
    """TorchScript-compile a checkpoint (on CPU), write ``out_path`` and its metadata JSON atomically,
    verify by reloading through the loader; returns the metadata."""
    out_path = Path(out_path)
    meta_path = loader.metadata_path(out_path)
    if out_path.suffix != ".pt":
        raise ConfigError(f"{out_path}: the weights file name must end in .pt")
    if not out_path.parent.is_dir():
        raise OutputError(f"{out_path.parent}: output folder does not exist")
    if (out_path.exists() or meta_path.exists()) and not overwrite:
        raise OutputError(f"{out_path} exists (use --overwrite)")
    ck = read_checkpoint(checkpoint)
    model = network(ck, checkpoint)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    data = buf.getvalue()
    meta = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "version": __version__,
        "arch": "SomaNet",
        "params": n_params(model),
        "tile_multiple": TILE_MULTIPLE,
        "recommended_tile": RECOMMENDED_TILE,
        "preprocessing": PREPROCESSING,
        "training_data": training_data,
        "training_command": training_command,
        "training_step": ck.get("step"),
        "validation": ck.get("val"),
        "date": datetime.date.today().isoformat(),
        "config": model.config.to_dict(),
    }
    atomic.write_bytes(out_path, data)
    atomic.write_json(meta_path, meta)
    loaded, _ = loader.load_weights(out_path, device="cpu")
    x = torch.zeros(1, 1, 64, 64)
    loaded(x, x)
    return meta
