"""The verdict on a registration and the fallback when there is no evidence: never worse than the
input.  Real pairs are cut from the shared dataset (003 of the held-out tile, 127 of the training
tile: unrelated content) and written on one grid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window
from scipy import ndimage

from soma_cli import batch, batch_pairs, coords
from soma_cli.errors import InputError, RegistrationFailed
from soma_cli.pipeline import RegisterOptions, register
from soma_cli.stitch import FlowSamples, Strip
from soma_cli.tiling import Tile
from soma_cli.verdict import COVERAGE_DOUBTFUL, SIMILARITY_DROP, TILE_EVIDENCE, TileEvidence, judge

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# ---------------------------------------------------------------------------------------------- rules


def test_judge_ok_failed_and_doubtful():
    ok = judge(0.8, 0.10, 0.15, 0.0, [0.8], [100])
    assert ok["status"] == "ok" and "0.100 -> 0.150" in ok["reason"] and ok["trusted_share"] == 1.0
    none = judge(0.0, 0.1, 0.1, 0.0, [0.04, 0.0], [100, 100])
    assert none["status"] == "failed" and none["reason"].startswith("no evidence") and none["tile_failures"] == 2
    assert "4.0 %" in none["reason"]  # the best tile
    fell = judge(0.8, 0.20, 0.20 - 2 * SIMILARITY_DROP)
    assert fell["status"] == "failed" and "fell from 0.200 to 0.180" in fell["reason"]
    assert judge(0.8, 0.20, 0.20 - SIMILARITY_DROP / 2)["status"] == "ok"  # within the score's noise
    assert judge(0.8, float("nan"), 0.1)["status"] == "ok"  # not measurable: the rule is skipped
    little = judge(COVERAGE_DOUBTFUL - 0.01, 0.1, 0.15)
    assert little["status"] == "doubtful" and "little evidence" in little["reason"]
    thin = judge(TILE_EVIDENCE / 2, 0.1, 0.15, 0.0, [0.5, 0.0, 0.0], [1, 10, 10])
    assert thin["status"] == "failed" and "too little evidence" in thin["reason"]
    part = judge(0.6, 0.1, 0.15, 0.0, [0.7, 0.01], [100, 300])
    assert part["status"] == "doubtful" and part["tile_failures"] == 1 and part["trusted_share"] == 0.25
    assert "1 of 2 tiles had no evidence" in part["reason"]
    repaired = judge(0.8, 0.1, 0.15, 0.7)
    assert repaired["status"] == "doubtful" and "repaired" in repaired["reason"]
    both = judge(0.05, 0.2, 0.1, 0.0, [0.05], [10])
    assert both["status"] == "failed" and "no evidence" in both["reason"] and "fell" in both["reason"]


def test_tiles_without_evidence_lose_their_certainty_and_their_say_in_the_fit():
    ev = TileEvidence(64, 96, level=0.5)
    valid = np.ones((64, 48), bool)
    sure = np.full((64, 48), 0.9, np.float32)
    unsure = np.full((64, 48), 0.4, np.float32)
    assert np.array_equal(ev.record(Tile(0, 0, 64, 48), sure, valid), sure)
    assert not ev.record(Tile(0, 48, 64, 48), unsure, valid).any()
    assert ev.trusted().tolist() == [True, False] and ev.coverage == [1.0, 0.0]
    rows = ev.trusted_rows(8, 16)
    assert rows.shape == (16, 96) and rows[:, :48].all() and not rows[:, 48:].any()
    # the samples of the untrusted tile do not shape the fit, however certain they claim to be
    flow = np.zeros((2, 64, 96), np.float32)
    flow[0, :, :48], flow[1, :, :48] = 2.0, 1.0
    flow[0, :, 48:], flow[1, :, 48:] = 40.0, -30.0
    cert = np.concatenate([np.full((64, 48), 0.3), np.full((64, 48), 1.0)], 1).astype(np.float32)
    samples = FlowSamples()
    samples.add(Strip(0, flow, cert, np.ones((64, 96), bool)), 0, 0, ev.trusted_rows(0, 64))
    affine, _ = samples.fit()
    np.testing.assert_allclose(affine, [[1, 0, 2], [0, 1, 1]], atol=1e-6)


# ---------------------------------------------------------------------------------------------- real pairs


def _window(shared: Path, name: str, window: Window):
    with rasterio.open(shared / "sar" / f"{name}.tif") as s, rasterio.open(shared / "opt" / f"{name}.tif") as o:
        return s.read(window=window), o.read(window=window), s.window_transform(window), s.crs


def _write(path: Path, data: np.ndarray, transform, crs) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs=crs, transform=transform) as ds:
        ds.write(data)
    return path


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "soma_cli.cli", *map(str, args)], capture_output=True, text=True)


@pytest.fixture()
def unrelated(tmp_path, shared_data):
    """SAR of pair 003 and the optical image of pair 127 written with 003's georeferencing."""
    w = Window(256, 256, 512, 512)
    sar, _, t, crs = _window(shared_data, "003", w)
    _, opt_b, _, _ = _window(shared_data, "127", w)
    return _write(tmp_path / "sar.tif", sar, t, crs), _write(tmp_path / "opt.tif", opt_b, t, crs), sar


def test_unrelated_content_is_failed_and_left_unmoved(tmp_path, unrelated):
    """No evidence anywhere: flow 0, certainty 0, the moving image as it was; exit 0, and 3 with
    --strict (one line, after the outputs are written)."""
    sar_path, opt_path, sar = unrelated
    out, disp = tmp_path / "aligned.tif", tmp_path / "disp.tif"
    proc = _cli("register", sar_path, opt_path, "-o", out, "--flow-out", disp, "--json", "--check")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["verdict"]["status"] == "failed" and summary["verdict"]["reason"].startswith("no evidence")
    assert summary["median_flow"] == 0.0 and summary["verdict"]["trusted_share"] == 0.0
    with rasterio.open(disp) as f, rasterio.open(out) as a:
        fl = f.read([1, 2, 3])
        err = f.read(4)
        aligned = a.read()
    assert (fl == 0).all()  # the whole reference is the overlap: dx, dy and certainty 0 everywhere
    assert (err == f.nodata).all()  # the zero field written is not the matcher's: no error estimate
    assert np.array_equal(aligned, sar)  # one grid: the moving image unmoved is the input itself
    strict = _cli("register", sar_path, opt_path, "-o", out, "--overwrite", "--strict", "-q")
    assert strict.returncode == 3
    lines = [ln for ln in strict.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "registration failed: no evidence" in lines[0], strict.stderr
    with rasterio.open(out) as a:
        assert np.array_equal(a.read(), sar)
    # the training-free matcher has no evidence either, and --strict raises with the result attached
    with pytest.raises(RegistrationFailed) as exc:
        register(RegisterOptions(sar=sar_path, opt=opt_path, out=tmp_path / "g.tif", method="gradient", strict=True))
    assert exc.value.result.verdict["status"] == "failed" and exc.value.result.median_flow == 0.0


def test_trusted_half_registers_and_the_rest_follows_its_fit(tmp_path, shared_data):
    """Left half the real optical image, right half unrelated, one tile each: the left half
    registers as with the real pair, the right half takes the fit of the left half."""
    w = Window(0, 256, 1024, 512)
    sar, opt, t, crs = _window(shared_data, "003", w)
    _, opt_b, _, _ = _window(shared_data, "127", w)
    half = opt.copy()
    half[:, :, 512:] = opt_b[:, :, 512:]
    s = _write(tmp_path / "sar.tif", sar, t, crs)
    flows, results = {}, {}
    for name, o in (("real", opt), ("half", half)):
        disp = tmp_path / f"{name}_disp.tif"
        results[name] = register(RegisterOptions(sar=s, opt=_write(tmp_path / f"{name}.tif", o, t, crs),
                                                 out=tmp_path / f"{name}_out.tif", flow_out=disp, overlap=0,
                                                 threads=1))  # one thread count for both runs: same sums
        with rasterio.open(disp) as f:
            flows[name] = f.read()
    v = results["half"].verdict
    assert results["real"].verdict["status"] == "ok"
    assert v["status"] == "doubtful" and v["tile_failures"] == 1 and v["trusted_share"] == 0.5, v
    # left half: the same pixels through the same network give the same matches; only pixels blended
    # towards the scene prior (now fitted to the left half alone) may differ, and the real pair's run
    # repairs few of them
    diff = np.hypot(*(flows["half"][:2] - flows["real"][:2]))[:, :512]
    assert np.median(diff) == 0.0 and np.mean(diff > 0.01) < 0.05, (np.median(diff), np.mean(diff > 0.01))
    # right half: no evidence of its own, no certainty; it follows the global fit of the trusted
    # half, up to the smooth residual of that half carried across (a fraction of a pixel here)
    right = flows["half"][:, :, 512:]
    assert (right[2] == 0).all()
    fit = coords.affine_to_flow_np(np.array(results["half"].affine), 512, 1024)[:, :, 512:]
    assert np.percentile(np.hypot(*(right[:2] - fit)), 99) < 0.5
    # that fit is the left half's: over the left half it agrees with a fit to the real pair's flow
    # there (two robust fits of flows that differ in their repaired pixels: 0.65 px at a corner)
    left = FlowSamples()
    left.add(Strip(0, flows["real"][:2, :, :512], flows["real"][2, :, :512], np.ones((512, 512), bool)), 0, 0)
    dev = np.hypot(*(coords.affine_to_flow_np(np.array(results["half"].affine), 512, 512)
                     - coords.affine_to_flow_np(left.fit()[0], 512, 512)))
    assert dev.max() < 1.0, dev.max()


def test_structureless_optical_is_failed_or_no_worse_than_the_input(tmp_path, shared_data):
    """The optical image blurred until no edge is left: nothing to match.  Either the verdict is
    failed (and nothing moves) or the flow stays within the pair's own misregistration."""
    w = Window(256, 256, 512, 512)
    sar, opt, t, crs = _window(shared_data, "003", w)
    blurred = np.stack([ndimage.gaussian_filter(b.astype(np.float32), 12) for b in opt]).astype(np.uint8)
    s = _write(tmp_path / "sar.tif", sar, t, crs)
    real = register(RegisterOptions(sar=s, opt=_write(tmp_path / "opt.tif", opt, t, crs), out=tmp_path / "r.tif"))
    res = register(RegisterOptions(sar=s, opt=_write(tmp_path / "blur.tif", blurred, t, crs), out=tmp_path / "b.tif"))
    assert res.verdict["status"] == "failed" or res.median_flow <= real.median_flow + 1.0, res.verdict
    if res.verdict["status"] == "failed":
        assert res.median_flow == 0.0


@pytest.mark.parametrize("method", ["soma", "gradient"])
def test_a_64_px_overlap_is_refused_in_one_line(tmp_path, method):
    w = Window(200, 200, 64, 64)
    with rasterio.open(EXAMPLES / "s1_vh.tif") as s, rasterio.open(EXAMPLES / "s2_rgb.tif") as o:
        sar, opt, t, crs = s.read(window=w), o.read(window=w), s.window_transform(w), s.crs
    sp, op = _write(tmp_path / "s.tif", sar, t, crs), _write(tmp_path / "o.tif", opt, t, crs)
    with pytest.raises(InputError, match="needs at least 128 px"):
        register(RegisterOptions(sar=sp, opt=op, out=tmp_path / "a.tif", method=method))
    proc = _cli("register", sp, op, "-o", tmp_path / "a.tif", "--method", method)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "64 x 64 px" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.tif", "s.tif"]


class ConfidentShift:
    """A matcher sure of a wrong answer: a constant shift with certainty 1."""

    name = "confident"

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        flow = np.ones((b, 2, h, w), np.float32) * np.array([7.0, -5.0], np.float32)[None, :, None, None]
        return flow, np.ones((b, h, w), np.float32)


def test_a_result_worse_than_the_input_is_rejected_unless_forced(tmp_path):
    """The example is co-registered: shifting it by (7, -5) px lowers the edge similarity, so the
    result is rejected and the image left unmoved; --force applies it anyway."""
    with rasterio.open(EXAMPLES / "s1_vh.tif") as s:
        sar = s.read()
    flows = {}
    for force in (False, True):
        disp = tmp_path / f"d{force}.tif"
        res = register(RegisterOptions(sar=EXAMPLES / "s1_vh.tif", opt=EXAMPLES / "s2_rgb.tif", out=tmp_path / f"a{force}.tif",
                                       flow_out=disp, qa_out=tmp_path / f"qa{force}", force=force),
                       matcher=ConfidentShift())
        v = res.verdict
        assert v["status"] == "failed" and v["similarity_after"] < v["similarity_before"] - SIMILARITY_DROP, v
        assert res.median_flow == res.qa["median_flow"] and res.qa["verdict"] == v  # one definition, one verdict
        with rasterio.open(disp) as f, rasterio.open(tmp_path / f"a{force}.tif") as a:
            flows[force], aligned = f.read([1, 2, 3]), a.read()
        if not force:
            assert res.median_flow == 0.0 and np.array_equal(aligned, sar) and (flows[force] == 0).all()
        else:
            assert v["reason"].endswith("applied anyway (--force)")
            assert res.median_flow == pytest.approx(np.hypot(7, 5), abs=1e-4)
            np.testing.assert_allclose(flows[force][0], 7.0) and np.testing.assert_allclose(flows[force][1], -5.0)


def test_batch_records_the_verdict_and_strict_makes_it_a_failure(tmp_path, unrelated):
    sar_path, opt_path, _ = unrelated
    recs = {}
    for strict in (False, True):
        job = {"id": f"p{strict}", "sar": str(sar_path), "opt": str(opt_path), "pair_dir": str(tmp_path / f"p{strict}"),
               "options": {"method": "gradient", "threads": 1, "strict": strict}}
        recs[strict] = batch.run_pair(job)
    assert recs[False]["status"] == "ok" and recs[False]["verdict"]["status"] == "failed"
    assert batch_pairs.pair_state(tmp_path / "pFalse") == "done"
    assert recs[True]["status"] == "failed" and recs[True]["verdict"]["status"] == "failed"
    assert "registration failed" in recs[True]["error"] and batch_pairs.pair_state(tmp_path / "pTrue") == "failed"
