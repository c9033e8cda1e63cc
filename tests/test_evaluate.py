"""Tests of ``soma evaluate``: pure metrics, the relative metric, the runner and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from scipy import ndimage

from soma_cli import coords, evaluate as ev, synth
from soma_cli.errors import ConfigError, DataError
from soma_cli.io.dataset import list_pairs, read_pair

# ----------------------------------------------------------------------------- helpers


def _texture(rng, h, w, sigma=2.0):
    x = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma)
    x = (x - x.min()) / (x.max() - x.min())
    return (20 + 215 * x).astype(np.uint8)


def _write(path: Path, arr: np.ndarray):
    arr = arr if arr.ndim == 3 else arr[None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, crs="EPSG:32611", transform=Affine(10, 0, 500000, 0, -10, 4000000)) as dst:
        dst.write(arr)


def make_dataset(root: Path, n: int = 2, size: int = 256, groups=None) -> Path:
    """A tiny co-registered dataset: opt (3 bands) and SAR (1 band) sharing one texture."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n):
        name = f"p{i:02d}"
        base = _texture(rng, size, size)
        opt = np.stack([base, (0.8 * base).astype(np.uint8), (255 - base).astype(np.uint8)])
        sar = np.clip(base.astype(np.float64) * rng.gamma(4.0, 0.25, size=base.shape), 1, 255).astype(np.uint8)
        _write(root / "opt" / f"{name}.tif", opt)
        _write(root / "sar" / f"{name}.tif", sar)
        if groups:
            scene = f"S2A_MSIL1C_20201104T183541_N0209_R027_{groups[i]}_20201104T203551.SAFE"
            rows.append(f"{name},sar/{name}.tif,opt/{name}.tif,{scene}")
    if groups:
        (root / "pairs.csv").write_text("id,sar,opt,s2_scene\n" + "\n".join(rows) + "\n")
    return root


class OracleMatcher:
    """Knows the answer: looks the SAR chip up in a table built from the same protocol and seed."""

    name = "oracle"

    def __init__(self, data_dir: Path, protocols, seed: int, chip: int):
        self.table = {}
        for entry in list_pairs(data_dir):
            chips, _ = ev.base_chips(read_pair(entry), chip)
            for c in chips:
                self.table[c.sar.tobytes()] = np.zeros((2,) + c.sar.shape, np.float32)
                for p in protocols:
                    s = ev.deform_chip(c, p, seed)
                    self.table[s.sar.tobytes()] = s.gt
        self.calls = 0

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        self.calls += 1
        flow = np.stack([self.table[np.ascontiguousarray(s).tobytes()] for s in sar])
        return flow, np.ones(sar.shape, np.float32)


class ConstantMatcher:
    name = "constant"

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        flow = np.zeros((b, 2, h, w), np.float32)
        flow[:, 0] = 3.0
        return flow, np.ones((b, h, w), np.float32)


def _analytic_forward(d: synth.Deformation, x: np.ndarray, y: np.ndarray):
    """The ground-truth flow of ``d`` evaluated exactly at arbitrary points (x, y)."""
    a = d.affine
    ax = a[0, 0] * x + a[0, 1] * y + a[0, 2]
    ay = a[1, 0] * x + a[1, 1] * y + a[1, 2]
    lx, ly = d.bumps(ax, ay)
    return ax + lx - x, ay + ly - y


# ----------------------------------------------------------------------------- pure metrics


def test_constant_error_gives_its_rmse_and_cmr():
    gt = np.random.default_rng(0).normal(size=(2, 32, 40)).astype(np.float32)
    valid = np.ones((32, 40), bool)
    m = ev.chip_metrics(gt + np.array([1.2, 1.6], np.float32)[:, None, None], gt, valid)
    assert m["rmse"] == pytest.approx(2.0, abs=1e-5)
    assert m["aepe"] == pytest.approx(2.0, abs=1e-5)
    assert m["px1"] == 0.0 and m["n_px"] == 32 * 40
    m = ev.chip_metrics(gt + np.array([0.3, -0.4], np.float32)[:, None, None], gt, valid)
    assert m["rmse"] == pytest.approx(0.5, abs=1e-5) and m["px1"] == 1.0

    recs = [ev.chip_metrics(gt + np.array([e, 0.0], np.float32)[:, None, None], gt, valid)
            for e in (0.5, 1.5, 2.5, 4.0)]
    agg = ev.aggregate(recs)
    assert (agg["cmr1"], agg["cmr2"], agg["cmr3"], agg["cmr5"]) == (0.25, 0.5, 0.75, 1.0)
    assert agg["rmse_mean"] == pytest.approx(2.125, abs=1e-5)
    assert agg["rmse_median"] == pytest.approx(2.0, abs=1e-5)
    assert agg["px1"] == pytest.approx(0.25) and agg["n"] == 4
    assert set(ev.aggregate(recs, prefix="rel_")) == {"rel_" + k for k in agg}
    two = np.zeros_like(gt)
    two[0] = 2.0
    exact = ev.aggregate([ev.chip_metrics(two, np.zeros_like(gt), valid)])
    assert exact["cmr2"] == 0.0 and exact["cmr3"] == 1.0  # "below k px" is strict


def test_metrics_use_only_valid_pixels_and_nonfinite_counts_as_failure():
    gt = np.zeros((2, 16, 16), np.float32)
    pred = gt.copy()
    pred[0, :, 8:] = 100.0  # wrong, but outside the mask
    valid = np.zeros((16, 16), bool)
    valid[:, :8] = True
    assert ev.chip_metrics(pred, gt, valid)["rmse"] == 0.0
    pred[1, 0, 0] = np.nan
    m = ev.chip_metrics(pred, gt, valid)
    assert math.isinf(m["rmse"]) and m["px1"] < 1.0
    assert ev.aggregate([m])["cmr5"] == 0.0
    empty = ev.chip_metrics(pred, gt, np.zeros((16, 16), bool))
    assert empty["n_px"] == 0 and ev.aggregate([empty])["n"] == 0


def test_eval_mask_excludes_pixels_leaving_the_chip():
    gt = np.zeros((2, 10, 10), np.float32)
    gt[0] = 3.0  # shifted right by 3: the last 3 columns leave the chip
    opt_valid = np.ones((10, 10), bool)
    opt_valid[0, 0] = False
    mask = ev.eval_mask(gt, opt_valid)
    assert not mask[:, 7:].any() and mask[1:, :7].all() and not mask[0, 0]


def test_relative_error_is_zero_for_a_consistent_oracle_and_large_for_a_constant():
    h = w = 128
    d = synth.draw_for("geo", 3, "pair", 0, h, w)
    assert d.bumps.vectors.size  # geo has a local field: D is not affine
    gt = d.forward()
    g = coords.base_grid_np(h, w, np.float64)
    # a smooth residual misregistration of the "co-registered" pair, ~2 px
    r = np.stack([0.7 + 1.5 * np.sin(g[1] / 23.0), -1.2 + 1.0 * np.cos(g[0] / 31.0)]).astype(np.float32)
    dx, dy = _analytic_forward(d, g[0] + r[0], g[1] + r[1])
    f1 = (r + np.stack([dx, dy])).astype(np.float32)  # the oracle: R, then D (exact)
    err, mask = ev.relative_error(r, f1, gt)
    assert mask.mean() > 0.7
    m = ev.error_metrics(err, mask)
    assert m["rmse"] < 0.02 and m["px1"] == 1.0
    # its absolute error is the residual itself, not ~0: the relative metric removes it
    assert ev.chip_metrics(f1, gt, ev.eval_mask(gt))["rmse"] > 1.0

    const = np.zeros_like(gt)
    const[0] = 3.0
    err, mask = ev.relative_error(const, const, gt)
    assert ev.error_metrics(err, mask)["rmse"] > 3.0
    zero = np.zeros_like(gt)  # identity: expected = D
    err, mask = ev.relative_error(zero, zero, gt)
    assert np.allclose(err[:, mask], -gt[:, mask], atol=1e-4)


# ----------------------------------------------------------------------------- runner


def test_oracle_scores_one_and_identity_scores_zero(tmp_path):
    data = make_dataset(tmp_path / "d", n=2, size=256)
    oracle = OracleMatcher(data, ("geo", "paper"), seed=5, chip=128)
    ticks = []
    res = ev.run(data, "both", [oracle, "identity", ConstantMatcher()], seed=5, chip=128,
                 progress=lambda done, total, info: ticks.append((done, total)))
    assert set(res["protocols"]) == {"geo", "paper"} and res["seed"] == 5 and res["chip"] == 128
    assert ticks[-1] == (8, 8) and len(ticks) == 2  # 2 pairs x 4 chips, one tick per pair
    for p, r in res["protocols"].items():
        assert r["protocol"] == p and r["chips"] == 8 and r["pairs"] == 2
        o = r["methods"]["oracle"]
        assert o["cmr1"] == 1.0 and o["rmse_mean"] < 1e-6 and o["px1"] == 1.0
        assert o["rel_cmr1"] == 1.0 and o["rel_rmse_median"] < 0.05
        i = r["methods"]["identity"]
        assert i["cmr1"] == 0.0 and i["rel_cmr1"] == 0.0 and i["rmse_median"] > 1.0
        assert i["rel_rmse_median"] == pytest.approx(i["rmse_median"], rel=1e-4)  # F0 = 0: rel = abs
        assert r["methods"]["constant"]["rel_cmr1"] == 0.0
        assert set(o) == set(ev.METRIC_KEYS) and o["n"] == 8
    assert res["protocols"]["paper"]["methods"]["identity"]["rmse_median"] > \
        res["protocols"]["geo"]["methods"]["identity"]["rmse_median"]
    assert oracle.calls == 2 * 3  # per pair: undeformed + one per protocol, each one batch of 4


def test_same_seed_same_deformations_other_seed_differs(tmp_path):
    a = synth.draw_for("geo", 11, "p00", 3, 64, 64).forward()
    b = synth.draw_for("geo", 11, "p00", 3, 64, 64).forward()
    c = synth.draw_for("geo", 12, "p00", 3, 64, 64).forward()
    assert np.array_equal(a, b) and not np.allclose(a, c)
    data = make_dataset(tmp_path / "d", n=1, size=128)
    chips, _ = ev.base_chips(read_pair(list_pairs(data)[0]), 64)
    s1, s2 = ev.deform_chip(chips[1], "paper", 4), ev.deform_chip(chips[1], "paper", 4)
    assert np.array_equal(s1.gt, s2.gt) and np.array_equal(s1.sar, s2.sar, equal_nan=True)
    assert not np.allclose(ev.deform_chip(chips[1], "paper", 5).gt, s1.gt)
    r1 = ev.run(data, "geo", ["identity"], seed=4, chip=64)
    r2 = ev.run(data, "geo", ["identity"], seed=4, chip=64)
    for r in (r1, r2):
        r["methods"]["identity"].pop("s_per_mpx")
    assert r1 == r2


def test_split_limit_and_options_are_validated(tmp_path):
    data = make_dataset(tmp_path / "d", n=3, size=128, groups=["T11SLT", "T11SMT", "T11SLT"])
    r = ev.run(data, "geo", ["identity"], chip=64, split="T11SLT")
    assert r["pairs"] == 2 and r["chips"] == 8 and r["split"] == "T11SLT"
    r = ev.run(data, "geo", ["identity"], chip=64, limit=1)
    assert r["pairs"] == 1 and r["chips"] == 4
    r = ev.run(data, "geo", ["identity"], chip=100)  # remainder of the grid is not used
    assert r["chips"] == 3 * 1
    with pytest.raises(DataError, match="no pairs"):
        ev.run(data, "geo", ["identity"], chip=64, split="T99XXX")
    with pytest.raises(DataError, match="smaller than the chip"):
        ev.run(data, "geo", ["identity"], chip=256)
    with pytest.raises(ConfigError):
        ev.run(data, "nope", ["identity"], chip=64)
    with pytest.raises(ConfigError):
        ev.run(data, "geo", ["nope"], chip=64)
    with pytest.raises(ConfigError):
        ev.run(data, "geo", ["identity"], chip=64, limit=0)


def test_json_is_written_atomically_with_nulls_for_nonfinite(tmp_path):
    out = ev.write_json(tmp_path / "r.json", {"a": math.inf, "b": np.float32(0.5), "c": [np.int64(3)]})
    assert json.loads(out.read_text()) == {"a": None, "b": 0.5, "c": [3]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_gefolki_missing_is_a_clear_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gefolki", None)
    from soma_cli.matchers import get_matcher

    with pytest.raises(ConfigError, match="pip install gefolki"):
        get_matcher("gefolki")


def test_gefolki_recovers_a_shift_between_identical_modalities():
    pytest.importorskip("gefolki")
    from soma_cli.matchers.gefolki import GefolkiMatcher
    from soma_cli.preprocess import standardise

    img = _texture(np.random.default_rng(1), 128, 128, sigma=3.0).astype(np.float32)
    flow = np.zeros((2, 128, 128), np.float32)
    flow[0], flow[1] = 1.5, -1.0
    moved = coords.warp_np(img, -flow, edge=True)  # content moves by +flow
    m = GefolkiMatcher(levels=2, radius=(8, 4))
    f, cert = m.match(standardise(img)[None], standardise(moved)[None])
    inner = (slice(16, -16), slice(16, -16))
    assert f.shape == (1, 2, 128, 128) and cert.shape == (1, 128, 128)
    assert np.median(f[0, 0][inner]) == pytest.approx(1.5, abs=0.2)
    assert np.median(f[0, 1][inner]) == pytest.approx(-1.0, abs=0.2)


# ----------------------------------------------------------------------------- CLI


def _soma(*args):
    return subprocess.run([sys.executable, "-m", "soma_cli.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def _soma_inproc(monkeypatch, capsys, *args):
    """Run ``soma_cli.cli.main`` (the console-script entry) in this process: (exit code, out, err)."""
    from soma_cli import cli

    monkeypatch.setattr(sys, "argv", ["soma", *map(str, args)])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_missing_partner_is_one_line_error(tmp_path):
    data = make_dataset(tmp_path / "missing", n=2, size=64)
    (data / "opt" / "p01.tif").unlink()
    p = _soma("evaluate", data, "--method", "identity", "--chip", "32", "-q")
    assert p.returncode == 2, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "missing partner file" in lines[0] and "Traceback" not in p.stderr


def test_cli_mismatched_sizes_and_existing_json(tmp_path, monkeypatch, capsys):
    sizes = make_dataset(tmp_path / "sizes", n=1, size=64)
    _write(sizes / "sar" / "p00.tif", np.full((60, 64), 9, np.uint8))
    code, _, err = _soma_inproc(monkeypatch, capsys, "evaluate", sizes, "--method", "identity", "--chip", "32")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "sizes differ" in lines[0]

    data = make_dataset(tmp_path / "d", n=1, size=128)
    out = tmp_path / "eval.json"
    code, stdout, err = _soma_inproc(monkeypatch, capsys, "evaluate", data, "--protocol", "both", "--method",
                                     "identity", "--chip", "64", "--seed", "2", "--json", out)
    assert code == 0, err
    assert "protocol geo" in stdout and "protocol paper" in stdout and "identity" in stdout
    res = json.loads(out.read_text())
    assert set(res["protocols"]) == {"geo", "paper"} and res["seed"] == 2 and res["chip"] == 64
    m = res["protocols"]["geo"]["methods"]["identity"]
    assert {"cmr1", "cmr2", "cmr3", "cmr5", "rmse_mean", "rmse_median", "aepe", "px1", "s_per_mpx",
            "rel_cmr1", "rel_cmr3", "rel_rmse_median", "n"} <= set(m) and m["n"] == 4
    code, _, err = _soma_inproc(monkeypatch, capsys, "evaluate", data, "--method", "identity", "--chip", "64",
                                "--json", out)
    assert code == 2 and "--overwrite" in err
    code, _, err = _soma_inproc(monkeypatch, capsys, "evaluate", data, "--method", "identity", "--chip", "64",
                                "--json", out, "--overwrite", "-q")
    assert code == 0 and json.loads(out.read_text())["protocol"] == "geo"


# ----------------------------------------------------------------------------- real data


def test_real_pair_identity_geo(shared_data):
    r = ev.run(shared_data, "geo", ["identity"], seed=0, chip=512, limit=1, split="T11SLT")
    m = r["methods"]["identity"]
    assert r["chips"] == 4 and r["skipped"] == 0 and m["n"] == 4
    assert m["cmr1"] == 0.0 and 2.0 < m["rmse_median"] < 30.0


def test_base_chip_matches_base_chips_and_rejects_mostly_invalid_windows(tmp_path):
    """``base_chip`` (one window) gives what ``base_chips`` gives for that window, and None under
    half valid."""
    from soma_cli.preprocess import optical_to_gray, select_bands

    data = make_dataset(tmp_path / "d", n=1, size=128)
    arr = read_pair(list_pairs(data)[0])
    chips, _ = ev.base_chips(arr, 64)
    gray = optical_to_gray(select_bands(arr.opt))
    win = (slice(0, 64), slice(64, 128))  # window 1 of the 2x2 grid
    one = ev.base_chip(arr.name, 1, gray[win], arr.opt_valid[win], arr.sar[win], arr.sar_valid[win])
    ref = chips[1]
    assert one.index == ref.index == 1 and one.pair == ref.pair
    for k in ("opt", "sar", "sar_log", "opt_valid", "sar_valid"):
        assert np.array_equal(getattr(one, k), getattr(ref, k), equal_nan=True), k
    sv = arr.sar_valid[win].copy()
    sv[:, :40] = False  # 62.5 % invalid
    assert ev.base_chip(arr.name, 1, gray[win], arr.opt_valid[win], arr.sar[win], sv) is None


def test_numpy_stages_and_training_import_without_rasterio():
    """rasterio stays behind io/: the numpy stages of a run (preprocessing, tiling, stitching,
    warping, QA) and training (on a GPU machine with torch, numpy and scipy only) import without it."""
    code = ("import sys; sys.modules['rasterio'] = None\n"
            "from soma_cli import preprocess, qa, stitch, tiling, train, warp\n"
            "assert callable(preprocess.prepare) and callable(train.fit)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_png_chip_dataset_scores_as_its_geotiff_twin(tmp_path):
    """A dataset of plain PNG chips (no georeferencing, as SEN1-2 ships them) is found and read,
    and scores exactly as the same pixels in GeoTIFFs; two files with one stem are refused."""
    tif = make_dataset(tmp_path / "tif", n=2, size=128)
    png = tmp_path / "png"
    for entry in list_pairs(tif):
        for kind, src in (("sar", entry.sar), ("opt", entry.opt)):
            with rasterio.open(src) as s:
                arr = s.read()
            (png / kind).mkdir(parents=True, exist_ok=True)
            with rasterio.open(png / kind / f"{entry.name}.png", "w", driver="PNG", width=arr.shape[2],
                               height=arr.shape[1], count=arr.shape[0], dtype=arr.dtype) as d:
                d.write(arr)
    assert [e.opt.suffix for e in list_pairs(png)] == [".png", ".png"]
    a = ev.run(tif, "both", ["identity", ConstantMatcher()], seed=3, chip=64)
    b = ev.run(png, "both", ["identity", ConstantMatcher()], seed=3, chip=64)
    for p in ("geo", "paper"):
        assert a["protocols"][p]["methods"]["identity"]["rmse_median"] > 1.0
        for m in ("identity", "constant"):
            for k in ("rmse_mean", "rel_rmse_mean", "cmr3", "n"):
                assert b["protocols"][p]["methods"][m][k] == pytest.approx(a["protocols"][p]["methods"][m][k])
    with rasterio.open(png / "sar" / "p00.png") as s:
        arr = s.read()
    with rasterio.open(png / "sar" / "p00.tif", "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1],
                       count=1, dtype=arr.dtype) as d:
        d.write(arr)
    with pytest.raises(DataError, match="could be pair p00"):
        list_pairs(png)
