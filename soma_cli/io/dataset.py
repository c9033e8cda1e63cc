"""Datasets of co-registered pairs laid out as ``DATA_DIR/sar/NAME.tif`` + ``DATA_DIR/opt/NAME.tif``.

Without ``pairs.csv`` the two folders are scanned for rasters with a known extension
(:data:`EXTENSIONS`: GeoTIFF, PNG, JPEG, JPEG 2000), so chip datasets such as SEN1-2's PNGs work
as they are; georeferencing is not needed.

``pairs.csv`` (optional) has at least ``id`` and may carry ``sar``/``opt`` relative paths and an
``s2_scene`` column used for splits (for example ``T11SLT`` vs ``T11SMT`` in s1s2_calif).
"""

from __future__ import annotations

import csv
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from rasterio.errors import RasterioError

from ..errors import DataError
from . import open_quietly

EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".jp2")


@dataclass(frozen=True)
class PairEntry:
    name: str
    sar: Path
    opt: Path
    meta: Dict[str, str] = field(default_factory=dict)

    def group(self) -> str:
        """Split key: the S2 tile (e.g. ``T11SLT``) when pairs.csv names it, else ``all``."""
        scene = self.meta.get("s2_scene", "")
        for part in scene.split("_"):
            if len(part) == 6 and part.startswith("T") and part[1:3].isdigit():
                return part
        return "all"


def list_pairs(data_dir: Path, groups: Optional[Sequence[str]] = None) -> List[PairEntry]:
    """List and validate the pairs of ``data_dir``; optional filter on :meth:`PairEntry.group`."""
    data_dir = Path(data_dir)
    sar_dir, opt_dir = data_dir / "sar", data_dir / "opt"
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: not a directory")
    if not sar_dir.is_dir() or not opt_dir.is_dir():
        raise DataError(f"{data_dir}: expected sub-folders sar/ and opt/")
    entries: List[PairEntry] = []
    csv_path = data_dir / "pairs.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as fh:
            for row in csv.DictReader(fh):
                name = (row.get("id") or "").strip()
                if not name:
                    raise DataError(f"{csv_path}: a row has no id")
                sar = data_dir / (row.get("sar") or f"sar/{name}.tif")
                opt = data_dir / (row.get("opt") or f"opt/{name}.tif")
                entries.append(PairEntry(name, sar, opt, dict(row)))
    else:
        sars = _scan(sar_dir)
        opts = _scan(opt_dir)
        for name in sorted(set(sars) | set(opts)):
            suffix = (sars.get(name) or opts[name]).suffix
            entries.append(PairEntry(name, sars.get(name, sar_dir / f"{name}{suffix}"),
                                     opts.get(name, opt_dir / f"{name}{suffix}")))
    for e in entries:
        for p in (e.sar, e.opt):
            if not p.is_file():
                raise DataError(f"pair {e.name}: missing partner file {p}")
    if groups:
        entries = [e for e in entries if e.group() in set(groups)]
    if not entries:
        if groups:
            raise DataError(f"{data_dir}: no pairs found in group(s) {', '.join(groups)}")
        raise DataError(f"{data_dir}: no pairs found (sar/NAME and opt/NAME rasters, "
                        f"{' '.join(EXTENSIONS)}, or a pairs.csv)")
    return entries


def _scan(folder: Path) -> Dict[str, Path]:
    """``{stem: path}`` of the rasters in ``folder``; two files with one stem are ambiguous."""
    out: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in EXTENSIONS or not p.is_file():
            continue
        if p.stem in out:
            raise DataError(f"{folder}: both {out[p.stem].name} and {p.name} could be pair {p.stem}")
        out[p.stem] = p
    return out


@dataclass
class PairArrays:
    name: str
    sar: np.ndarray  # (H, W) as stored
    opt: np.ndarray  # (C, H, W) as stored
    sar_valid: np.ndarray  # bool (H, W)
    opt_valid: np.ndarray  # bool (H, W)


@contextmanager
def _open_both(entry: PairEntry):
    """Both rasters of a pair, opened; unreadable files and different sizes are :class:`DataError` s."""
    try:
        with ExitStack() as stack:
            s = stack.enter_context(open_quietly(entry.sar))  # chips (PNG, JPEG) carry no georeferencing
            o = stack.enter_context(open_quietly(entry.opt))
            if (s.height, s.width) != (o.height, o.width):
                raise DataError(
                    f"pair {entry.name}: sizes differ (sar {s.width}x{s.height}, opt {o.width}x{o.height})"
                )
            yield s, o
    except RasterioError as exc:
        raise DataError(f"pair {entry.name}: cannot read ({exc})") from None


def pair_size(entry: PairEntry) -> Tuple[int, int]:
    """Height and width of a pair from the file headers (the sizes must agree)."""
    with _open_both(entry) as (s, _):
        return s.height, s.width


def read_pair(entry: PairEntry) -> PairArrays:
    """Read a whole pair (first SAR band, all optical bands) with its validity masks."""
    with _open_both(entry) as (s, o):
        sar = s.read(1)
        sar_valid = s.read_masks(1) > 0
        opt = o.read()
        opt_valid = o.dataset_mask() > 0
    return PairArrays(entry.name, sar, opt, sar_valid, opt_valid)
