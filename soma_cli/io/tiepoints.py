"""The tie point GeoPackage (pyogrio: the one module that imports it).

One point layer, :data:`LAYER`, in the reference CRS (no CRS for images without georeferencing,
whose x, y are then image coordinates), one feature per tie point at its reference pixel centre,
with the fields of :data:`soma_cli.tiepoints.FIELDS` (their descriptions in the layer metadata).
Written to a temporary file in the destination folder and renamed into place when complete.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from pyogrio import raw
from pyogrio.errors import DataLayerError, DataSourceError

from ..atomic import discard, temp_path
from ..errors import OutputError
from ..tiepoints import FIELDS, TiePoints

LAYER = "tiepoints"
DESCRIPTION = ("SOMA tie points: reference pixel (col, row) matches the moving image at (col + dx_px, row + dy_px); "
               "NULL est_error: no error estimate")

#: OGC well-known binary of a 2D point, little-endian: byte order 1, geometry type 1, x, y
_WKB_POINT = np.dtype([("order", "u1"), ("type", "<u4"), ("x", "<f8"), ("y", "<f8")])


def _points_wkb(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    rec = np.zeros(x.size, _WKB_POINT)
    rec["order"], rec["type"], rec["x"], rec["y"] = 1, 1, x, y
    return np.array([r.tobytes() for r in rec], dtype=object)


def write_tiepoints(dest: Path, points: TiePoints, crs=None) -> Path:
    """Write ``points`` to the GeoPackage ``dest`` in ``crs`` (a rasterio CRS, or ``None``)."""
    dest = Path(dest)
    tmp = temp_path(dest, ".gpkg")
    try:
        with warnings.catch_warnings():  # no CRS is deliberate for images without georeferencing
            warnings.filterwarnings("ignore", message="'crs' was not provided", category=UserWarning)
            raw.write(tmp, _points_wkb(points.x, points.y), points.columns(), [name for name, _ in FIELDS],
                      layer=LAYER, driver="GPKG", geometry_type="Point",
                      crs=crs.to_wkt() if crs is not None else None, nan_as_null=True,
                      layer_options={"DESCRIPTION": DESCRIPTION}, layer_metadata=dict(FIELDS))
        os.replace(tmp, dest)
    except (DataSourceError, DataLayerError) as exc:
        raise OutputError(f"cannot write {dest}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from None
    finally:
        for extra in ("", "-journal", "-wal", "-shm"):
            discard(Path(f"{tmp}{extra}"))
    return dest

