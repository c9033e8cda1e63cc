"""End-to-end tests of ``soma register`` (pipeline + io + tiling + stitch + warp)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from soma_cli import coords, synth, tiling
from soma_cli.pipeline import RegisterOptions, register

CRS = "EPSG:32611"
T0 = from_origin(500000.0, 3800000.0, 10.0, 10.0)


def write(path: Path, data: np.ndarray, transform=T0, crs=CRS, nodata=None) -> Path:
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs=crs, transform=transform,
                       nodata=nodata) as ds:
        ds.write(data)
    return path


class FieldOracle:
    """Returns the same known flow field, ``field_fn(h, w)``, for every tile."""

    name = "oracle"

    def __init__(self, field_fn):
        self.field_fn = field_fn

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        return np.stack([self.field_fn(h, w)] * b).astype(np.float32), np.ones((b, h, w), np.float32)


def ramp(h, w, a=3.0, b=2.0):
    g = coords.base_grid_np(h, w, np.float64)
    return (1000.0 + a * g[0] + b * g[1]).astype(np.float32)


def test_warp_round_trip_is_exact_on_a_ramp(tmp_path):
    """A ramp is reproduced exactly by bilinear sampling, so any half-pixel slip shows at once."""
    h = w = 256
    d = synth.draw(np.random.default_rng(3), h, w, synth.GEO)
    truth = d.forward()
    image = ramp(h, w)
    deformed = d.apply(image)  # content at q moves to q + D(q)
    opt = write(tmp_path / "opt.tif", ramp(h, w).astype(np.float32))
    sar = write(tmp_path / "sar.tif", np.nan_to_num(deformed, nan=-1.0).astype(np.float32), nodata=-1.0)
    out = tmp_path / "out.tif"
    register(RegisterOptions(sar=sar, opt=opt, out=out, tile_size=256, overlap=0),
             matcher=FieldOracle(lambda hh, ww: truth))
    with rasterio.open(out) as ds:
        got = ds.read(1, masked=True)
    ok = ~np.ma.getmaskarray(got)
    assert ok.mean() > 0.7
    # error in pixels along the ramp: |value error| / |gradient|
    err_px = np.abs(got.data[ok] - image[ok]) / np.hypot(3.0, 2.0)
    assert err_px.max() < 0.05


def test_constant_shift_multi_tile_blending_and_grid(tmp_path):
    h, w = 700, 600
    shift = np.array([2.25, -1.5], np.float32)
    image = ramp(h, w)
    moved = coords.warp_np(image, -shift[:, None, None] * np.ones((2, h, w), np.float32), cval=np.nan)
    opt = write(tmp_path / "opt.tif", image)
    sar = write(tmp_path / "sar.tif", np.nan_to_num(moved, nan=-1.0).astype(np.float32), nodata=-1.0)
    out, flow = tmp_path / "out.tif", tmp_path / "flow.tif"
    res = register(RegisterOptions(sar=sar, opt=opt, out=out, flow_out=flow, tile_size=256, overlap=64),
                   matcher=FieldOracle(lambda hh, ww: np.ones((2, hh, ww)) * shift[:, None, None]))
    assert res.tiles == 12  # rows start 0, 192, 384, 444; columns 0, 192, 344
    with rasterio.open(out) as o, rasterio.open(opt) as r, rasterio.open(flow) as f:
        assert (o.crs, o.transform, o.width, o.height) == (r.crs, r.transform, r.width, r.height)
        got = o.read(1, masked=True)
        fl = f.read()
        assert f.descriptions[0].startswith("dx")
        assert f.nodata == -9999.0
    ok = ~np.ma.getmaskarray(got)
    assert np.abs(got.data[ok] - image[ok]).max() < 0.05 * np.hypot(3, 2)
    assert np.allclose(fl[0], 2.25) and np.allclose(fl[1], -1.5)
    assert np.allclose(res.affine, [[1, 0, 2.25], [0, 1, -1.5]], atol=1e-4)


class ContentOracle:
    """A flow and certainty computed from each tile's own pixels, so that a tile matched, stitched
    or warped out of place changes the output."""

    name = "content"

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        o = np.nan_to_num(np.asarray(opt, np.float64))
        flow = np.stack([np.tanh(o), 0.5 * np.tanh(o.mean((1, 2), keepdims=True) + 0 * o)], 1)
        return flow.astype(np.float32), (0.5 + 0.4 * np.tanh(np.abs(o))).astype(np.float32)


def test_reading_and_warping_threads_change_nothing(tmp_path):
    """Tiles read ahead and strips warped ahead in threads give byte-identical outputs."""
    rng = np.random.default_rng(5)
    image = ramp(700, 650) + rng.normal(0, 30, (700, 650)).astype(np.float32)
    opt = write(tmp_path / "opt.tif", image)
    sar = write(tmp_path / "sar.tif", image[::-1].copy())
    outs = {}
    for io in (0, 3):
        out, flow = tmp_path / f"out{io}.tif", tmp_path / f"flow{io}.tif"
        register(RegisterOptions(sar=sar, opt=opt, out=out, flow_out=flow, tile_size=256, overlap=64,
                                 batch_size=2, io_threads=io), matcher=ContentOracle())
        with rasterio.open(out) as o, rasterio.open(flow) as f:
            outs[io] = (o.read(), f.read())
    assert np.isfinite(outs[0][1][2]).all() and outs[0][1][0].std() > 0.1  # content-dependent flow
    for a, b in zip(outs[0], outs[3]):
        assert np.array_equal(a, b, equal_nan=True)


class TwoAtOnceOracle(ContentOracle):
    """:class:`ContentOracle` as a matcher that takes two tiles at once
    (:func:`soma_cli.matchers.sharing_cores`); its first two calls wait for each other, so a
    pipeline that called it one tile at a time would fail here."""

    def __init__(self):
        self.lanes = 1
        self.lanes_seen = set()
        self.calls = 0
        self.lock = threading.Lock()
        self.both = threading.Barrier(2, timeout=20)

    def concurrency(self):
        return 2

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        with self.lock:
            self.calls += 1
            first_two = self.calls <= 2
            self.lanes_seen.add(self.lanes)
        if first_two:
            self.both.wait()
        return super().match(opt, sar, opt_valid, sar_valid)


def test_tiles_matched_two_at_once_change_nothing(tmp_path):
    """Two tiles matched at once in two threads give byte-identical outputs and per-tile QA rows,
    in layout order; the matcher shares its threads only while the tiles are matched."""
    rng = np.random.default_rng(6)
    image = ramp(700, 650) + rng.normal(0, 30, (700, 650)).astype(np.float32)
    opt = write(tmp_path / "opt.tif", image)
    sar = write(tmp_path / "sar.tif", image[::-1].copy())
    outs = {}
    two = TwoAtOnceOracle()
    for name, matcher in (("one", ContentOracle()), ("two", two)):
        out, flow, qa_dir = tmp_path / f"out_{name}.tif", tmp_path / f"flow_{name}.tif", tmp_path / f"qa_{name}"
        register(RegisterOptions(sar=sar, opt=opt, out=out, flow_out=flow, qa_out=qa_dir, tile_size=256, overlap=64,
                                 io_threads=0), matcher=matcher)
        with rasterio.open(out) as o, rasterio.open(flow) as f:
            outs[name] = (o.read(), f.read(), (qa_dir / "tiles.csv").read_text())
    assert two.calls == len(tiling.layout(700, 650, 256, 64)) and two.lanes_seen == {2} and two.lanes == 1
    assert outs["one"][1][0].std() > 0.1  # content-dependent flow
    for a, b in zip(outs["one"], outs["two"]):
        assert np.array_equal(a, b, equal_nan=True) if isinstance(a, np.ndarray) else a == b


class OutlierOracle:
    """A constant shift, except a block of wild, low-certainty vectors.  It ignores the images, so
    the error estimate (which deforms them) finds it wrong everywhere: the tests run it unchecked."""

    name = "outliers"

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        flow = np.ones((b, 2, h, w), np.float32) * np.array([2.25, -1.5], np.float32)[None, :, None, None]
        cert = np.full((b, h, w), 0.8, np.float32)
        flow[:, :, 100:180, 200:300] = 30.0
        cert[:, 100:180, 200:300] = 0.02
        return flow, cert


@pytest.mark.parametrize("repair", [True, False])
def test_low_certainty_outliers_are_repaired(tmp_path, repair):
    image = ramp(384, 384)
    opt = write(tmp_path / "opt.tif", image)
    sar = write(tmp_path / "sar.tif", image)
    flow = tmp_path / "flow.tif"
    res = register(RegisterOptions(sar=sar, opt=opt, out=tmp_path / "o.tif", flow_out=flow, tile_size=384, overlap=0,
                                   repair=repair, check=False), matcher=OutlierOracle())
    with rasterio.open(flow) as f:
        fl = f.read()
    block = fl[:2, 100:180, 200:300]
    good = fl[:2, 250:, :100]
    np.testing.assert_allclose(good[0], 2.25, atol=1e-4)  # confident pixels are left alone
    if repair:
        assert np.abs(block[0] - 2.25).max() < 0.05 and np.abs(block[1] + 1.5).max() < 0.05
        assert fl[2, 100:180, 200:300].max() < 0.02  # repaired pixels carry no certainty of their own
        assert 0.05 < res.repaired_share < 0.1
    else:
        np.testing.assert_allclose(block, 30.0)
        assert res.repaired_share == 0.0


class MidCertaintyOutliers(OutlierOracle):
    """The same block of wild vectors, but at certainty 0.7, with the matcher's own trust level."""

    def __init__(self, trust):
        if trust is not None:
            self.trust_certainty = trust

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        flow, cert = super().match(opt, sar, opt_valid, sar_valid)
        cert[:, 100:180, 200:300] = 0.7
        return flow, cert


@pytest.mark.parametrize("trust", [None, 0.9])
def test_repair_uses_the_matchers_trust_certainty(tmp_path, trust):
    """A block 30 px off the scene prior at certainty 0.7 is kept under the default trust level
    (0.5) and repaired by a matcher whose ``trust_certainty`` is 0.9 (the network's)."""
    image = ramp(384, 384)
    opt = write(tmp_path / "opt.tif", image)
    flow = tmp_path / "flow.tif"
    register(RegisterOptions(sar=write(tmp_path / "sar.tif", image), opt=opt, out=tmp_path / "o.tif", flow_out=flow,
                             tile_size=384, overlap=0, check=False), matcher=MidCertaintyOutliers(trust))
    with rasterio.open(flow) as f:
        block = f.read(1, window=Window(200, 100, 100, 80))
    if trust is None:
        np.testing.assert_allclose(block, 30.0)
    else:
        assert np.abs(block - 2.25).max() < 0.05


def test_reference_sar_inverts_the_field(tmp_path):
    h = w = 256
    shift = np.array([1.75, 0.5], np.float32)
    image = ramp(h, w)
    moved = coords.warp_np(image, -shift[:, None, None] * np.ones((2, h, w)), cval=np.nan)
    opt = write(tmp_path / "opt.tif", image)
    sar = write(tmp_path / "sar.tif", np.nan_to_num(moved, nan=-1.0).astype(np.float32), nodata=-1.0)
    flow = tmp_path / "flow.tif"
    register(RegisterOptions(sar=sar, opt=opt, out=tmp_path / "o.tif", flow_out=flow, reference="sar",
                             tile_size=256, overlap=0),
             matcher=FieldOracle(lambda hh, ww: np.ones((2, hh, ww)) * shift[:, None, None]))
    with rasterio.open(flow) as f:
        fl = f.read()
    has = fl[0] != -9999.0  # the SAR's own nodata border has no estimate
    assert has.mean() > 0.95
    assert np.allclose(fl[0][has], -1.75, atol=1e-3) and np.allclose(fl[1][has], -0.5, atol=1e-3)
    with rasterio.open(tmp_path / "o.tif") as o:
        got = o.read(1, masked=True)
    ok = ~np.ma.getmaskarray(got)
    np.testing.assert_allclose(got.data[ok], np.nan_to_num(moved)[ok], atol=0.05 * np.hypot(3, 2))


def _real_crop(shared_data: Path, name: str, size: int, off: int = 256):
    with rasterio.open(shared_data / "sar" / f"{name}.tif") as s, rasterio.open(shared_data / "opt" / f"{name}.tif") as o:
        w = Window(off, off, size, size)
        return s.read(1, window=w), o.read(window=w), s.window_transform(w), s.crs


def test_gradient_recovers_a_known_smooth_field(tmp_path, shared_data):
    """Real crop; the SAR gets a known geo-like deformation.  The pair's own residual is removed by
    comparing against the flow of the undeformed pair (F1 - F0 vs. D)."""
    sar, opt, t, crs = _real_crop(shared_data, "003", 512)
    d = synth.draw(np.random.default_rng(11), 512, 512, synth.DeformParams(trans_px=6, rot_deg=1, local_px=3))
    deformed = d.apply(sar.astype(np.float32))
    o = write(tmp_path / "opt.tif", opt, t, crs)
    s0 = write(tmp_path / "sar0.tif", sar, t, crs)
    s1 = write(tmp_path / "sar1.tif", np.nan_to_num(deformed, nan=-1).astype(np.float32), t, crs, nodata=-1)
    flows = []
    for s in (s0, s1):
        f = tmp_path / f"{s.stem}_flow.tif"
        register(RegisterOptions(sar=s, opt=o, out=tmp_path / f"{s.stem}_out.tif", flow_out=f, method="gradient",
                                 tile_size=512, overlap=0))
        with rasterio.open(f) as ds:
            flows.append(ds.read([1, 2]).astype(np.float64))
    f0, f1 = flows
    expected = f0 + coords.warp_np(d.forward(), f0.astype(np.float32), order=1, edge=True)
    inside = coords.inside_mask_np(d.forward(), 512, 512)[32:-32, 32:-32]
    err = np.hypot(*(f1 - expected))[32:-32, 32:-32]
    rmse = float(np.sqrt(np.mean(err[inside] ** 2)))
    assert rmse < 1.0, rmse  # measured ~0.3-0.5 px


def test_different_crs_inputs_register(tmp_path, shared_data):
    """Optical in World Mercator, SAR reprojected to EPSG:4326: output lands on the optical grid and the
    (co-registered) pair needs only a small correction."""
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    sar, opt, t, crs = _real_crop(shared_data, "003", 384)
    o = write(tmp_path / "opt.tif", opt, t, crs)
    dst_t, w, h = calculate_default_transform(crs, "EPSG:4326", 384, 384, *rasterio.transform.array_bounds(384, 384, t))
    geo = np.zeros((h, w), np.uint8)
    reproject(sar, geo, src_transform=t, src_crs=crs, dst_transform=dst_t, dst_crs="EPSG:4326",
              resampling=Resampling.bilinear, dst_nodata=0)
    s = write(tmp_path / "sar4326.tif", geo, dst_t, "EPSG:4326", nodata=0)
    out = tmp_path / "out.tif"
    res = register(RegisterOptions(sar=s, opt=o, out=out, method="gradient", tile_size=256, overlap=64))
    with rasterio.open(out) as ds, rasterio.open(o) as r:
        assert (ds.crs, ds.transform, ds.shape) == (r.crs, r.transform, r.shape)
        assert ds.read_masks(1).mean() > 0.5 * 255
    assert res.median_flow < 3.0


def test_affine_mode_restores_the_geotransform(tmp_path, shared_data):
    """SAR content shifted by (5, -3) px but labelled with the optical transform: --mode affine keeps
    the SAR pixels and writes a transform that puts them back.  The pair's own residual is cancelled
    by registering the unshifted crop too: both corrected transforms must place the same content at
    the same map position."""
    with rasterio.open(shared_data / "sar" / "020.tif") as s, rasterio.open(shared_data / "opt" / "020.tif") as op:
        w = Window(300, 300, 384, 384)
        opt, t = op.read(window=w), op.window_transform(w)
        same = s.read(1, window=w)
        moved = s.read(1, window=Window(300 - 5, 300 + 3, 384, 384))  # content shifted by (+5, -3)
        crs = s.crs
    o = write(tmp_path / "opt.tif", opt, t, crs)
    transforms = []
    for name, data in (("same", same), ("moved", moved)):
        sp = write(tmp_path / f"{name}.tif", data, t, crs)
        out = tmp_path / f"{name}_out.tif"
        res = register(RegisterOptions(sar=sp, opt=o, out=out, method="gradient", mode="affine",
                                       tile_size=384, overlap=0))
        with rasterio.open(out) as ds:
            np.testing.assert_array_equal(ds.read(1), data)  # pixels unchanged
            transforms.append(ds.transform)
        assert res.output_transform is not None
    t_same, t_moved = transforms
    # the content of reference-crop pixel (192, 192) sits at (192, 192) in `same`, at (197, 189) in `moved`
    xa, ya = t_same * (192.5, 192.5)
    xb, yb = t_moved * (197.5, 189.5)
    assert abs(xa - xb) < 0.5 * t.a and abs(ya - yb) < 0.5 * abs(t.e), (xa - xb, ya - yb)
    # and without the correction the same content would be 5 and 3 px apart
    xc, yc = t * (197.5, 189.5)
    assert abs(xc - xa) > 3 * t.a


def test_db_float_sar_and_16bit_four_band_optical(tmp_path):
    """SAR in dB (float, negative) and a 4-band uint16 optical image with nodata: the scale is
    detected as dB, the output keeps the SAR's float type and marks the optical nodata hole."""
    rng = np.random.default_rng(5)
    base = ndimage_smooth(rng.random((256, 256)))
    sar_db = (10 * np.log10(0.05 + base) - 5).astype(np.float32)
    opt = np.stack([(base * 3000 + 100 * k).astype(np.uint16) for k in range(4)])
    opt[:, :40, :40] = 0
    s = write(tmp_path / "sar.tif", sar_db)
    o = write(tmp_path / "opt.tif", opt, nodata=0)
    out = tmp_path / "out.tif"
    res = register(RegisterOptions(sar=s, opt=o, out=out, method="identity", tile_size=256, overlap=0))
    assert res.sar_scale == "db"
    with rasterio.open(out) as ds:
        assert ds.dtypes[0] == "float32"
        got = ds.read(1)
    assert np.isnan(got[:40, :40]).all()  # no estimate where the reference is nodata
    np.testing.assert_allclose(got[100:, 100:], sar_db[100:, 100:], atol=1e-5)


def ndimage_smooth(a):
    from scipy import ndimage

    a = ndimage.gaussian_filter(a, 3)
    return (a - a.min()) / (a.max() - a.min())


# ---------------------------------------------------------------------------------------------- bad input


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "soma_cli.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture()
def small_pair(tmp_path):
    rng = np.random.default_rng(0)
    img = (rng.random((128, 128)) * 200).astype(np.uint8)
    return write(tmp_path / "sar.tif", img), write(tmp_path / "opt.tif", np.stack([img] * 3))


def _assert_clean_error(proc, tmp_dir: Path, needle: str, before: set):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle.lower() in proc.stderr.lower(), proc.stderr
    assert set(p.name for p in tmp_dir.iterdir()) == before  # nothing written, no temp files


def test_bad_inputs_give_one_line_errors_and_write_nothing(tmp_path, small_pair):
    sar, opt = small_pair
    out = tmp_path / "out.tif"
    before = set(p.name for p in tmp_path.iterdir())
    base = ["register", "--method", "identity", "-q"]

    _assert_clean_error(_cli(*base, tmp_path / "nope.tif", opt, "-o", out), tmp_path, "not found", before)
    txt = tmp_path / "notes.txt"
    txt.write_text("not a raster")
    before_txt = before | {"notes.txt"}
    _assert_clean_error(_cli(*base, txt, opt, "-o", out), tmp_path, "not a readable raster", before_txt)
    nocrs = tmp_path / "nocrs.tif"
    with rasterio.open(nocrs, "w", driver="GTiff", width=64, height=64, count=1, dtype="uint8") as ds:
        ds.write(np.ones((1, 64, 64), np.uint8))
    b2 = before_txt | {"nocrs.tif"}
    _assert_clean_error(_cli(*base, nocrs, opt, "-o", out), tmp_path, "no CRS", b2)
    far = write(tmp_path / "far.tif", np.ones((128, 128), np.uint8), from_origin(700000, 3800000, 10, 10))
    b3 = b2 | {"far.tif"}
    _assert_clean_error(_cli(*base, far, opt, "-o", out), tmp_path, "do not overlap", b3)
    empty = write(tmp_path / "empty.tif", np.zeros((128, 128), np.uint8), nodata=0)
    b4 = b3 | {"empty.tif"}
    _assert_clean_error(_cli(*base, empty, opt, "-o", out), tmp_path, "all nodata", b4)
    _assert_clean_error(_cli(*base, sar, opt, "-o", out, "--bands", "5"), tmp_path, "band", b4)
    _assert_clean_error(_cli(*base, sar, opt, "-o", out, "--bands", "x"), tmp_path, "band", b4)
    _assert_clean_error(_cli(*base, sar, opt, "-o", tmp_path / "missing" / "o.tif"), tmp_path, "does not exist", b4)
    out.write_bytes(b"existing")
    b5 = b4 | {"out.tif"}
    _assert_clean_error(_cli(*base, sar, opt, "-o", out), tmp_path, "--overwrite", b5)
    assert out.read_bytes() == b"existing"
    trunc = tmp_path / "trunc.tif"
    big = write(tmp_path / "big.tif", (np.random.default_rng(1).random((3, 512, 512)) * 255).astype(np.uint8))
    trunc.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    big.unlink()
    b6 = b5 | {"trunc.tif"}
    _assert_clean_error(_cli(*base, sar, trunc, "-o", tmp_path / "o2.tif"), tmp_path, "optical", b6)
    _assert_clean_error(_cli(*base, sar, opt, "-o", tmp_path / "o3.tif", "--tile-size", "100"), tmp_path,
                        "tile-size", b6)
    _assert_clean_error(_cli(*base, sar, opt, "-o", tmp_path / "o4.png"), tmp_path, ".tif", b6)
    _assert_clean_error(_cli(*base, sar, opt, "-o", tmp_path / "o5.tif", "--flow-out", tmp_path / "f.jpg"),
                        tmp_path, "--flow-out", b6)


def test_inputs_are_never_modified(tmp_path, small_pair):
    sar, opt = small_pair
    digest = [p.read_bytes() for p in (sar, opt)]
    proc = _cli("register", sar, opt, "-o", tmp_path / "o.tif", "--method", "identity", "-q")
    assert proc.returncode == 0, proc.stderr
    assert [p.read_bytes() for p in (sar, opt)] == digest


def test_json_summary(tmp_path, small_pair):
    import json

    sar, opt = small_pair
    proc = _cli("register", sar, opt, "-o", tmp_path / "o.tif", "--method", "identity", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tiles"] == 1 and summary["median_flow"] == 0.0


def test_cog_output(tmp_path, small_pair):
    sar, opt = small_pair
    out = tmp_path / "o.tif"
    register(RegisterOptions(sar=sar, opt=opt, out=out, method="identity", cog=True, tile_size=128, overlap=0))
    with rasterio.open(out) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_scratch_raster_is_quiet_and_deleted(tmp_path):
    """The internal scratch file has no georeferencing on purpose: no warning reaches the user,
    it works read-write, and it is gone afterwards."""
    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    from soma_cli.io.write import scratch_raster

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with scratch_raster(tmp_path, 300, 280, 2) as ds:
            ds.write(np.ones((2, 280, 300), np.float32))
            assert ds.read(2).sum() == 300 * 280
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]
    assert list(tmp_path.iterdir()) == []


def test_gcp_georeferenced_sar_is_warped_by_its_ground_control_points(tmp_path):
    """A SAR raster georeferenced by ground control points only (like a Sentinel-1 GRD measurement
    file: no CRS, no geotransform, pixel order mirrored against the map, zero-filled border) lands on
    the optical grid through its GCPs; as the reference grid it is refused with a one-line error."""
    from rasterio.control import GroundControlPoint
    from rasterio.crs import CRS as RCRS
    from rasterio.warp import transform as warp_points

    n = 256
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:n, 0:n]
    sar = (1000 + 400 * np.sin(xx / 9.0) * np.cos(yy / 13.0) + 50 * rng.random((n, n))).astype(np.uint16)
    sar[:, :12] = 0  # the GRD's no-data border
    opt = write(tmp_path / "opt.tif", (np.stack([sar // 8] * 3)).astype(np.uint8))
    flipped = sar[:, ::-1]  # column c of the file is map column n - 1 - c
    gcps = []
    for r in np.linspace(0, n, 5):
        for c in np.linspace(0, n, 5):
            x, y = T0 * (n - c, r)  # pixel corner c of the mirrored file is corner n - c on the map
            lon, lat = warp_points(CRS, "EPSG:4326", [x], [y])
            gcps.append(GroundControlPoint(row=float(r), col=float(c), x=lon[0], y=lat[0], z=0.0))
    grd = tmp_path / "grd.tif"
    with rasterio.open(grd, "w", driver="GTiff", width=n, height=n, count=1, dtype="uint16") as ds:
        ds.write(flipped, 1)
        ds.gcps = (gcps, RCRS.from_epsg(4326))
    out = tmp_path / "out.tif"
    proc = _cli("register", grd, opt, "-o", out, "--method", "identity", "--tile-size", "256", "-q")
    assert proc.returncode == 0, proc.stderr
    with rasterio.open(out) as ds, rasterio.open(opt) as r:
        assert (ds.crs, ds.transform, ds.shape) == (r.crs, r.transform, r.shape)
        got = ds.read(1).astype(np.float64)
        valid = ds.read_masks(1) > 0
    inner = np.zeros_like(valid)
    inner[4:-4, 16:-4] = True
    assert valid[inner].all()  # the map is covered where the SAR has data ...
    assert not valid[:, :10].any()  # ... and its zero border is no data, not a dark edge
    err = np.abs(got - sar)[inner]
    assert err.mean() < 2.0 and np.percentile(err, 99) < 10.0, (err.mean(), np.percentile(err, 99))
    before = set(p.name for p in tmp_path.iterdir())
    _assert_clean_error(_cli("register", grd, opt, "-o", tmp_path / "o2.tif", "--reference", "sar", "-q"),
                        tmp_path, "ground control points", before)


def test_plain_image_chips_share_their_pixel_grid(tmp_path):
    """Two images without any georeferencing (PNG chips, as in SEN1-2) of one size are registered
    on their common pixel grid; the output has no georeferencing either.  A plain image beside a
    georeferenced one, or two plain images of different sizes, get one-line errors."""
    from scipy import ndimage

    n = 256
    tex = ndimage.gaussian_filter(np.random.default_rng(3).normal(size=(n + 16, n + 16)), 2.0)
    tex = (255 * (tex - tex.min()) / (tex.max() - tex.min())).astype(np.uint8)
    opt_arr = tex[8:8 + n, 8:8 + n]
    sar_arr = tex[8:8 + n, 5:5 + n]  # optical pixel (c, r) is SAR pixel (c + 3, r)

    def png(name, arr):
        p = tmp_path / name
        with rasterio.open(p, "w", driver="PNG", width=arr.shape[-1], height=arr.shape[-2], count=1,
                           dtype="uint8") as d:
            d.write(arr, 1)
        return p

    o, s = png("opt.png", opt_arr), png("sar.png", sar_arr)
    out, flow = tmp_path / "out.tif", tmp_path / "flow.tif"
    proc = _cli("register", s, o, "-o", out, "--flow-out", flow, "--method", "gradient", "--tile-size", "256", "-q")
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    with rasterio.open(flow) as f, rasterio.open(out) as a:
        assert f.crs is None and a.crs is None and a.shape == (n, n)
        dx, dy = f.read(1)[32:-32, 32:-32], f.read(2)[32:-32, 32:-32]
        aligned = a.read(1).astype(np.float64)[32:-32, 32:-32]
    assert abs(np.median(dx) - 3.0) < 0.3 and abs(np.median(dy)) < 0.3, (np.median(dx), np.median(dy))
    assert np.abs(aligned - opt_arr[32:-32, 32:-32]).mean() < 0.25 * np.abs(sar_arr - opt_arr)[32:-32, 32:-32].mean()
    before = set(p.name for p in tmp_path.iterdir())
    geo = write(tmp_path / "geo.tif", opt_arr)
    _assert_clean_error(_cli("register", s, geo, "-o", tmp_path / "o2.tif", "-q"), tmp_path, "no CRS",
                        before | {"geo.tif"})
    small = png("small.png", opt_arr[:128, :128])
    _assert_clean_error(_cli("register", s, small, "-o", tmp_path / "o3.tif", "-q"), tmp_path, "sizes differ",
                        before | {"geo.tif", "small.png"})


@pytest.mark.parametrize("resampling", ["nearest", "bilinear"])
def test_nearest_resampling_keeps_the_input_values(tmp_path, resampling):
    """--resampling nearest is honoured on the way onto the reference grid too: a moving image on
    another grid (offset by a fraction of a pixel) comes out with its own values only, while
    bilinear blends neighbours into new ones."""
    rng = np.random.default_rng(2)
    levels = np.array([10, 60, 110, 160, 210], np.uint8)
    sar_arr = levels[rng.integers(0, levels.size, (160, 160))]
    sar = write(tmp_path / "sar.tif", sar_arr, transform=from_origin(500000.0 - 3.0, 3800000.0 + 4.0, 10.0, 10.0))
    opt = write(tmp_path / "opt.tif", np.stack([sar_arr] * 3))
    out = tmp_path / "out.tif"
    register(RegisterOptions(sar=sar, opt=opt, out=out, method="identity", tile_size=128, overlap=0,
                             resampling=resampling))
    with rasterio.open(out) as ds:
        got = ds.read(1)[ds.read_masks(1) > 0]
    assert got.size > 0.9 * 150 * 150
    extra = np.setdiff1d(np.unique(got), levels)
    if resampling == "nearest":
        assert extra.size == 0, extra
    else:
        assert extra.size > 0


def test_outputs_get_normal_permissions_and_no_temp_files(tmp_path, small_pair):
    """Outputs are created through their temporary name with the umask's permissions (not a
    private 0600 temp file's), and nothing hidden is left beside them."""
    sar, opt = small_pair
    out, flow, qa_dir = tmp_path / "o.tif", tmp_path / "f.tif", tmp_path / "qa"
    register(RegisterOptions(sar=sar, opt=opt, out=out, flow_out=flow, qa_out=qa_dir, method="identity",
                             tile_size=128, overlap=0))
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, flow, qa_dir / "summary.json"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rows_outside_the_overlap_are_no_data(tmp_path):
    """A moving image covering only the middle rows and columns of the reference: the aligned image
    and the displacement raster span the reference grid, no data outside the overlap window."""
    from soma_cli.io.sinks import FLOW_NODATA

    rng = np.random.default_rng(4)
    opt = write(tmp_path / "opt.tif", (rng.random((3, 300, 260)) * 200 + 20).astype(np.uint8))
    sar = write(tmp_path / "sar.tif", (rng.random((140, 120)) * 200 + 20).astype(np.uint8),
                transform=from_origin(500000.0 + 10.0 * 70, 3800000.0 - 10.0 * 90, 10.0, 10.0))
    out, flow = tmp_path / "o.tif", tmp_path / "f.tif"
    res = register(RegisterOptions(sar=sar, opt=opt, out=out, flow_out=flow, method="identity", tile_size=128,
                                   overlap=0))
    assert res.window == {"col_off": 70, "row_off": 90, "width": 120, "height": 140}
    with rasterio.open(out) as a, rasterio.open(flow) as f:
        valid = a.read_masks(1) > 0
        dx = f.read(1)
    inside = np.zeros_like(valid)
    inside[90:230, 70:190] = True
    assert valid[inside].mean() > 0.95 and not valid[~inside].any()
    assert (dx[~inside] == FLOW_NODATA).all() and (dx[inside] == 0.0).all()


class RotationOracle(ContentOracle):
    """A matcher with a global stage: each seed tile reports the rotation in ``picks`` (in turn),
    and every match call records the rotation it was asked to search."""

    def __init__(self, picks):
        self.picks, self.rotation, self.seen, self.seeded = list(picks), None, [], 0

    def seed_rotations(self, opt, sar, opt_valid=None, sar_valid=None):
        out = [self.picks[(self.seeded + i) % len(self.picks)] for i in range(len(opt))]
        self.seeded += len(opt)
        return np.array(out, float)

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        self.seen.append(self.rotation)
        return super().match(opt, sar, opt_valid, sar_valid)


@pytest.mark.parametrize("picks, expected", [([4.0] * 8 + [-8.0], 4.0), ([0.0, 4.0, 8.0], None)])
def test_scene_rotation_is_searched_by_every_tile_when_the_seeds_agree(tmp_path, picks, expected):
    """On a layout of 49 tiles or more, the seed tiles' rotations decide the scene's: when 2/3 of
    them agree, every tile searches that rotation (and the result says so), else all of them; the
    matcher searches all rotations again afterwards.  A smaller layout has no seed pass."""
    from soma_cli import scene_rotation

    rng = np.random.default_rng(2)
    image = ramp(704, 704) + rng.normal(0, 30, (704, 704)).astype(np.float32)
    opt = write(tmp_path / "opt.tif", image)
    sar = write(tmp_path / "sar.tif", image.copy())
    m = RotationOracle(picks)
    r = register(RegisterOptions(sar=sar, opt=opt, out=tmp_path / "a.tif", tile_size=128, overlap=32), matcher=m)
    assert r.tiles >= scene_rotation.MIN_TILES and m.seeded == scene_rotation.GRID ** 2
    assert r.scene_rotation == expected
    assert m.seen and all(s == expected for s in m.seen) and m.rotation is None
    small = RotationOracle(picks)
    r = register(RegisterOptions(sar=sar, opt=opt, out=tmp_path / "b.tif", tile_size=256, overlap=64), matcher=small)
    assert r.tiles < scene_rotation.MIN_TILES and small.seeded == 0 and r.scene_rotation is None
    assert all(s is None for s in small.seen)


def test_scene_rotation_seeds_and_majority():
    """Seeds spread over the layout (first and last rows and columns included); the majority
    needs 2/3 of the usable seeds (half their pixels valid) and at least 3 of them."""
    from soma_cli import scene_rotation, tiling

    tiles = tiling.layout(4096, 3000, 512, 128)
    seeds = scene_rotation.seeds(tiles)
    rows, cols = sorted({t.row for t in tiles}), sorted({t.col for t in tiles})

    def spread(values):
        return {values[round(i * (len(values) - 1) / 2)] for i in range(3)}

    assert len(rows) > 3 and len(cols) > 3 and len(seeds) == 9
    assert {t.row for t in seeds} == spread(rows) and {t.col for t in seeds} == spread(cols)
    assert {rows[0], rows[-1], cols[0], cols[-1]} <= {t.row for t in seeds} | {t.col for t in seeds}
    assert scene_rotation.agreed([0, 0, 4, 0, 0, 0], [1] * 6) == 0.0
    assert scene_rotation.agreed([0, 0, 4, 4, 0, 0], [1] * 6) == 0.0  # 4 of 6: just 2/3
    assert scene_rotation.agreed([0, 0, 4, 4, 8, 0], [1] * 6) is None
    assert scene_rotation.agreed([0, 0, 4, 4, 4, 4], [1, 1, 0.2, 0.2, 0.2, 0.2]) is None  # 2 usable
    assert scene_rotation.agreed([0, 0, 4, 4, 4, 4], [1, 1, 0.2, 0.2, 0.2, 1]) == 0.0  # 2 of 3 usable
    assert scene_rotation.agreed([-8, -8, -8, 4], [1, 1, 1, 0.1]) == -8.0


@pytest.mark.parametrize("side,size", [(800, 512), (1024, 672)])
def test_without_a_tile_size_the_faster_layout_is_used_and_reported(tmp_path, side, size):
    base = ndimage_smooth(np.random.default_rng(8).random((side, side)))
    s = write(tmp_path / "sar.tif", (base * 200).astype(np.uint8))
    o = write(tmp_path / "opt.tif", (base * 200).astype(np.uint8))
    res = register(RegisterOptions(sar=s, opt=o, out=tmp_path / "out.tif", method="identity", qa_out=tmp_path / "qa"))
    assert res.tile_size == size == tiling.choose_size(side, side, tiling.DEFAULT_OVERLAP)
    assert res.tiles == len(tiling.layout(side, side, size, tiling.DEFAULT_OVERLAP))
    assert res.qa["run"]["settings"]["tile_size"] == size  # the QA summary records the size used
