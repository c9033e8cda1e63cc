"""The scene's rotation, found once on a few seed tiles, so that each tile's global search tries
that one rotation (numpy only).

The network's global stage (:class:`soma_cli.model.stages.GlobalSearch`) tries 11 rotations on
every tile and verifies the best three by their window support: about 6 % of a tile's time.
Between a SAR scene resampled onto an optical grid and that grid, the rotation is one number for
the whole scene (terrain and orbit errors shift pixels; they do not turn them), so ``soma
register`` asks the matcher for the rotation on :data:`GRID` x :data:`GRID` seed tiles spread over
the layout and, when most of them pick the same one, every tile searches that rotation only, over
the full translation range (local shifts are still found per tile).  Seeds that disagree leave
every tile to search all rotations.  A tile whose own search would pick the scene's rotation gets
the same answer either way.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from . import tiling

#: Seed tiles per side: rows of the layout, and tiles in each of those rows.
GRID = 3
#: Layouts with fewer tiles search every rotation on every tile: there the seed pass (about as long
#: as a tile's global stage and coarse encodings, on GRID x GRID tiles) would cost what it saves.
MIN_TILES = 49
#: The share of the usable seeds that must pick the same rotation.
AGREE = 2.0 / 3.0
#: A seed is usable when this share of its pixels is valid in both images.
MIN_VALID = 0.5


def seeds(tiles: Sequence[tiling.Tile]) -> List[tiling.Tile]:
    """Up to ``GRID x GRID`` tiles of a row-major layout: evenly spaced rows, and evenly spaced
    tiles within each (the first and last included)."""
    rows = list(tiling.rows_of(list(tiles)))

    def spread(n: int) -> List[int]:
        return sorted({round(i * (n - 1) / (GRID - 1)) for i in range(GRID)}) if n > 1 else [0]

    return [rows[i][j] for i in spread(len(rows)) for j in spread(len(rows[i]))]


def agreed(rotations: Sequence[float], valid_shares: Sequence[float]) -> Optional[float]:
    """The rotation (degrees) that at least :data:`AGREE` of the usable seeds picked, or None
    (fewer than 3 usable seeds, or no such majority)."""
    usable = np.array([r for r, v in zip(rotations, valid_shares) if v >= MIN_VALID and np.isfinite(r)])
    if usable.size < 3:
        return None
    values, counts = np.unique(np.round(usable, 6), return_counts=True)
    best = int(counts.argmax())
    return float(values[best]) if counts[best] >= AGREE * usable.size else None
