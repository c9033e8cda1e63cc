"""The run-time error estimate (``soma register --check``) and ``--method auto``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyogrio
import rasterio
from scipy import ndimage

from soma_cli import check
from soma_cli.io.sinks import FLOW_DESCRIPTIONS
from soma_cli.matchers.auto import AutoMatcher
from soma_cli.matchers.gradient import GradientMatcher
from soma_cli.pipeline import RegisterOptions, register
from soma_cli.verdict import judge

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BUMP = 4.0  # px


def bump_region(h: int, w: int) -> np.ndarray:
    """The top half's left three quarters (3/8 of the tile), where the stub errs."""
    m = np.zeros((h, w), bool)
    m[: h // 2, : 3 * w // 4] = True
    return m


class Oracle:
    """A stub matcher that knows the truth: the SAR tiles it sees first are the originals, matched
    by a zero flow (the pairs are co-registered); any other SAR is the check's deformed copy,
    matched by the check's deformation.  ``error(i, h, w)`` (2, h, w) is added to tile ``i``'s
    answer for the deformed copy only: an error that does not move with the content, the kind the
    check is meant to see."""

    name = "oracle"

    def __init__(self, error=None):
        self.error = error
        self.originals = None

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        if self.originals is None:
            self.originals = np.array(sar, copy=True)
        out = np.zeros((b, 2, h, w), np.float32)
        for i in range(b):
            if not np.array_equal(sar[i], self.originals[i]):
                out[i] = check.deformation(h, w).forward()
                if self.error is not None:
                    out[i] += self.error(i, h, w)
        return out, np.ones((b, h, w), np.float32)


def bump(i, h, w):
    return np.stack([BUMP * bump_region(h, w), np.zeros((h, w))]).astype(np.float32)


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return ndimage.gaussian_filter(rng.normal(size=(h, w)), 2.0).astype(np.float32)


def test_the_estimate_flags_the_region_where_the_matcher_errs_and_not_the_rest():
    h = w = 256
    img = texture(h, w)[None]
    valid = np.ones((1, h, w), bool)
    oracle = Oracle(bump)
    est = check.estimate(oracle.match, img, img, valid, valid, oracle.match(img, img)[0])[0]
    region = bump_region(h, w)
    inner = ndimage.binary_erosion(region, iterations=48)  # away from the region's edge (the 48 px window)
    outer = ndimage.binary_erosion(~region, iterations=48, border_value=1)
    assert np.nanmin(est[inner]) > BUMP - 0.5
    assert np.nanmax(est[outer]) < 0.25
    # a right matcher: no error anywhere it can be measured
    oracle = Oracle()
    right = check.estimate(oracle.match, img, img, valid, valid, oracle.match(img, img)[0])[0]
    assert np.isfinite(right).mean() > 0.8 and np.nanmax(right) < 0.25


def _register(tmp_path: Path, name: str, matcher, **kw):
    out, disp, tp = tmp_path / f"{name}.tif", tmp_path / f"{name}_disp.tif", tmp_path / f"{name}.gpkg"
    res = register(RegisterOptions(sar=EXAMPLES / "s1_vh.tif", opt=EXAMPLES / "s2_rgb.tif", out=out, flow_out=disp,
                                   tiepoints_out=tp, tiepoint_step=32, threads=1, **kw), matcher=matcher)
    with rasterio.open(disp) as d:
        bands, desc, nodata = d.read(), d.descriptions, d.nodata
    return res, bands, desc, nodata, tp


def test_register_writes_the_estimate_as_band_4_and_tie_points_use_it(tmp_path):
    res, bands, desc, nodata, tp = _register(tmp_path, "checked", Oracle(bump), qa_out=tmp_path / "qa", check=True)
    assert bands.shape[0] == 4 and desc[3] == FLOW_DESCRIPTIONS[3]
    h, w = bands.shape[1:]
    err = np.where(bands[3] == nodata, np.nan, bands[3])
    region = bump_region(h, w)
    assert np.nanmedian(err[region]) > BUMP - 0.5 and np.nanmedian(err[~region]) < 0.25
    assert np.allclose(bands[:2], 0.0)  # the check does not change the flow
    # 3/8 of the scene is estimated at 4 px: the summary says so and the verdict is doubtful
    assert 0.3 < res.check["share_over_3px"] < 0.45 and res.check["median_px"] < 1
    assert res.verdict["status"] == "doubtful" and "estimated error" in res.verdict["reason"]
    assert (tmp_path / "qa" / "estimated_error.png").is_file()
    assert (tmp_path / "qa" / "check_calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the shipped plot
    summary = json.loads((tmp_path / "qa" / "summary.json").read_text())
    assert summary["verdict"]["estimated_error"]["share_over_3px"] == res.check["share_over_3px"]
    info = pyogrio.read_info(tp, layer="tiepoints")
    t = dict(zip(info["fields"], pyogrio.raw.read(tp, layer="tiepoints")[3]))
    inside = (t["col"] < 3 * w // 4 - 48) & (t["row"] < h // 2 - 48)
    assert (t["est_error"][inside] > 1).all() and not t["reliable"][inside].any()
    far = (t["col"] > 3 * w // 4 + 48) | (t["row"] > h // 2 + 48)
    assert (t["est_error"][far] < 1).all() and t["reliable"][far].all()


def test_no_check_writes_three_bands_and_no_estimate(tmp_path):
    res, bands, desc, _, tp = _register(tmp_path, "unchecked", Oracle(bump), check=False)
    assert bands.shape[0] == 3 and list(desc) == list(FLOW_DESCRIPTIONS[:3])
    assert res.check is None and "estimated_error" not in res.verdict and res.verdict["status"] == "ok"
    t = dict(zip(pyogrio.read_info(tp, layer="tiepoints")["fields"], pyogrio.raw.read(tp, layer="tiepoints")[3]))
    assert np.isnan(t["est_error"]).all() and t["reliable"].all()


def test_band_4_is_documented():
    for doc in (REPO / "README.md", REPO / "docs" / "register.md"):
        text = doc.read_text()
        assert "band 4" in text.lower() and "estimated error" in text.lower(), doc


def test_the_verdict_uses_the_estimate():
    base = {"coverage": 0.8, "similarity_before": 0.1, "similarity_after": 0.2}

    def est(med, over3):
        return {"median_px": med, "share_over_1px": 1.0, "share_over_3px": over3}

    assert judge(**base, estimated_error=est(0.3, 0.0))["status"] == "ok"
    assert judge(**base, estimated_error=est(0.3, 0.5))["status"] == "doubtful"
    assert judge(**base, estimated_error=est(1.5, 0.1))["status"] == "doubtful"
    assert judge(**base, estimated_error=est(4.0, 0.9))["status"] == "failed"
    assert judge(**base, estimated_error=est(float("nan"), float("nan")))["status"] == "ok"  # no estimate


class Broken(Oracle):
    """The oracle, except that tile 1 gets a new large random flow on every call (a network that
    fails there)."""

    calls = 0

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        flow, cert = super().match(opt, sar, opt_valid, sar_valid)
        self.calls += 1
        flow[1] = np.random.default_rng(self.calls).normal(scale=8.0, size=flow[1].shape)
        return flow, cert


def test_auto_takes_gradient_on_the_tile_where_the_network_fails():
    h = w = 256
    opt = np.stack([texture(h, w, 1), texture(h, w, 2)])
    valid = np.ones(opt.shape, bool)
    auto = AutoMatcher(Broken(), GradientMatcher(threads=1))
    flow, _, est = auto.checked_match(opt, opt.copy(), valid, valid)
    assert auto.fallback_tiles == 1
    assert np.array_equal(flow[0], np.zeros((2, h, w)))  # the network's right answer is kept
    assert np.nanmedian(np.hypot(*flow[1])) < 0.5  # gradient's: the images are the same
    assert check.tile_error(est[0]) < 0.25 and check.tile_error(est[1]) < 1.0
