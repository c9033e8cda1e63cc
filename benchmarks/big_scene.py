"""Build a Sentinel-2-tile-sized (10980 x 10980) SAR/optical scene and score a registration of it.

    python benchmarks/big_scene.py make DIR [--size 10980]   # DIR/opt.tif, DIR/sar.tif, DIR/sar_undeformed.tif
    python benchmarks/big_scene.py score DIR/flow.tif [--f0 DIR/flow0.tif]

The scene is a mosaic of the shared s1s2_calif pairs (1024 px tiles, reused in order), and the SAR
mosaic is deformed by a known smooth field D (a translation plus long-wavelength sinusoids, up to
about 5 px): content at optical pixel q sits in the SAR at q + D(q).  Everything is streamed in
strips, so building the scene needs little memory too.

``score`` compares the flow with D (absolute: this includes the source pairs' own residual
misregistration, several px in x in hilly pairs).  With ``--f0``, the flow of the undeformed
mosaic, it also gives the relative error against ``F0(q) + D(q + F0(q))``, in which that residual
cancels (the self-consistency metric of ``soma evaluate``).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from soma_cli import coords

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "s1s2_calif"
TILE = 1024


def field(x: np.ndarray, y: np.ndarray):
    """The ground-truth flow D at pixel centres (x, y) of the optical grid."""
    dx = 2.0 + 3.0 * np.sin(2 * math.pi * x / 4000.0 + 0.3) * np.cos(2 * math.pi * y / 5000.0)
    dy = -1.5 + 2.5 * np.cos(2 * math.pi * x / 4500.0) * np.sin(2 * math.pi * y / 3500.0 + 1.0)
    return dx, dy


def inverse(px: np.ndarray, py: np.ndarray, iters: int = 12):
    """G with S'(p) = S(p + G(p)): solve q + D(q) = p for q by fixed point."""
    qx, qy = px.copy(), py.copy()
    for _ in range(iters):
        dx, dy = field(qx, qy)
        qx, qy = px - dx, py - dy
    return qx - px, qy - py


def make(out: Path, size: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    names = sorted(p.stem for p in (DATA / "sar").glob("*.tif"))
    n = int(math.ceil(size / TILE))
    t = from_origin(-13000000.0, 4100000.0, 10.0, 10.0)
    prof = dict(driver="GTiff", width=size, height=size, crs="EPSG:3395", transform=t, dtype="uint8",
                tiled=True, blockxsize=512, blockysize=512, compress="deflate", BIGTIFF="IF_SAFER")
    flat = out / "sar_undeformed.tif"
    if (out / "opt.tif").is_file() and flat.is_file() and (out / "sar.tif").is_file():
        return
    with rasterio.open(out / "opt.tif", "w", count=3, **prof) as o, rasterio.open(flat, "w", count=1, **prof) as s:
        k = 0
        for i in range(n):
            for j in range(n):
                name = names[k % len(names)]
                k += 1
                h, w = min(TILE, size - i * TILE), min(TILE, size - j * TILE)
                win = Window(j * TILE, i * TILE, w, h)
                with rasterio.open(DATA / "opt" / f"{name}.tif") as src:
                    o.write(src.read(window=Window(0, 0, w, h)), window=win)
                with rasterio.open(DATA / "sar" / f"{name}.tif") as src:
                    s.write(src.read(window=Window(0, 0, w, h)), window=win)
    margin = 16
    with rasterio.open(flat) as s, rasterio.open(out / "sar.tif", "w", count=1, nodata=0, **prof) as d:
        for r0 in range(0, size, 512):
            h = min(512, size - r0)
            a, b = max(r0 - margin, 0), min(r0 + h + margin, size)
            src = s.read(1, window=Window(0, a, size, b - a)).astype(np.float32)
            g = coords.base_grid_np(h, size, np.float64)
            gx, gy = inverse(g[0], g[1] + r0)
            flow = np.stack([gx, gy + (r0 - a)]).astype(np.float32)
            warped = coords.warp_np(src, flow, order=1, cval=0.0)
            d.write(np.clip(np.rint(warped), 1, 255).astype(np.uint8)[None], window=Window(0, r0, size, h))


def _report(label: str, e: np.ndarray) -> None:
    print(f"{label} over {e.size} sampled pixels: RMSE {np.sqrt(np.mean(e**2)):.3f} px, "
          f"median {np.median(e):.3f} px, share < 1 px {np.mean(e < 1):.3f}, share < 2 px {np.mean(e < 2):.3f}")


def score(flow_path: Path, f0_path: Path = None) -> None:
    absolute, relative = [], []
    f0 = rasterio.open(f0_path) if f0_path else None
    with rasterio.open(flow_path) as f:
        for _, win in f.block_windows(1):
            fl = f.read([1, 2], window=win).astype(np.float64)
            ok = fl[0] != f.nodata
            if not ok.any():
                continue
            g = coords.base_grid_np(int(win.height), int(win.width), np.float64)
            x, y = g[0] + win.col_off, g[1] + win.row_off
            dx, dy = field(x, y)
            absolute.append(np.hypot(fl[0] - dx, fl[1] - dy)[ok][::7])
            if f0 is not None:
                a = f0.read([1, 2], window=win).astype(np.float64)
                ok0 = ok & (a[0] != f0.nodata)
                ex, ey = field(x + a[0], y + a[1])  # expected F1 = F0 + D(q + F0(q))
                relative.append(np.hypot(fl[0] - a[0] - ex, fl[1] - a[1] - ey)[ok0][::7])
    _report("absolute: flow vs. D", np.concatenate(absolute))
    if f0 is not None:
        _report("relative: flow vs. F0 + D(q + F0)", np.concatenate(relative))
        f0.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir", type=Path)
    m.add_argument("--size", type=int, default=10980)
    s = sub.add_parser("score")
    s.add_argument("flow", type=Path)
    s.add_argument("--f0", type=Path, default=None, help="flow of the undeformed mosaic")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        make(a.dir, a.size)
    else:
        score(a.flow, a.f0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
