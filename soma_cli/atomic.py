"""Atomic file writes and the JSON helpers shared by every reader and writer of the package (no rasterio).

A file is written to a hidden temporary file in its destination folder (:func:`temp_path`) and
renamed into place only when complete, so an interrupted run never leaves a half-written file
under the final name.  The rasters of :mod:`soma_cli.io.write` use the same temporary names.
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


def temp_path(path: Path, suffix: str = "") -> Path:
    """A hidden, unique temporary name beside ``path``: ``.NAME.PID.HEX.tmp`` + ``suffix``.

    The file is not created: the writer creates it, so it gets the umask's default permissions
    (``mkstemp``'s 0600 would leak into the product)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"


def discard_own_temps(folders) -> None:
    """Delete this process's temporary files (:func:`temp_path` names them ``.NAME.PID.HEX.tmp...``)
    in ``folders``."""
    for folder in folders:
        for tmp in Path(folder).glob(f".*.{os.getpid()}.*.tmp*"):
            tmp.unlink(missing_ok=True)


def discard(path: Path) -> None:
    """Delete a temporary file if it is there (cleanup: a failure to delete is not an error)."""
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Write ``path`` through ``write(fh)`` into a temp file of the same folder, then rename."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as fh:  # "x": never clobber, even on a name clash
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        discard(tmp)
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


def read_json(path: Path):
    """The JSON value stored in ``path``, or ``None`` when it is missing, unreadable or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_bytes(path: Path, data: bytes) -> Path:
    """Atomically write ``data`` to ``path``."""
    return atomic_write(path, lambda fh: fh.write(data))
