"""Tile layout and strip stitching (numpy only)."""

import numpy as np
import pytest

from soma_cli import tiling
from soma_cli.errors import ConfigError
from soma_cli.stitch import StripStitcher


@pytest.mark.parametrize("h,w,size,overlap", [(1000, 700, 512, 128), (512, 512, 512, 64), (300, 2000, 256, 64),
                                              (10980, 10980, 512, 128)])
def test_layout_covers_the_area_with_inward_last_tiles(h, w, size, overlap):
    tiles = tiling.layout(h, w, size, overlap)
    cover = np.zeros((min(h, 4000), min(w, 4000)), np.int32)
    for t in tiles:
        assert 0 <= t.row and t.row + t.height <= h and 0 <= t.col and t.col + t.width <= w
        assert t.height == min(size, h) and t.width == min(size, w)
        cover[t.rows, t.cols] += 1
    assert cover.min() >= 1
    rows = sorted({t.row for t in tiles})
    assert rows[-1] == max(h - size, 0)  # the last tile is shifted inward, not padded
    steps = np.diff(rows)
    assert (steps <= size - overlap).all()  # neighbours overlap by at least `overlap`


@pytest.mark.parametrize("h,w,size", [(130, 260, 64), (512, 512, 512), (1000, 700, 256)])
def test_grid_is_non_overlapping_anchored_and_drops_the_remainder(h, w, size):
    tiles = tiling.grid(h, w, size)
    assert len(tiles) == (h // size) * (w // size)
    cover = np.zeros((h, w), np.int32)
    for t in tiles:
        assert t.row % size == 0 and t.col % size == 0 and t.height == t.width == size
        cover[t.rows, t.cols] += 1
    assert cover.max() == 1
    assert not cover[(h // size) * size:].any() and not cover[:, (w // size) * size:].any()
    assert [(t.row, t.col) for t in tiles] == sorted((t.row, t.col) for t in tiles)  # row-major


def test_validate_rejects_bad_tiling():
    with pytest.raises(ConfigError):
        tiling.validate(100, 0)
    with pytest.raises(ConfigError):
        tiling.validate(512, 400)


def test_blend_weight_ramps_and_stays_positive():
    w = tiling.blend_weight(64, 64, 16)
    assert w.min() > 0 and w.max() == 1.0
    assert w[32, 32] == 1.0 and w[0, 32] < w[8, 32] < w[20, 32]


@pytest.mark.parametrize("strip_rows", [512, 40])
def test_strip_stitcher_blends_and_streams_with_bounded_memory(strip_rows):
    h, w, size, overlap = 1500, 900, 256, 64
    tiles = tiling.layout(h, w, size, overlap)
    st = StripStitcher(h, w, overlap, strip_rows=strip_rows)
    truth_x = np.linspace(-3, 3, w, dtype=np.float32)[None, :].repeat(h, 0)
    got = np.full((2, h, w), np.nan, np.float32)
    seen = np.zeros(h, int)
    rows = list(tiling.rows_of(tiles))
    max_buffer = 0
    for i, trow in enumerate(rows):
        for t in trow:
            f = np.stack([truth_x[t.rows, t.cols], np.full((t.height, t.width), 2.0, np.float32)])
            st.add(t, f, np.ones((t.height, t.width), np.float32))
        max_buffer = max(max_buffer, st.acc.shape[1])
        upto = rows[i + 1][0].row if i + 1 < len(rows) else h
        for s in st.flush(upto):
            n = s.flow.shape[1]
            assert n <= strip_rows  # handed out in strips of at most strip_rows rows
            got[:, s.row0:s.row0 + n] = s.flow
            seen[s.row0:s.row0 + n] += 1
    for s in st.finish():
        n = s.flow.shape[1]
        got[:, s.row0:s.row0 + n] = s.flow
        seen[s.row0:s.row0 + n] += 1
    assert (seen == 1).all()  # every row handed out exactly once, in order
    assert max_buffer <= 2 * size  # memory follows the tile height, not the scene
    np.testing.assert_allclose(got[0], truth_x, atol=1e-5)
    np.testing.assert_allclose(got[1], 2.0)


def test_stitcher_prefers_confident_tiles():
    st = StripStitcher(100, 150, 50)
    a, b = tiling.Tile(0, 0, 100, 100), tiling.Tile(0, 50, 100, 100)
    st.add(a, np.zeros((2, 100, 100)), np.full((100, 100), 0.01, np.float32))
    st.add(b, np.ones((2, 100, 100)), np.full((100, 100), 1.0, np.float32))
    (s,) = list(st.finish())
    overlap = s.flow[0, :, 50:100]
    assert overlap.mean() > 0.9  # the confident tile dominates the overlap


@pytest.mark.parametrize("h,w", [(10980, 10980), (1024, 1024), (800, 800), (300, 2000), (4096, 1500), (2500, 2500),
                                 (4096, 4096), (6000, 6000)])
def test_the_default_tile_size_processes_the_fewest_pixels(h, w):
    pixels = {s: sum(t.height * t.width for t in tiling.layout(h, w, s, 128)) for s in tiling.TILE_SIZES}
    assert all(tiling.processed_pixels(h, w, s, 128) == n for s, n in pixels.items())
    chosen = tiling.choose_size(h, w, 128)
    assert pixels[chosen] == min(pixels.values())
    if list(pixels.values()).count(pixels[chosen]) > 1:
        assert chosen == min(tiling.TILE_SIZES)  # a tie goes to the smaller tiles (less memory)


def test_the_default_tile_size_for_known_scenes_and_overlaps():
    assert tiling.choose_size(10980, 10980, 128) == 672  # a Sentinel-2 tile: 400 tiles instead of 841
    assert tiling.choose_size(4096, 4096, 128) == 672  # 64 tiles of 672 px: 9 % fewer pixels than 121 of 512
    assert tiling.choose_size(1024, 1024, 128) == 672  # 4 tiles of 672 px instead of 9 of 512
    assert tiling.choose_size(800, 800, 128) == 512
    assert tiling.choose_size(4000, 4000, 300) == 672  # only 672 px tiles allow this overlap
    with pytest.raises(ConfigError):
        tiling.choose_size(4000, 4000, 400)
