"""Coordinate conventions: one module, sub-pixel round trips."""

import numpy as np
import torch
from affine import Affine

from soma_cli import coords, synth
from soma_cli.model import geometry


def test_pixel_norm_round_trip_and_edges():
    c = np.array([0.0, 3.25, 99.0])
    n = coords.pixel_to_norm(c, 100)
    np.testing.assert_allclose(coords.norm_to_pixel(n, 100), c, atol=1e-12)
    # align_corners=False: -1 and +1 are the outer edges, i.e. pixel -0.5 and W-0.5
    np.testing.assert_allclose(coords.pixel_to_norm(np.array([-0.5, 99.5]), 100), [-1.0, 1.0])


def test_pixel_map_round_trip_uses_pixel_centres():
    t = Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 3800000.0)
    x, y = coords.pixel_to_map(t, [0, 12.3], [0, 7.7])
    np.testing.assert_allclose([x[0], y[0]], [500005.0, 3799995.0])  # centre of pixel (0, 0)
    c, r = coords.map_to_pixel(t, x, y)
    np.testing.assert_allclose(c, [0, 12.3], atol=1e-9)
    np.testing.assert_allclose(r, [0, 7.7], atol=1e-9)


def test_torch_and_numpy_warps_agree_and_follow_the_flow_convention():
    rng = np.random.default_rng(0)
    img = rng.random((40, 50)).astype(np.float32)
    flow = rng.uniform(-3, 3, (2, 40, 50)).astype(np.float32)
    a = coords.warp_np(img, flow, order=1, cval=0)
    b = geometry.warp(torch.from_numpy(img)[None, None], torch.from_numpy(flow)[None])[0, 0].numpy()
    m = coords.inside_mask_np(flow, 40, 50)
    assert np.abs(a - b)[m].max() < 1e-4
    # convention: out(c, r) = img(c + dx, r + dy); a shift of exactly (+2, +1) moves content back
    shift = np.stack([np.full((40, 50), 2.0), np.full((40, 50), 1.0)]).astype(np.float32)
    out = coords.warp_np(img, shift, order=1, cval=np.nan)
    np.testing.assert_allclose(out[5, 5], img[6, 7])


def test_upsampled_flow_is_rescaled_and_matches_the_level_affine():
    a = torch.tensor([[[0.99, -0.05, 7.3], [0.04, 1.01, -2.2]]], dtype=torch.float64)
    for s in (2, 4, 8):
        lvl = geometry.affine_to_flow(geometry.scale_affine(a, float(s)), 128 // s, 128 // s)
        up = geometry.upsample_flow(lvl, s)
        full = geometry.affine_to_flow(a, 128, 128)
        assert (up - full)[..., s:-s, s:-s].abs().max() < 1e-9
        np.testing.assert_allclose(coords.scale_affine_np(a[0].numpy(), s), geometry.scale_affine(a, float(s))[0].numpy())


def test_subsample_and_densify_round_trip():
    """densify puts subsample's samples back at their pixels: a linear field is reproduced exactly
    between the first and last sample, and held constant beyond them."""
    h, w = 37, 50
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    field = torch.stack([0.3 * xx - 0.1 * yy + 2.0, 0.05 * xx + 0.2 * yy], 0).unsqueeze(0)
    assert torch.equal(geometry.subsample(field, 1), field)
    assert torch.equal(geometry.densify(field, 1, h, w), field)
    for step in (2, 3, 4):
        o = step // 2
        s = geometry.subsample(field, step)
        assert s[0, 0, 1, 2].item() == field[0, 0, step + o, 2 * step + o].item()
        back = geometry.densify(s, step, h, w)
        last_r = o + step * (s.shape[-2] - 1)
        last_c = o + step * (s.shape[-1] - 1)
        inner = (slice(None), slice(None), slice(o, last_r + 1), slice(o, last_c + 1))
        assert (back[inner] - field[inner]).abs().max() < 1e-9, step
        assert torch.allclose(back[..., :o, o:last_c + 1], field[..., o:o + 1, o:last_c + 1].expand(1, 2, o, -1))
        assert torch.allclose(back[..., last_r:, last_c:], field[..., last_r:last_r + 1, last_c:last_c + 1].expand_as(back[..., last_r:, last_c:]))


def test_affine_composition_order():
    rng = np.random.default_rng(1)
    a = np.array([[1.02, 0.1, 3.0], [-0.05, 0.97, -1.0]])
    b = np.array([[0.95, -0.02, -4.0], [0.03, 1.05, 2.5]])
    p = rng.uniform(0, 100, (2, 5))
    ph = np.vstack([p, np.ones(5)])
    expected = a @ np.vstack([b @ ph, np.ones(5)])  # b first, then a
    np.testing.assert_allclose(coords.compose_affine_np(a, b) @ ph, expected)
    t = geometry.compose_affine(torch.tensor(a)[None], torch.tensor(b)[None])[0].numpy()
    np.testing.assert_allclose(t, coords.compose_affine_np(a, b))


def test_flow_inverse_and_composition_round_trip():
    d = synth.draw(np.random.default_rng(2), 128, 128, synth.DeformParams(rot_deg=2, trans_px=5, local_px=3))
    f = d.forward()
    g = coords.invert_flow_np(f)
    # g(q + f(q)) = -f(q) away from the border
    back = coords.warp_np(g, f, order=1, edge=True)
    assert np.abs(back + f)[:, 10:-10, 10:-10].max() < 0.05
    # composing f with its inverse gives ~zero
    zero = coords.compose_flow_np(g, f)
    assert np.abs(zero)[:, 10:-10, 10:-10].max() < 0.05
    # the torch twin gives the same composition, edges included
    tz = geometry.compose_flow(torch.from_numpy(g)[None], torch.from_numpy(f)[None])[0].numpy()
    np.testing.assert_allclose(tz, zero, atol=1e-4)


def test_affine_after_flow_is_the_exact_composition():
    """A match found in an image warped by the affine ``a``, composed back: the same as
    compose_flow with the affine's flow where the moved points stay inside the grid, and exact
    (``a(q + f(q)) - q``) outside it too."""
    a = torch.tensor([[[0.98, -0.17, 12.0], [0.17, 0.98, -7.5]]], dtype=torch.float64)
    d = synth.draw(np.random.default_rng(5), 96, 96, synth.DeformParams(local_px=3))
    f = torch.from_numpy(d.forward()).double()[None]
    out = geometry.affine_after_flow(a, f)
    q = geometry.base_grid(1, 96, 96, f.device, f.dtype)
    p = q + f
    expected = torch.einsum("bij,bjhw->bihw", a[:, :, :2], p) + a[:, :, 2].view(1, 2, 1, 1) - q
    torch.testing.assert_close(out, expected)
    via_flow = geometry.compose_flow(geometry.affine_to_flow(a, 96, 96), f)
    torch.testing.assert_close(out[..., 8:-8, 8:-8], via_flow[..., 8:-8, 8:-8], atol=1e-6, rtol=0)


def test_synthetic_deformation_ground_truth_is_exact():
    d = synth.draw_for("paper", 0, "x", 0, 256, 256)
    f, b = d.forward(), d.backward()
    inside = coords.inside_mask_np(f, 256, 256)
    assert np.abs(coords.warp_np(b, f, order=1, edge=True) + f)[:, inside].max() < 1e-3


def test_weighted_affine_fit_is_robust_to_outliers():
    a = np.array([[1.01, 0.02, 3.2], [-0.03, 0.99, -1.7]])
    f = coords.affine_to_flow_np(a, 120, 100)
    f[:, :20, :20] += 25.0  # a block of gross outliers
    fit, stats = coords.fit_affine_np(f, step=2)
    np.testing.assert_allclose(fit, a, atol=1e-3)
    assert stats["inliers"] < 0.99
    pts = torch.tensor(np.random.default_rng(3).uniform(0, 50, (1, 40, 2)))
    tgt = torch.bmm(pts, torch.tensor(a[:, :2]).T[None]) + torch.tensor(a[:, 2])
    np.testing.assert_allclose(geometry.fit_affine(pts, tgt, torch.ones(1, 40, dtype=torch.float64))[0].numpy(), a, atol=2e-3)


def test_robust_affine_fit_ignores_outliers_that_pull_the_plain_fit():
    """geometry.robust_fit_affine (Cauchy re-weighting) recovers the affine of the inliers where a
    quarter of the points are gross outliers; the plain weighted fit is pulled away by them."""
    a = np.array([[0.99, -0.12, 4.0], [0.12, 0.99, -2.5]])
    pts = torch.tensor(np.random.default_rng(6).uniform(0, 64, (1, 200, 2)))
    tgt = torch.bmm(pts, torch.tensor(a[:, :2]).T[None]) + torch.tensor(a[:, 2])
    tgt[:, :50] += torch.tensor([9.0, -6.0], dtype=torch.float64)
    w = torch.ones(1, 200, dtype=torch.float64)
    robust = geometry.robust_fit_affine(pts, tgt, w, 1.0, 6)[0].numpy()
    np.testing.assert_allclose(robust, a, atol=0.02)
    assert np.abs(geometry.fit_affine(pts, tgt, w)[0].numpy() - a).max() > 1.0
    # no re-weighting round: the plain fit
    torch.testing.assert_close(geometry.robust_fit_affine(pts, tgt, w, 1.0, 0), geometry.fit_affine(pts, tgt, w))
