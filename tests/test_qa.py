"""QA scores, QA products and the static HTML report."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import ndimage

from soma_cli import __version__ as soma_version
from soma_cli import qa, qa_figures, report
from soma_cli.coords import warp_np
from soma_cli.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNGS = ("checkerboard_before.png", "checkerboard_after.png", "flow.png", "certainty.png", "flow_hist.png")


def _scene(h=256, w=320, dx=2.0, dy=-1.5, seed=0):
    """A textured reference, the moving image misaligned by (dx, dy) and its correction."""
    rng = np.random.default_rng(seed)
    ref = ndimage.gaussian_filter(rng.normal(size=(h, w)), 2.0).astype(np.float32)
    flow = np.zeros((2, h, w), np.float32)
    flow[0], flow[1] = dx, dy
    # moving(q + flow) = ref(q): the reference content sits at q + flow in the moving image
    mov = warp_np(ref, -flow, edge=True).astype(np.float32)
    mov = mov * rng.gamma(6, 1 / 6, size=mov.shape).astype(np.float32)  # speckle-like noise
    after = warp_np(mov, flow).astype(np.float32)
    return ref, mov, after, flow


def _tile_rows(ref, mov, after, flow, cert, size=128):
    rows = []
    h, w = ref.shape
    for r0 in range(0, h, size):
        for c0 in range(0, w, size):
            s = np.s_[r0:r0 + size, c0:c0 + size]
            d = qa.tile_scores(ref[s], mov[s], after[s], flow[(slice(None),) + s], cert[s])
            d.update(row_off=r0, col_off=c0, height=ref[s].shape[0], width=ref[s].shape[1])
            rows.append(d)
    return rows


def test_tile_scores_known_shift_improves_similarity():
    ref, mov, after, flow = _scene()
    cert = np.full(ref.shape, 0.7, np.float32)
    s = qa.tile_scores(ref, mov, after, flow, cert)
    assert s["median_dx"] == pytest.approx(2.0) and s["median_dy"] == pytest.approx(-1.5)
    assert s["median_flow"] == pytest.approx(2.5, abs=1e-5)
    assert s["mean_certainty"] == pytest.approx(0.7)
    assert s["similarity_after"] > s["similarity_before"] + 0.1
    assert s["similarity_after"] > 0.5
    assert s["degraded"] is False
    # applying the correction the wrong way round makes the tile worse: degraded
    wrong = warp_np(mov, -flow).astype(np.float32)
    assert qa.tile_scores(ref, mov, wrong, flow, cert)["degraded"] is True


def test_tile_scores_respects_validity_and_empty_tiles():
    ref, mov, after, flow = _scene(64, 64)
    cert = np.ones(ref.shape, np.float32)
    none = qa.tile_scores(ref, mov, after, flow, cert, valid=np.zeros(ref.shape, bool))
    assert none["valid_fraction"] == 0 and np.isnan(none["similarity_before"]) and np.isnan(none["median_dx"])
    half = np.zeros(ref.shape, bool)
    half[:, :32] = True
    flow2 = flow.copy()
    flow2[0, :, 32:] = 50.0  # only the invalid half carries this
    s = qa.tile_scores(ref, mov, after, flow2, cert, valid=half)
    assert s["valid_fraction"] == pytest.approx(0.5)
    assert s["median_dx"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        qa.tile_scores(ref, mov, after, flow[:, :10], cert)


def test_flag_outliers_rule():
    base = dict(similarity_before=0.2, similarity_after=0.3, degraded=False, median_flow=1.0)
    rows = [dict(base, median_dx=1.0 + 0.1 * i, median_dy=0.5) for i in range(8)]
    rows.append(dict(base, median_dx=9.0, median_dy=0.5))  # deviant flow
    rows.append(dict(base, median_dx=1.2, median_dy=0.5, degraded=True))  # worse after correction
    rows.append(dict(median_dx=float("nan"), median_dy=float("nan"), degraded=False))  # empty tile
    out = qa.flag_outliers(rows)
    assert [r["outlier"] for r in out] == [False] * 8 + [True, True, False]
    assert out[8]["outlier_reason"] == "flow_deviates" and out[9]["outlier_reason"] == "degraded"
    assert out[8]["flow_deviation"] > 7
    assert "outlier" not in rows[0]  # inputs untouched


META = {"inputs": {"sar": "/data/in/s1_vh.tif", "opt": "/data/in/s2_rgb.tif"}, "method": "soma", "mode": "dense",
        "reference": "opt", "soma_version": "9.9.9", "date": "2026-01-02T03:04:05+00:00",
        "weights": {"file": "w.pt", "sha256": "ab" * 32, "version": "9.9.9"},
        "settings": {"tile_size": 128, "overlap": 32, "resampling": "bilinear"}}


def _crop(ref, mov, after, flow, cert, r0=40, c0=30, size=200):
    s = np.s_[r0:r0 + size, c0:c0 + size]
    return {"ref": ref[s], "mov_before": mov[s], "mov_after": after[s], "flow": flow[(slice(None),) + s],
            "certainty": cert[s], "origin": (r0, c0)}


def test_write_products_and_report(tmp_path):
    ref, mov, after, flow = _scene()
    ref[:20] = np.nan  # a nodata border
    mov[:, :10] = np.nan
    cert = np.clip(np.random.default_rng(1).random(ref.shape), 0, 1).astype(np.float32)
    rows = _tile_rows(ref, mov, after, flow, cert)
    qa_dir = tmp_path / "qa"
    summary = qa.write_products(qa_dir, {"ref": ref, "mov_before": mov, "mov_after": after, "flow": flow,
                                         "certainty": cert, "scale": 2}, rows, meta=META,
                                crop=_crop(ref, mov, after, flow, cert))
    for name in qa.PRODUCTS + (qa.ALIGNMENT,):
        assert (qa_dir / name).is_file(), name
    assert not list(qa_dir.glob(".*")), "temporary files left behind"
    for name in PNGS:
        img = imread(qa_dir / name)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert float(img[..., :3].var()) > 1e-4, f"{name} is blank"
    # overview pictures are titled figures of about 7 in at 100 dpi; the alignment picture is two
    # panels side by side (wider than high)
    for name in ("flow.png", "certainty.png", "checkerboard_before.png"):
        h, w = imread(qa_dir / name).shape[:2]
        assert 500 < w < 900 and 400 < h < 1000, (name, w, h)
    ah, aw = imread(qa_dir / qa.ALIGNMENT).shape[:2]
    assert 1000 < aw < 1400 and 0.4 < ah / aw < 0.75, (aw, ah)
    # the checkerboard differs before/after (the correction changed the moving image)
    assert not np.array_equal(imread(qa_dir / PNGS[0]), imread(qa_dir / PNGS[1]))

    disk = json.loads((qa_dir / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert disk == summary
    assert summary["tiles"] == len(rows) == 6
    assert summary["similarity_after_median"] > summary["similarity_before_median"]
    assert summary["median_dx"] == pytest.approx(2.0) and summary["median_dy"] == pytest.approx(-1.5)
    assert summary["outlier_tiles"] == 0 and summary["overview_scale"] == 2
    assert 0 < summary["valid_fraction"] < 1
    assert summary["run"] == META
    assert summary["files"][0] == qa.ALIGNMENT and set(qa.PRODUCTS) <= set(summary["files"])
    assert summary["alignment_crop"] == [40, 30, 200, 200]  # the whole 200 px region (< CROP)
    assert summary["flow_hist"]["beyond"] == 0  # a constant flow: nothing beyond the histogram's range

    tiles = json.loads((qa_dir / "tiles.json").read_text())
    assert len(tiles) == 6 and all("outlier" in t and "row_off" in t for t in tiles)
    csv_lines = (qa_dir / "tiles.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("row_off,col_off,height,width")

    page = report.render(qa_dir)
    assert page == qa_dir / "report.html"
    _check_html(page)
    text = page.read_text()
    assert "flow.png" in text and "similarity" in text and qa.ALIGNMENT in text
    title = re.search(r"<title>(.*?)</title>", text).group(1)
    assert "s2_rgb.tif" in title and "s1_vh.tif" in title and title.index("s2_rgb") < title.index("s1_vh")
    for value in ("/data/in/s1_vh.tif", "9.9.9", "w.pt", "ab" * 32, "2026-01-02T03:04:05+00:00", "tile_size=128"):
        assert value in text, value
    assert 'class="verdict' not in text  # no verdict in the summary: no verdict box


def test_report_shows_verdict(tmp_path):
    ref, mov, after, flow = _scene(96, 96)
    cert = np.ones(ref.shape, np.float32)
    qa_dir = tmp_path / "qa"
    qa.write_products(qa_dir, {"ref": ref, "mov_before": mov, "mov_after": after, "flow": flow,
                               "certainty": cert, "scale": 1}, [], meta=dict(META, reference="sar"))
    summary = json.loads((qa_dir / "summary.json").read_text())
    assert not (qa_dir / qa.ALIGNMENT).exists() and qa.ALIGNMENT not in summary["files"]  # no crop given
    for verdict, status in (({"status": "doubtful", "reason": "only 12% of the overlap is certain",
                              "coverage": 0.12}, "doubtful"), ("failed", "failed")):
        summary["verdict"] = verdict
        (qa_dir / "summary.json").write_text(json.dumps(summary))
        text = report.render(qa_dir).read_text()
        box = re.search(r'<div class="verdict (v-\w+)"><b>(\w+)</b>', text)
        assert box and box.groups() == (f"v-{status}", status)
        if isinstance(verdict, dict):
            assert "only 12% of the overlap is certain" in text and "coverage: 0.120" in text
    # reference sar: the SAR is the reference, named first
    title = re.search(r"<title>(.*?)</title>", text).group(1)
    assert title.index("s1_vh") < title.index("s2_rgb")


def test_histogram_states_clipping(tmp_path):
    ref, mov, after, flow = _scene(128, 128)
    flow[:, :4, :4] = 60.0  # 16 pixels far beyond the rest: a long tail
    cert = np.ones(ref.shape, np.float32)
    qa_dir = tmp_path / "qa"
    summary = qa.write_products(qa_dir, {"ref": ref, "mov_before": mov, "mov_after": after, "flow": flow,
                                         "certainty": cert, "scale": 1}, [])
    hist = summary["flow_hist"]
    assert hist["beyond"] == 16 and hist["upper_px"] < 60 and hist["beyond_share"] == pytest.approx(16 / 128 ** 2)
    fig = qa_figures._hist_figure(np.hypot(flow[0], flow[1]), 1.0)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(lab.startswith(f"> {hist['upper_px']:.2f} px") and "16 pixels" in lab for lab in labels), labels
    text = report.render(qa_dir).read_text()
    assert "16 values" in text and f"exceed {hist['upper_px']:.2f} px" in text
    # without a tail the range is the maximum and nothing is beyond
    upper, beyond = qa_figures.hist_range(np.linspace(0.0, 3.0, 1000))
    assert upper == pytest.approx(3.0) and beyond == 0


def test_edge_map_is_thin_and_ignores_nodata():
    img = np.zeros((80, 80), np.float32)
    img[:, 40:] = 1.0  # one vertical step between columns 39 and 40
    img[:, :8] = np.nan  # a nodata strip: its border is no edge
    e = qa_figures.edge_map(img)
    cols = np.nonzero(e.any(axis=0))[0]
    assert set(cols) <= {39, 40} and e[10:70].sum(axis=1).max() == 1 and e[10:70].any(axis=1).all()
    assert not qa_figures.edge_map(np.full((20, 20), np.nan, np.float32)).any()


def test_crop_window_goes_where_the_certain_edges_are():
    rng = np.random.default_rng(5)
    opt = np.zeros((300, 300), np.float32)
    opt[150:, :150] = ndimage.gaussian_filter(rng.normal(size=(150, 150)), 2)  # texture bottom left only
    cert = np.ones(opt.shape, np.float32)
    crop = {"ref": opt, "mov_before": opt, "mov_after": opt, "certainty": cert}
    r, c, h, w = qa_figures.crop_window(crop, True, size=100)
    assert (h, w) == (100, 100) and r >= 140 and c + w <= 160
    # texture everywhere, the matcher sure only in the top right: look there
    crop["mov_after"] = crop["ref"] = ndimage.gaussian_filter(rng.normal(size=(300, 300)), 2).astype(np.float32)
    cert[:] = 0.1
    cert[:150, 150:] = 1.0
    r, c, _, _ = qa_figures.crop_window(crop, True, size=100)
    assert r + 100 <= 160 and c >= 140


def test_choose_region_centres_on_the_best_tile():
    base = dict(valid_fraction=1.0, similarity_before=0.1, similarity_after=0.2, height=256, width=256)
    rows = [dict(base, row_off=100 + r, col_off=50 + c, mean_certainty=0.3) for r in (0, 256) for c in (0, 256)]
    rows[3]["mean_certainty"] = 0.9  # bottom-right tile
    rows.append(dict(base, row_off=100, col_off=50, mean_certainty=float("nan")))  # unscored: ignored
    r, c, h, w = qa.choose_region(rows, 512, 512, origin=(100, 50), size=200)
    assert (h, w) == (200, 200) and (r + 100, c + 100) == (384, 384)
    r, c, h, w = qa.choose_region(rows, 512, 512, origin=(100, 50), size=400)  # clamped into the area
    assert (r, c, h, w) == (112, 112, 400, 400)
    assert qa.choose_region([], 100, 60, size=256) == (0, 0, 100, 60)


def test_flow_overview_keeps_the_region_at_full_resolution():
    from soma_cli.stitch import Strip

    h, w = 700, 600
    flow = np.random.default_rng(2).normal(size=(2, h, w)).astype(np.float32)
    cert = np.random.default_rng(3).random((h, w)).astype(np.float32)
    rows = [dict(valid_fraction=1.0, mean_certainty=1.0, similarity_before=0.0, similarity_after=0.5,
                 row_off=1000 + 350, col_off=2000 + 250, height=100, width=100)]
    ov = qa.FlowOverview(h, w, rows, origin=(1000, 2000))
    for r0 in range(0, h, 70):  # strips of 70 rows
        s = np.s_[r0:r0 + 70]
        ov.add(Strip(r0, flow[:, s], cert[s], np.ones_like(cert[s], bool)))
    r, c, rh, rw = ov.region
    assert (r, c, rh, rw) == (400 - qa.REGION // 2, 300 - qa.REGION // 2, qa.REGION, qa.REGION)
    f, ce = ov.region_arrays()
    np.testing.assert_array_equal(f, flow[:, r:r + rh, c:c + rw])
    np.testing.assert_array_equal(ce, cert[r:r + rh, c:c + rw])
    of, oc = ov.arrays()
    np.testing.assert_array_equal(of, flow[:, ::ov.step, ::ov.step])
    np.testing.assert_array_equal(oc, cert[::ov.step, ::ov.step])


class ShiftMatcher:
    """Every tile's flow is the constant (dx, dy), certainty 0.8."""

    name = "shift"

    def __init__(self, dx, dy):
        self.dx, self.dy = dx, dy
        self.metadata = {"sha256": "cd" * 32, "version": "1.2.3"}

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        flow = np.empty((b, 2, h, w), np.float32)
        flow[:, 0], flow[:, 1] = self.dx, self.dy
        return flow, np.full((b, h, w), 0.8, np.float32)


@pytest.mark.parametrize("reference,mode", [("opt", "dense"), ("sar", "affine")])
def test_register_writes_alignment_and_run_metadata(tmp_path, monkeypatch, reference, mode):
    from soma_cli.pipeline import RegisterOptions, register

    crops = []
    write = qa.write_products
    monkeypatch.setattr(qa, "write_products", lambda *a, **k: crops.append(k["crop"]) or write(*a, **k))
    sar, opt = EXAMPLES / "s1_vh.tif", EXAMPLES / "s2_rgb.tif"
    qa_dir = tmp_path / "qa"
    # the example is co-registered, so the verdict rejects this confident shift: --force applies it
    res = register(RegisterOptions(sar=sar, opt=opt, out=tmp_path / "a.tif", qa_out=qa_dir, method="soma",
                                   reference=reference, mode=mode, tile_size=256, overlap=0, force=True),
                   matcher=ShiftMatcher(3.0, -2.0))
    summary = json.loads((qa_dir / "summary.json").read_text())
    assert summary == res.qa
    run = summary["run"]
    assert run["inputs"] == {"sar": str(sar), "opt": str(opt)} and run["reference"] == reference
    assert (run["method"], run["mode"]) == ("soma", mode) and run["soma_version"] == soma_version
    assert run["weights"]["sha256"] == "cd" * 32 and run["weights"]["file"].endswith(".pt")
    assert run["settings"]["tile_size"] == 256 and run["settings"]["bands"] == [1, 2, 3]
    assert run["date"].endswith("+00:00")
    h, w = imread(qa_dir / qa.ALIGNMENT).shape[:2]
    assert w > h > 300
    # the moving crop after correction is the moving crop before sampled at the flow applied: the
    # matcher's (3, -2) on the optical grid, the inverse match (-3, 2) on the SAR grid
    (crop,) = crops
    assert crop["ref"].shape == crop["mov_after"].shape == crop["flow"].shape[1:] == (qa.REGION, qa.REGION)
    dx, dy = (3, -2) if reference == "opt" else (-3, 2)
    np.testing.assert_allclose(crop["flow"][0], dx, atol=1e-4)
    np.testing.assert_allclose(crop["flow"][1], dy, atol=1e-4)
    np.testing.assert_allclose(crop["mov_after"][10:-10, 10:-10],
                               crop["mov_before"][10 + dy:-10 + dy, 10 + dx:-10 + dx], atol=1e-4)
    text = report.render(qa_dir).read_text()
    names = ("s2_rgb.tif", "s1_vh.tif") if reference == "opt" else ("s1_vh.tif", "s2_rgb.tif")
    assert f"<title>SOMA QA report: {names[0]} \u2190 {names[1]}</title>" in text


def test_write_products_all_nodata(tmp_path):
    nan = np.full((40, 50), np.nan, np.float32)
    summary = qa.write_products(tmp_path / "q", {"ref": nan, "mov_before": nan, "mov_after": nan,
                                                  "flow": np.zeros((2, 40, 50), np.float32),
                                                  "certainty": np.zeros((40, 50), np.float32), "scale": 1}, [])
    assert summary["tiles"] == 0 and summary["median_flow"] is None and summary["valid_fraction"] == 0
    assert all((tmp_path / "q" / n).is_file() for n in qa.PRODUCTS)


def test_report_rejects_other_folders(tmp_path):
    with pytest.raises(InputError):
        report.render(tmp_path)
    with pytest.raises(InputError):
        report.render(tmp_path / "missing")


def _check_html(page: Path) -> None:
    """Every src/href of the page is a relative link to an existing file (or an in-page anchor)."""
    text = page.read_text()
    links = re.findall(r'(?:src|href)="([^"]+)"', text)
    assert links, "no links"
    for link in links:
        if link.startswith("#"):
            assert f'id="{link[1:]}"' in text, link
            continue
        assert "://" not in link and not link.startswith("/"), link
        assert (page.parent / link).is_file(), link


def test_pictures_name_the_inputs_and_panels():
    ref, mov, after, flow = _scene(128, 128)
    cert = np.ones(ref.shape, np.float32)
    crop = _crop(ref, mov, after, flow, cert, 0, 0, 128)
    fig = qa_figures.alignment_figure(crop, qa_figures.crop_window(crop, True, size=96), ("s2_rgb.tif", "s1_vh.tif"), True)
    assert [ax.get_title() for ax in fig.axes] == ["before", "after"]
    assert "edges of s2_rgb.tif" in fig._suptitle.get_text() and "over s1_vh.tif" in fig._suptitle.get_text()
    assert fig.axes[0].get_xlabel() == qa_figures.AXIS_LABELS[0] and fig.axes[0].get_ylabel() == qa_figures.AXIS_LABELS[1]
    fig = qa_figures._checker_figure(ref, after, "after", ("s2_rgb.tif", "s1_vh.tif"), qa_figures._extent(ref.shape, 4, (100, 200)),
                             (110, 210, 50, 50))
    ax = fig.axes[0]
    assert "after" in ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["reference: s2_rgb.tif", "moving: s1_vh.tif"]
    # axes in reference pixels: the overview's 128 px at 1:4 from (100, 200) span 512 reference px
    x0, x1 = ax.get_xlim()
    assert x0 == pytest.approx(198) and x1 == pytest.approx(200 + 4 * 127.5)


def test_batch_report_shows_verdicts_and_names(tmp_path):
    ref, mov, after, flow = _scene(96, 96)
    cert = np.ones(ref.shape, np.float32)
    for pid, status in (("a", "ok"), ("b", "failed")):
        meta = dict(META, inputs={"sar": f"/d/{pid}_s1.tif", "opt": f"/d/{pid}_s2.tif"})
        s = qa.write_products(tmp_path / pid / "qa", {"ref": ref, "mov_before": mov, "mov_after": after,
                                                      "flow": flow, "certainty": cert, "scale": 1}, [], meta=meta)
        s["verdict"] = {"status": status, "reason": f"reason {pid}"}
        (tmp_path / pid / "qa" / "summary.json").write_text(json.dumps(s))
    (tmp_path / "runlog.jsonl").write_text("".join(json.dumps({"id": p, "status": "ok"}) + "\n" for p in "ab"))
    text = report.render(tmp_path).read_text()
    _check_html(tmp_path / "report.html")
    assert '<td class="l v-ok">ok</td>' in text and '<td class="l v-failed">failed</td>' in text
    assert "a_s2.tif \u2190 a_s1.tif" in text and "b_s2.tif \u2190 b_s1.tif" in text
    assert "reason a" in text and "reason b" in text
