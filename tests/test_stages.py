"""The stages ``soma register`` wires together, one at a time: the coords conventions they share,
the preprocessing chain, the row warper and the raster sinks."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import rasterio.enums
import rasterio.vrt
from rasterio.transform import from_origin

from soma_cli import coords, preprocess, synth
from soma_cli.io.pair import open_pair
from soma_cli.io.sinks import FLOW_NODATA, FlowScratch, FlowSink, ImageSink
from soma_cli.qa import FlowOverview
from soma_cli.stitch import SAMPLE_STEP, FlowPrior, FlowSamples, Strip
from soma_cli.warp import RowWarper

T0 = from_origin(500000.0, 3800000.0, 10.0, 10.0)


def _write(path, data, nodata=None):
    data = np.asarray(data)
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32611", transform=T0, nodata=nodata) as ds:
        ds.write(data)
    return path


@pytest.mark.parametrize("start,n,step", [(0, 10, 3), (5, 17, 4), (7, 3, 8), (16, 16, 8)])
def test_stride_offsets_are_the_decimated_grid(start, n, step):
    got = coords.stride_offsets(start, n, step)
    assert got.tolist() == [k for k in range(n) if (start + k) % step == 0]


def test_affine_flow_points_agree_with_the_affine_flow_field():
    a = np.array([[1.01, 0.02, 3.5], [-0.015, 0.99, -2.0]])
    field = coords.affine_to_flow_np(a, 20, 30, col0=100.0, row0=40.0)
    yy, xx = np.meshgrid(np.arange(40, 60, 5), np.arange(100, 130, 5), indexing="ij")
    dx, dy = coords.affine_flow_points_np(a, xx, yy)
    assert np.allclose(dx, field[0, ::5, ::5], atol=1e-4) and np.allclose(dy, field[1, ::5, ::5], atol=1e-4)
    decimated = coords.flow_to_stride_np(np.stack([dx, dy]), 5)
    assert np.allclose(decimated * 5, np.stack([dx, dy]))


def test_invert_match_carries_the_match_and_its_certainty_to_the_other_grid():
    h = w = 96
    f = synth.draw(np.random.default_rng(1), h, w, synth.GEO).forward()
    cert = np.linspace(0.0, 1.0, h * w, dtype=np.float32).reshape(h, w)
    g, c = coords.invert_match_np(f, cert)
    back = coords.compose_flow_np(g, f)  # f, then g: the identity where both are defined
    inner = (slice(16, -16), slice(16, -16))
    assert np.abs(back[:, inner[0], inner[1]]).max() < 0.05
    # the certainty of B pixel p is that of the A pixel it matches, p + g(p)
    assert np.allclose(c, coords.warp_np(cert, g, order=1, edge=True))


def test_prepare_is_the_chain_of_gray_and_standardise():
    rng = np.random.default_rng(0)
    opt = rng.random((3, 40, 50)).astype(np.float32) * 1000
    sar = rng.gamma(2.0, 100.0, (1, 40, 50)).astype(np.float32)
    valid = np.ones((40, 50), bool)
    valid[:5] = False
    assert np.array_equal(preprocess.prepare(opt, valid, optical=True),
                          preprocess.standardise(preprocess.optical_to_gray(opt), valid))
    got = preprocess.prepare(sar, valid, optical=False, sar_scale="amplitude")
    assert np.array_equal(got, preprocess.standardise(preprocess.sar_to_log(sar[0], "amplitude", valid), valid))
    assert np.array_equal(got, preprocess.prepare(sar[0], valid, optical=False, sar_scale="amplitude"))
    assert (got[:5] == 0).all() and abs(float(np.median(got[valid]))) < 1e-3


def test_flow_samples_and_overview_keep_the_stride_grid():
    flow = np.stack(np.meshgrid(np.arange(30, dtype=np.float32), np.arange(20, dtype=np.float32))[::-1])
    flow = np.stack([flow[1], flow[0]])  # dx = column, dy = row (window-relative)
    strips = [Strip(0, flow[:, :11], np.ones((11, 30), np.float32), np.ones((11, 30), bool)),
              Strip(11, flow[:, 11:], np.ones((9, 30), np.float32), np.ones((9, 30), bool))]
    samples, ov = FlowSamples(), FlowOverview(20, 30)
    for s in strips:
        samples.add(s, 100, 200)
        ov.add(s)
    x, y, dx, dy, _ = samples.arrays()
    assert set(np.unique(y - 100)) == set(range(0, 20, SAMPLE_STEP))
    assert np.array_equal(dx, x - 200) and np.array_equal(dy, y - 100)
    f, c = ov.arrays()
    assert ov.step == 1 and f.shape == (2, 20, 30) and np.array_equal(f, flow) and c.shape == (20, 30)


def test_row_warper_reads_only_the_rows_it_needs_and_marks_invalid_sources():
    src = np.arange(60 * 40, dtype=np.float64).reshape(1, 60, 40)
    src_valid = np.ones((60, 40), bool)
    src_valid[:, 30:] = False
    calls = []

    def read_block(r0, r1, c0, c1):
        calls.append((r0, r1, c0, c1))
        return src[:, r0:r1, c0:c1], src_valid[r0:r1, c0:c1]

    warper = RowWarper(read_block, bands=1, height=60, width=40, col0=5, order=1)
    flow = np.zeros((2, 4, 30), np.float32)
    flow[0] += 2.0  # sample two columns to the right
    flow[:, :, -1] = np.nan
    data, valid = warper(flow, 20)
    assert calls == [(17, 27, 4, 39)]  # the sampled extent plus the margin
    assert data.shape == (1, 4, 40) and valid.shape == (4, 40)
    assert not valid[:, :5].any() and not valid[:, 34].any()  # outside the window; the NaN column
    assert np.array_equal(data[0, :, 5:28][valid[:, 5:28]], src[0, 20:24, 7:30].ravel())
    assert not valid[:, 28:34].any()  # lands on invalid source columns
    empty, none = warper(np.full((2, 3, 30), np.nan), 0)
    assert not none.any() and np.isnan(empty).all() and len(calls) == 1


def test_row_warper_on_an_all_valid_source_samples_as_warp_np():
    """Where the block read is valid everywhere, the warper samples as :func:`coords.warp_np` does
    over the whole image, valid exactly where the sample lies inside it (and the flow is finite)."""
    rng = np.random.default_rng(4)
    src = rng.uniform(0, 255, (2, 50, 40))
    warper = RowWarper(lambda r0, r1, c0, c1: (src[:, r0:r1, c0:c1], np.ones((r1 - r0, c1 - c0), bool)),
                       bands=2, height=50, width=40, col0=0, order=1)
    flow = rng.uniform(-4, 4, (2, 6, 40)).astype(np.float32)
    flow[:, 2, 7] = np.nan
    data, valid = warper(flow, 10)
    shifted = flow.astype(np.float64) + np.array([0.0, 10.0])[:, None, None]  # rows 10.. of the image
    ref = coords.warp_np(src, np.nan_to_num(shifted), order=1, cval=np.nan)
    inside = coords.inside_mask_np(np.nan_to_num(shifted), 50, 40) & np.isfinite(flow).all(0)
    assert np.array_equal(valid, inside) and 0 < valid.sum() < valid.size
    assert np.array_equal(data[:, valid], ref[:, valid]) and np.isnan(data[:, ~valid]).all()


def test_repair_prior_field_equals_the_pointwise_prior():
    """FlowPrior.field (separable over a block's rows and columns) equals the affine plus the residual
    interpolated at each pixel, within float32 rounding, across the grid's edges."""
    rng = np.random.default_rng(3)
    x, y = rng.uniform(5, 205, 400), rng.uniform(3, 123, 400)
    prior = FlowPrior(x, y, rng.normal(0, 1, 400), rng.normal(0, 1, 400), rng.uniform(0.1, 1, 400),
                      np.array([[1.002, 0.001, 3.0], [-0.002, 0.999, -1.5]]), 120, 200, 3, 5, sigma_px=32.0)
    for row, col, h, w in ((3, 5, 120, 200), (50, 60, 7, 31), (0, 0, 3, 4)):
        yy, xx = np.meshgrid(np.arange(row, row + h, dtype=np.float64), np.arange(col, col + w, dtype=np.float64),
                             indexing="ij")
        rx, ry = prior._residual_at(xx, yy)
        ax, ay = prior._affine(xx, yy)
        np.testing.assert_allclose(prior.field(row, col, h, w), np.stack([ax + rx, ay + ry]), atol=1e-5)


@pytest.mark.parametrize("nodata", [None, 0])
def test_a_moving_raster_on_the_reference_grid_reads_as_through_the_warper(tmp_path, nodata):
    """On the reference grid already, the moving raster is read as it is: the same values and
    mask as through the warper, with a nodata value and without one."""
    rng = np.random.default_rng(1)
    opt = _write(tmp_path / "opt.tif", (rng.random((3, 60, 50)) * 200 + 20).astype(np.uint8))
    data = (rng.random((1, 60, 50)) * 200 + 1).astype(np.uint8)
    data[0, :7, :9] = 0
    sar = _write(tmp_path / "sar.tif", data, nodata=nodata)
    with open_pair(sar, opt) as pair:
        assert pair.same_grid and pair.mov is pair.mov_src
        with rasterio.vrt.WarpedVRT(pair.mov_src, crs=pair.ref.crs, transform=pair.ref.transform,
                                    width=pair.ref.width, height=pair.ref.height,
                                    resampling=rasterio.enums.Resampling.bilinear,
                                    **({"add_alpha": True} if nodata is None
                                       else {"src_nodata": 0, "nodata": 0})) as vrt:
            want, want_mask = vrt.read(1), vrt.read_masks(1) > 0
        got, valid = pair.read(pair.window, reference=False)
        block, block_valid = pair.read_moving_block(5, 40, 3, 50)
    np.testing.assert_array_equal(valid, want_mask)
    np.testing.assert_array_equal(got[0][valid], want[valid].astype(np.float32))
    np.testing.assert_array_equal(block_valid, want_mask[5:40, 3:50])
    np.testing.assert_array_equal(block[0][block_valid], want[5:40, 3:50][block_valid])
    assert valid[:7, :9].any() == (nodata is None)


def test_sinks_fill_unwritten_rows_and_leave_nothing_on_failure(tmp_path):
    rng = np.random.default_rng(0)
    opt = _write(tmp_path / "opt.tif", (rng.random((3, 70, 50)) * 200 + 20).astype(np.uint8))
    sar = _write(tmp_path / "sar.tif", (rng.random((1, 70, 50)) * 200 + 20).astype(np.uint8))
    with open_pair(sar, opt) as pair:
        with ImageSink(pair, tmp_path / "img.tif") as sink, FlowSink(pair, tmp_path / "flow.tif") as fsink:
            data = np.full((1, 10, 50), 99.6)
            valid = np.ones((10, 50), bool)
            valid[:, :3] = False
            sink.write(data, valid, 20)
            strip = Strip(20, np.ones((2, 10, 50), np.float32), np.full((10, 50), 0.5, np.float32), valid)
            fsink.write(strip, 20)
        with pytest.raises(RuntimeError):
            with ImageSink(pair, tmp_path / "broken.tif") as sink:
                sink.write(data, valid, 0)
                raise RuntimeError("interrupted")
    with rasterio.open(tmp_path / "img.tif") as a, rasterio.open(tmp_path / "flow.tif") as f:
        img, mask, fl = a.read(1), a.read_masks(1) > 0, f.read()
        assert a.dtypes[0] == "uint8" and f.descriptions[0].startswith("dx")
    assert (img[20:30, 3:] == 100).all() and mask[20:30, 3:].all()  # rounded, valid
    assert not mask[:20].any() and not mask[30:].any() and not mask[20:30, :3].any()
    assert (fl[:, :20] == FLOW_NODATA).all() and (fl[:, 30:] == FLOW_NODATA).all()
    assert (fl[2, 20:30, 3:] == 0.5).all() and (fl[:, 20:30, :3] == FLOW_NODATA).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.tif", "img.tif", "opt.tif", "sar.tif"]


def test_flow_scratch_round_trip_and_cleanup(tmp_path):
    with FlowScratch(tmp_path, 700, 40) as scratch:
        flow = np.random.default_rng(0).normal(size=(2, 700, 40)).astype(np.float32)
        valid = np.ones((700, 40), bool)
        valid[100:110, 5] = False
        for a in range(0, 700, 300):
            sl = slice(a, a + 300)
            scratch.write(Strip(a, flow[:, sl], np.full((len(range(700)[sl]), 40), 0.25, np.float32), valid[sl]))
        back = list(scratch.strips())
    assert [s.row0 for s in back] == [0, 512]
    got = np.concatenate([s.flow for s in back], axis=1)
    assert np.array_equal(got[:, valid], flow[:, valid]) and np.isnan(got[:, ~valid]).all()
    cert = np.concatenate([s.certainty for s in back])
    assert (cert[valid] == 0.25).all() and (cert[~valid] == 0).all()
    assert np.array_equal(np.concatenate([s.valid for s in back]), valid)
    assert list(tmp_path.iterdir()) == []
