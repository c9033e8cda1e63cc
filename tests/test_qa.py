"""QA scores, QA products and the static HTML report."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from scipy import ndimage

from soma_cli import qa, report
from soma_cli.coords import warp_np
from soma_cli.errors import InputError

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


def test_write_products_and_report(tmp_path):
    ref, mov, after, flow = _scene()
    ref[:20] = np.nan  # a nodata border
    mov[:, :10] = np.nan
    cert = np.clip(np.random.default_rng(1).random(ref.shape), 0, 1).astype(np.float32)
    rows = _tile_rows(ref, mov, after, flow, cert)
    qa_dir = tmp_path / "qa"
    summary = qa.write_products(qa_dir, {"ref": ref, "mov_before": mov, "mov_after": after, "flow": flow,
                                         "certainty": cert, "scale": 2}, rows)
    for name in qa.PRODUCTS:
        assert (qa_dir / name).is_file(), name
    assert not list(qa_dir.glob(".*")), "temporary files left behind"
    for name in PNGS:
        img = imread(qa_dir / name)
        assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
        assert float(img[..., :3].var()) > 1e-4, f"{name} is blank"
    # the checkerboard differs before/after (the correction changed the moving image)
    assert not np.array_equal(imread(qa_dir / PNGS[0]), imread(qa_dir / PNGS[1]))

    disk = json.loads((qa_dir / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert disk == summary
    assert summary["tiles"] == len(rows) == 6
    assert summary["similarity_after_median"] > summary["similarity_before_median"]
    assert summary["median_dx"] == pytest.approx(2.0) and summary["median_dy"] == pytest.approx(-1.5)
    assert summary["outlier_tiles"] == 0 and summary["overview_scale"] == 2
    assert 0 < summary["valid_fraction"] < 1

    tiles = json.loads((qa_dir / "tiles.json").read_text())
    assert len(tiles) == 6 and all("outlier" in t and "row_off" in t for t in tiles)
    csv_lines = (qa_dir / "tiles.csv").read_text().splitlines()
    assert len(csv_lines) == 7 and csv_lines[0].startswith("row_off,col_off,height,width")

    page = report.render(qa_dir)
    assert page == qa_dir / "report.html"
    _check_html(page)
    text = page.read_text()
    assert "flow.png" in text and "similarity" in text


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
