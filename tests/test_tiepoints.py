"""Tie points for GIS: the GeoPackage (``--tiepoints-out``) and the GCP output (``--mode gcps``)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyogrio
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import GCPTransformer, from_origin
from rasterio.warp import reproject
from rasterio.warp import transform as warp_transform

from soma_cli import coords
from soma_cli.errors import GeoreferenceError, MatchError, OutputError
from soma_cli.pipeline import RegisterOptions, register
from soma_cli.stitch import Strip
from soma_cli.tiepoints import FIELDS, MIN_GCPS, TiePointSampler
from soma_cli.tiling import Tile

CRS = "EPSG:32611"
REF_T = from_origin(500000.0, 3800000.0, 10.0, 10.0)
#: the moving raster has its own grid: 12 m pixels, its origin 100 m west and north of the reference's
MOV_T = from_origin(499900.0, 3800100.0, 12.0, 12.0)
N = 384  # reference size: one tile, so the stub's field is the scene's


def field(h: int, w: int) -> np.ndarray:
    """A smooth known flow (reference pixels): up to 3.5 px, far from affine over the scene, and
    curved one way along any row or column, so that the midpoint test of GDAL's approximate
    transformer bounds its error (a wave along a scanline can hide from that test)."""
    r, c = np.mgrid[0:h, 0:w].astype(np.float64)
    return np.stack([2.0 + 1.5 * np.sin(2 * np.pi * r / 1000), -1.0 + np.cos(2 * np.pi * c / 900)]).astype(np.float32)


class FieldMatcher:
    """A stub matcher: :func:`field` on every tile, with a given certainty map."""

    name = "field"

    def __init__(self, certainty=lambda h, w: np.ones((h, w))):
        self.certainty = certainty

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        return (np.stack([field(h, w)] * b),
                np.stack([self.certainty(h, w)] * b).astype(np.float32))


def write(path: Path, data: np.ndarray, transform, crs=CRS) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform) as ds:
        ds.write(data)
    return path


@pytest.fixture()
def pair(tmp_path):
    """A reference (optical) image and a moving (SAR) image on another grid of the same CRS whose
    two bands are its own pixel coordinates (1000 + column, 1000 + row): bilinear resampling
    reproduces them exactly, so an output's values say where in the moving raster it sampled."""
    rng = np.random.default_rng(0)
    opt = write(tmp_path / "opt.tif", (rng.random((1, N, N)) * 1000).astype(np.float32), REF_T)
    r, c = np.mgrid[0:360, 0:360].astype(np.float32)
    sar = write(tmp_path / "sar.tif", np.stack([1000 + c, 1000 + r]), MOV_T)
    return sar, opt


def opts(pair, out: Path, **kw) -> RegisterOptions:
    """Without the check by default: the stub's field ignores the images, so the check (which
    deforms them) would find it wrong everywhere."""
    return RegisterOptions(sar=pair[0], opt=pair[1], out=out, tile_size=N, overlap=0, **{"check": False, **kw})


def test_geopackage_has_the_documented_fields_crs_and_points(tmp_path, pair):
    tp = tmp_path / "tp.gpkg"

    def half(h, w):  # certainty 0.3 on the left half, 0.9 on the right
        return np.where(np.arange(w)[None, :] < w // 2, 0.3, 0.9) * np.ones((h, 1))

    res = register(opts(pair, tmp_path / "out.tif", tiepoints_out=tp, tiepoint_step=32),
                   matcher=FieldMatcher(half))
    info = pyogrio.read_info(tp, layer="tiepoints")
    assert info["crs"] == CRS and info["geometry_type"] == "Point"
    assert list(info["fields"]) == [name for name, _ in FIELDS]
    assert info["layer_metadata"]["dx_map"] == dict(FIELDS)["dx_map"]
    _, _, wkb, values = pyogrio.raw.read(tp, layer="tiepoints")
    t = dict(zip(info["fields"], values))
    # the grid: pixels 16, 48, ..., 368 in both directions, row-major
    assert len(wkb) == 144 and res.tiepoints == {"points": 144, "reliable": 72, "gcps": None}
    assert np.array_equal(t["id"], np.arange(1, 145))
    assert np.array_equal(np.unique(t["col"]), np.arange(16, N, 32))
    assert np.array_equal(t["row"], np.repeat(np.arange(16, N, 32), 12))
    x, y = coords.pixel_to_map(REF_T, t["col"], t["row"])
    assert np.allclose(t["x"], x) and np.allclose(t["y"], y)
    pts = np.array([np.frombuffer(g[5:], "<f8") for g in wkb])  # WKB point: byte order, type, x, y
    assert np.allclose(pts, np.stack([x, y], 1))
    truth = field(N, N)[:, t["row"], t["col"]]
    assert np.allclose(t["dx_px"], truth[0], atol=1e-5) and np.allclose(t["dy_px"], truth[1], atol=1e-5)
    # north-up 10 m pixels: map displacement = 10 * dx east, -10 * dy north
    assert np.allclose(t["dx_map"], 10 * t["dx_px"]) and np.allclose(t["dy_map"], -10 * t["dy_px"])
    assert np.isnan(t["est_error"]).all()  # NULL: no error estimate without the check
    assert np.array_equal(t["reliable"], t["certainty"] >= 0.5)
    assert np.array_equal(t["reliable"], t["col"] >= N // 2)


def test_gcp_output_warped_by_tps_reproduces_the_dense_output(tmp_path, pair):
    """``--mode gcps`` and GDAL's thin-plate spline against ``--mode dense``, with the same flow."""
    dense, gcps_out = tmp_path / "dense.tif", tmp_path / "gcps.tif"
    register(opts(pair, dense), matcher=FieldMatcher())
    res = register(opts(pair, gcps_out, mode="gcps", tiepoint_step=16), matcher=FieldMatcher())
    assert res.tiepoints["gcps"] == res.tiepoints["reliable"] == 24 * 24
    with rasterio.open(gcps_out) as g, rasterio.open(pair[0]) as mov:
        assert g.transform.is_identity and g.crs is None  # georeferenced by its GCPs alone
        gcps, gcp_crs = g.gcps
        assert len(gcps) == 24 * 24 and gcp_crs == CRS
        assert np.array_equal(g.read(), mov.read())  # the moving pixels, unchanged
        warped = np.full((2, N, N), np.nan, np.float32)
        reproject(g.read(), warped, gcps=gcps, src_crs=gcp_crs, dst_transform=REF_T, dst_crs=CRS,
                  dst_nodata=np.nan, resampling=Resampling.bilinear, SRC_METHOD="GCP_TPS")
    with rasterio.open(dense) as d:
        dense_px = d.read() - 1000.0  # the moving raster's pixel each output pixel sampled
    inner = (slice(None), slice(24, N - 24), slice(24, N - 24))  # inside the outermost GCPs (8 and 376)
    # the dense output is where the flow says: the moving pixel of the map point of (c + dx, r + dy)
    r, c = np.mgrid[0:N, 0:N]
    f = field(N, N)
    expected = np.stack(coords.map_to_pixel(MOV_T, *coords.pixel_to_map(REF_T, c + f[0], r + f[1])))
    assert np.abs(dense_px - expected)[inner].max() < 1e-3
    # GDAL's thin-plate spline through the GCPs (16 px apart) follows the field to a few
    # thousandths of a pixel: a half-pixel slip in a pixel convention would show as 0.5.
    xs, ys = coords.pixel_to_map(REF_T, c, r)
    with GCPTransformer(gcps, tps=True) as tps:
        line, pixel = tps.rowcol(xs.ravel(), ys.ravel(), op=lambda v: v)
    tps_px = np.stack([np.reshape(pixel, (N, N)), np.reshape(line, (N, N))]) - 0.5  # image -> pixel-centre
    assert np.abs(tps_px - dense_px)[inner].max() < 0.01
    # GDAL's warper approximates that transformer along scanlines to 0.125 px (rasterio's fixed
    # tolerance), and bilinear resampling of these ramps adds nothing: so 0.15 px at most.
    diff = np.abs(warped - 1000.0 - dense_px)[inner]
    assert np.isfinite(diff).all()
    assert diff.max() < 0.15 and diff.mean() < 0.05


def test_gcps_of_a_moving_raster_in_another_crs(tmp_path):
    """The match goes from the reference CRS into the moving raster's CRS before its geotransform."""
    rng = np.random.default_rng(2)
    opt = write(tmp_path / "opt.tif", (rng.random((1, N, N)) * 1000).astype(np.float32), REF_T)
    (x0, x1), (y0, y1) = warp_transform(CRS, "EPSG:3857", [499800.0, 504040.0], [3800200.0, 3795960.0])
    mov_t = from_origin(x0, y0, 12.0, 12.0)
    mov_crs_size = int(np.ceil(max(x1 - x0, y0 - y1) / 12.0))
    sar = write(tmp_path / "sar.tif", (rng.random((1, mov_crs_size, mov_crs_size)) * 200).astype(np.float32),
                mov_t, crs="EPSG:3857")
    res = register(opts((sar, opt), tmp_path / "g.tif", mode="gcps", tiepoint_step=32), matcher=FieldMatcher())
    assert res.tiepoints["gcps"] == 144
    with rasterio.open(tmp_path / "g.tif") as g:
        gcps, gcp_crs = g.gcps
    assert gcp_crs == CRS
    r, c = np.mgrid[24:N - 24:7, 24:N - 24:7]
    f = field(N, N)[:, r, c]
    mx, my = warp_transform(CRS, "EPSG:3857", *(a.ravel() for a in coords.pixel_to_map(REF_T, c + f[0], r + f[1])))
    expected = np.stack(coords.map_to_image(mov_t, np.array(mx), np.array(my)))
    with GCPTransformer(gcps, tps=True) as tps:
        line, pixel = tps.rowcol(*(a.ravel() for a in coords.pixel_to_map(REF_T, c, r)), op=lambda v: v)
    assert np.abs(np.stack([pixel, line]) - expected).max() < 0.01


def test_gcps_need_enough_reliable_points_and_a_georeferenced_moving_image(tmp_path, pair):
    # certain on a 128 px corner, 11 % of the tile: evidence enough to apply, but 4 reliable tie points
    corner = FieldMatcher(lambda h, w: np.where((np.arange(h)[:, None] < 128) & (np.arange(w) < 128), 0.9, 0.2))
    with pytest.raises(MatchError, match="reliable tie points"):
        register(opts(pair, tmp_path / "g.tif", mode="gcps", flow_out=tmp_path / "f.tif"), matcher=corner)
    assert not (tmp_path / "g.tif").exists() and not (tmp_path / "f.tif").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files
    # no evidence at all: the verdict is failed and the moving raster is written as it was, no GCPs
    unsure = FieldMatcher(lambda h, w: np.full((h, w), 0.2))
    res = register(opts(pair, tmp_path / "u.tif", mode="gcps"), matcher=unsure)
    assert res.verdict["status"] == "failed"
    with rasterio.open(tmp_path / "u.tif") as u, rasterio.open(pair[0]) as m:
        assert not u.gcps[0] and u.crs == m.crs and u.transform.almost_equals(m.transform)
        assert np.array_equal(u.read(), m.read())
    plain = [tmp_path / n for n in ("s.png", "o.png")]
    for p in plain:
        with rasterio.open(p, "w", driver="PNG", width=N, height=N, count=1, dtype="uint8") as ds:
            ds.write(np.full((1, N, N), 7, np.uint8))
    with pytest.raises(GeoreferenceError, match="--mode gcps"):
        register(RegisterOptions(sar=plain[0], opt=plain[1], out=tmp_path / "g.tif", mode="gcps"),
                 matcher=FieldMatcher())


def test_plain_images_give_tie_points_in_image_coordinates_without_a_crs(tmp_path):
    paths = [tmp_path / n for n in ("s.png", "o.png")]
    rng = np.random.default_rng(1)
    for p in paths:
        with rasterio.open(p, "w", driver="PNG", width=N, height=N, count=1, dtype="uint8") as ds:
            ds.write((rng.random((1, N, N)) * 255).astype(np.uint8))
    tp = tmp_path / "tp.gpkg"
    with warnings.catch_warnings():  # no CRS is deliberate here: no warning about it
        warnings.filterwarnings("error", message=".*crs", category=UserWarning)
        register(RegisterOptions(sar=paths[0], opt=paths[1], out=tmp_path / "o.tif", tile_size=N, overlap=0,
                                 tiepoints_out=tp), matcher=FieldMatcher())
    info = pyogrio.read_info(tp)
    assert info["crs"] is None
    _, _, _, values = pyogrio.raw.read(tp)
    t = dict(zip(info["fields"], values))
    assert np.array_equal(t["x"], t["col"] + 0.5) and np.array_equal(t["y"], t["row"] + 0.5)
    assert np.allclose(t["dx_map"], t["dx_px"]) and np.allclose(t["dy_map"], t["dy_px"])


def test_tiepoint_outputs_are_checked_up_front(tmp_path, pair):
    out = tmp_path / "out.tif"
    with pytest.raises(OutputError, match=r"\.gpkg"):
        register(opts(pair, out, tiepoints_out=tmp_path / "tp.shp"), matcher=FieldMatcher())
    existing = tmp_path / "tp.gpkg"
    existing.write_bytes(b"keep")
    with pytest.raises(OutputError, match="--overwrite"):
        register(opts(pair, out, tiepoints_out=existing), matcher=FieldMatcher())
    assert existing.read_bytes() == b"keep" and not out.exists()
    register(opts(pair, out, tiepoints_out=existing, overwrite=True), matcher=FieldMatcher())
    assert pyogrio.read_info(existing)["features"] == 36
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_gcp_subgrid_is_capped_and_regular():
    area = Tile(0, 0, 1000, 1000)
    sampler = TiePointSampler(10, area, 0.5)
    sampler.add(Strip(0, np.zeros((2, 1000, 1000), np.float32), np.ones((1000, 1000), np.float32),
                      np.ones((1000, 1000), bool)))
    points = sampler.table(from_origin(0, 0, 1, 1))
    assert len(points) == 100 * 100
    idx = points.gcp_indices(max_n=2000)
    # every k-th grid column and row with the smallest k that keeps at most 2000: k = 3, 34 x 34
    assert idx.size == 34 * 34
    assert np.array_equal(np.unique(points.col[idx]), np.arange(5, 1000, 30))
    with pytest.raises(MatchError):
        points.take(idx[:MIN_GCPS - 1]).gcp_indices()


def test_cli_rejects_a_tiepoints_name_that_is_not_a_geopackage(tmp_path, pair):
    proc = subprocess.run([sys.executable, "-m", "soma_cli", "register", str(pair[0]), str(pair[1]),
                           "-o", str(tmp_path / "o.tif"), "--method", "identity", "-q",
                           "--tiepoints-out", str(tmp_path / "tp.csv")], capture_output=True, text=True, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and ".gpkg" in proc.stderr


def test_reliable_follows_the_evidence_level():
    """A tie point is reliable from the matcher's evidence level on, not from a fixed 0.5."""
    area = Tile(0, 0, 40, 40)
    cert = np.tile(np.linspace(0.0, 1.0, 40, dtype=np.float32), (40, 1))
    strip = Strip(0, np.zeros((2, 40, 40), np.float32), cert, np.ones((40, 40), bool))
    for level in (0.5, 0.7):
        sampler = TiePointSampler(10, area, level)
        sampler.add(strip)
        points = sampler.table(from_origin(0, 0, 1, 1))
        assert np.array_equal(points.reliable, points.certainty >= level)
        assert 0 < points.reliable.sum() < len(points)
