"""Loading the shipped TorchScript weights (the one place that calls ``torch.jit.load``).

A weights file ``NAME.pt`` comes with ``NAME.json`` beside it (written by :mod:`.export`): ``sha256``
of the ``.pt``, ``version``, ``tile_multiple``, ``recommended_tile``, ``preprocessing``
(:data:`preprocess.PREPROCESSING`), training data/command/date, and the network's ``config``
(:class:`~soma_cli.model.config.SomaConfig`).  Anything missing, corrupt or mismatched raises
:class:`WeightsError`.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Optional, Tuple

import torch

from .. import __version__
from ..errors import WeightsError
from .config import SomaConfig

WEIGHTS_NAME = f"soma-{__version__}.pt"
ENV_VAR = "SOMA_WEIGHTS"


def metadata_path(weights: Path) -> Path:
    return Path(weights).with_suffix(".json")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_weights_path() -> Path:
    """``$SOMA_WEIGHTS`` if set, else ``weights/soma-<version>.pt`` of the source tree (editable
    install or clone), else the copy installed with the package (``soma_cli/weights/``)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    source_tree = Path(__file__).resolve().parents[2] / "weights" / WEIGHTS_NAME
    if source_tree.is_file():
        return source_tree
    return Path(str(resources.files("soma_cli") / "weights" / WEIGHTS_NAME))


def read_metadata(weights: Path) -> dict:
    meta_path = metadata_path(weights)
    if not meta_path.is_file():
        raise WeightsError(f"{weights}: metadata file {meta_path.name} is missing beside it")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{meta_path}: unreadable metadata ({exc})") from None
    if not isinstance(meta, dict) or "sha256" not in meta:
        raise WeightsError(f"{meta_path}: metadata has no sha256")
    for key in ("tile_multiple", "config"):
        if key not in meta:
            raise WeightsError(f"{meta_path}: metadata has no {key}")
    return meta


def weights_config(meta: dict, weights: Path) -> SomaConfig:
    """The network configuration recorded in the metadata of ``weights``, validated."""
    try:
        return SomaConfig.from_dict(meta["config"])
    except ValueError as exc:
        raise WeightsError(f"{metadata_path(weights)}: invalid network {exc}") from None


def load_weights(path: Optional[Path] = None, device: str = "cpu") -> Tuple[torch.jit.ScriptModule, dict]:
    """Load a TorchScript SOMA model after checking its metadata (sha256, network configuration);
    returns ``(model, metadata)``."""
    weights = Path(path) if path is not None else default_weights_path()
    if not weights.is_file():
        raise WeightsError(f"{weights}: weights file not found (pass --weights or set {ENV_VAR})")
    meta = read_metadata(weights)
    weights_config(meta, weights)
    digest = sha256_file(weights)
    if digest != meta["sha256"]:
        raise WeightsError(f"{weights}: sha256 mismatch (file {digest[:12]}..., metadata "
                           f"{str(meta['sha256'])[:12]}...): corrupt or replaced weights")
    try:
        model = torch.jit.load(str(weights), map_location=device)
    except Exception as exc:
        raise WeightsError(f"{weights}: cannot load TorchScript model ({type(exc).__name__})") from None
    model.eval()
    return model, meta
