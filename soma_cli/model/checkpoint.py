"""Training checkpoints: ``torch.save`` of a dict with the eager network's ``state_dict`` under
``"model"`` and its :class:`~soma_cli.model.config.SomaConfig` under ``"model_config"``, plus
whatever training records beside them (step, validation, optimizer state, ...)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Dict

import torch

from .. import atomic
from ..errors import WeightsError
from .config import SomaConfig
from .net import SomaNet


def save_checkpoint(path: Path, model: SomaNet, **fields: Any) -> None:
    """Write ``{"model": state_dict (CPU), "model_config": model.config, **fields}`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save({"model": state, "model_config": model.config.to_dict(), **fields}, buf)
    atomic.write_bytes(Path(path), buf.getvalue())


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """The checkpoint dict, its ``model_config`` as a :class:`SomaConfig`; :class:`WeightsError` when
    the file is missing or not a SOMA checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: checkpoint not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        ck["model_config"] = SomaConfig.from_dict(ck["model_config"])
        if not isinstance(ck["model"], dict):
            raise TypeError("no state_dict under 'model'")
    except Exception as exc:
        raise WeightsError(f"{path}: not a SOMA training checkpoint ({type(exc).__name__}: {exc})") from None
    return ck


def network(ck: Dict[str, Any], path: Path) -> SomaNet:
    """The eager network (eval mode) of a :func:`read_checkpoint` dict read from ``path``."""
    model = SomaNet(ck["model_config"])
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as exc:
        raise WeightsError(f"{path}: its weights do not fit its network ({exc})") from None
    return model.eval()


def load_model_checkpoint(path: Path) -> SomaNet:
    """The eager network (eval mode) of a checkpoint written by training or :func:`save_checkpoint`."""
    return network(read_checkpoint(path), path)
