"""Two 3072 px crops of the whole-tile benchmark scene (`benchmarks/big_scene.py make`), around
the mosaic's steep-terrain pairs 129 and 059: a few-minute proxy of the whole-scene benchmark.

    python benchmarks/big_scene_crops.py make [--scene /tmp/soma_big] [--out /tmp/crop]
    for k in a b; do
      soma register /tmp/crop/${k}_sar.tif /tmp/crop/${k}_opt.tif -o /tmp/crop/${k}_al.tif --flow-out /tmp/crop/${k}_flow.tif --overwrite --quiet [--method ...] [--weights ...]
      soma register /tmp/crop/${k}_sar_undeformed.tif /tmp/crop/${k}_opt.tif -o /tmp/crop/${k}_al0.tif --flow-out /tmp/crop/${k}_flow0.tif --overwrite --quiet [--method ...] [--weights ...]
    done
    python benchmarks/big_scene_crops.py score [--out /tmp/crop]

``score`` prints the relative error (as `big_scene.py score --f0`) of each crop; the model card
quotes it for the shipped network.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parent))
from big_scene import field  # noqa: E402

REGIONS = {"a": (2048, 0, 3072), "b": (6144, 7680, 3072)}  # row, column, size


def make(scene: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for k, (r0, c0, n) in REGIONS.items():
        w = Window(c0, r0, n, n)
        for f in ("opt", "sar", "sar_undeformed"):
            with rasterio.open(scene / f"{f}.tif") as s:
                prof = s.profile.copy()
                prof.update(width=n, height=n, transform=s.window_transform(w))
                with rasterio.open(out / f"{k}_{f}.tif", "w", **prof) as d:
                    d.write(s.read(window=w))


def score(out: Path) -> None:
    for k, (r0, c0, _) in REGIONS.items():
        with rasterio.open(out / f"{k}_flow.tif") as f, rasterio.open(out / f"{k}_flow0.tif") as g:
            fl = f.read([1, 2]).astype(np.float64)
            f0 = g.read([1, 2]).astype(np.float64)
            ok = (fl[0] != f.nodata) & (f0[0] != g.nodata)
        yy, xx = np.mgrid[0:fl.shape[1], 0:fl.shape[2]]
        ex, ey = field(xx + c0 + f0[0], yy + r0 + f0[1])
        e = np.hypot(fl[0] - f0[0] - ex, fl[1] - f0[1] - ey)[ok]
        print(f"crop {k}: relative RMSE {np.sqrt(np.mean(e ** 2)):.2f} px, median {np.median(e):.3f} px, "
              f"< 1 px {100 * np.mean(e < 1):.1f} %, > 5 px {100 * np.mean(e > 5):.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["make", "score"])
    ap.add_argument("--scene", type=Path, default=Path("/tmp/soma_big"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/crop"))
    a = ap.parse_args()
    make(a.scene, a.out) if a.cmd == "make" else score(a.out)


if __name__ == "__main__":
    main()
