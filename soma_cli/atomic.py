"""Atomic file writes and JSON conversion shared by every writer of the package (no rasterio).

A file is written to a hidden temporary file in its destination folder and renamed into place
only when complete, so an interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
from pathlib import Path
from typing import Callable

import numpy as np


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(fh)`` into a temp file of the same folder, then rename."""
    path = Path(path)
    # not mkstemp: its 0600 mode would leak into the product; "x" mode keeps the umask default
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def to_jsonable(x):
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: Path, obj) -> Path:
    """Atomically write ``obj`` as JSON (NaN/inf -> null, numpy -> Python)."""
    data = json.dumps(to_jsonable(obj), indent=2, allow_nan=False).encode()
    return atomic_write(path, lambda fh: fh.write(data))


def write_bytes(path: Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda fh: fh.write(data))
