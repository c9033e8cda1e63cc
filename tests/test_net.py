"""SOMA network: configuration, shapes, oriented kernels, matching operators, TorchScript
export/loading, weights checks, inference."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from soma_cli import cpu, infer
from soma_cli.errors import WeightsError
from soma_cli.model import correlation as corr_ops
from soma_cli.model import encoder, geometry, loader, net, stages
from soma_cli.model.checkpoint import save_checkpoint
from soma_cli.model.config import DenseLevelConfig, EncoderConfig, GlobalConfig, SomaConfig
from soma_cli.model.export import export

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return net.SomaNet().eval()


def test_config_round_trip_and_validation():
    """The configuration survives to_dict -> JSON -> from_dict exactly; unknown, missing and
    mistyped keys, nested ones included, are refused with the key's path; it is immutable."""
    import dataclasses

    cfg = SomaConfig(global_search=GlobalConfig(radius=7), fit_iterations=2)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["encoder"]["channels"] == [16, 32, 64] and d["dense1"]["cone"] is False
    assert SomaConfig.from_dict(d) == cfg and SomaConfig.from_dict(SomaConfig().to_dict()) == SomaConfig()
    bad = [({**d, "rewarp": False}, "unknown key"), ({k: v for k, v in d.items() if k != "dense4"}, "missing key"),
           ({**d, "dense2": {**d["dense2"], "step": 1.5}}, r"config\.dense2\.step"),
           ({**d, "encoder": {**d["encoder"], "channels": [16, 32]}}, r"config\.encoder\.channels"),
           ({**d, "dense1": {**d["dense1"], "cone": 0}}, "expected bool"),
           ({**d, "global_search": {**d["global_search"], "bogus": 1}}, r"config\.global_search: unknown"),
           ([], "expected an object")]
    for data, msg in bad:
        with pytest.raises(ValueError, match=msg):
            SomaConfig.from_dict(data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.fit_iterations = 4


def test_network_follows_its_config():
    """The stages take their numbers from the configuration the network was built with."""
    cfg = SomaConfig(global_search=GlobalConfig(radius=6, candidates=1),
                     encoder=EncoderConfig(channels=(8, 16, 24), learnt=4))
    m = net.SomaNet(cfg).eval()
    assert m.config is cfg and m.global_search.radius == 6 and m.dense1.step == 4
    assert m.enc_sar.l3[0][0].out_channels == 24 and m.enc_opt.p8.out_channels == 4
    assert net.n_params(m) < net.n_params(net.SomaNet())
    with torch.inference_mode():
        out = m.run(torch.randn(1, 1, 512, 512), torch.randn(1, 1, 512, 512))
    assert out["global_scores"].shape == (1, m.global_search.n_rotations(), 13, 13)
    assert out["flow"].shape == (1, 2, 512, 512)


def test_oriented_kernels_are_exact_rotations():
    for size in (3, 5):
        gx, gy = encoder.sobel_pair(size)
        k = encoder.oriented_kernels(size, [0.0, 45.0, 90.0, 135.0])
        r = 1.0 / math.sqrt(2.0)
        assert torch.allclose(k[0], gx, atol=1e-6)
        assert torch.allclose(k[2], gy, atol=1e-6)
        assert torch.allclose(k[1], r * (gx + gy), atol=1e-6)
        assert torch.allclose(k[3], r * (gy - gx), atol=1e-6)
    assert torch.equal(encoder.sobel_pair(3)[0], torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]))
    fge = encoder.FGE(16, 4)
    assert fge.k3.requires_grad and fge.k3.shape == (8, 3, 3) and fge.k5.shape == (8, 5, 5)
    assert torch.allclose(fge.k3[4] * 8.0, encoder.sobel_pair(3)[1])


def test_fast_layers_compute_what_their_plain_forms_do():
    """The encoder's fast forms equal the plain operations they stand for: a Pointwise layer is its
    1x1 convolution, the one-channel blur by shifted sums is the depthwise convolution, the FGE and
    the gradient descriptor give the same outputs with and without autograd (in place or not, one
    grouped convolution for both kernel sizes: the FGE against its energies computed channel order
    first), an affine level's reused window statistics change nothing, and the window ZNCC's
    in-place tail gives its plain values bit for bit."""
    torch.manual_seed(3)
    pw = encoder.Pointwise(7, 5)
    x = torch.randn(2, 7, 9, 11)
    assert torch.allclose(pw(x), F.conv2d(x, pw.weight, pw.bias), atol=1e-5)
    g = encoder.gaussian_1d(1.0, 2)
    img = torch.randn(1, 1, 20, 30)
    padded = F.pad(F.pad(img, [2, 2, 0, 0], mode="replicate"), [0, 0, 2, 2], mode="replicate")
    plain = F.conv2d(F.conv2d(padded, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    assert torch.allclose(encoder.blur(img, g), plain, atol=1e-6)
    fge = encoder.FGE(16, 4)
    for p in fge.parameters():
        torch.nn.init.normal_(p, std=0.3)
    feats = torch.randn(1, 16, 24, 24)
    r = fge.reduce(feats)
    n = fge.n_dir
    e3 = F.conv2d(r, fge.k3.unsqueeze(0).expand(4, n, 3, 3).reshape(4 * n, 1, 3, 3), padding=1, groups=4)
    e5 = F.conv2d(r, fge.k5.unsqueeze(0).expand(4, n, 5, 5).reshape(4 * n, 1, 5, 5), padding=2, groups=4)
    e = torch.cat([e3, e5], 1).abs()
    e = e * torch.sigmoid(fge.se2(F.relu(fge.se1(e.mean((2, 3), keepdim=True)))))
    e = e * torch.sigmoid(fge.spatial(torch.cat([e.mean(1, keepdim=True), e.amax(1, keepdim=True)], 1)))
    reference = feats + F.conv2d(e, fge.recon.weight, fge.recon.bias)
    with torch.inference_mode():
        fast = fge(feats)
    assert torch.allclose(fast, reference, atol=1e-4) and torch.allclose(fge(feats), reference, atol=1e-4)
    a, b = torch.randn(1, 8, 40, 40), torch.randn(1, 8, 40, 40)
    stats = corr_ops.window_stats(a, 9, 4)
    assert torch.equal(corr_ops.window_zncc(a, b, 2, 9, 4, stats), corr_ops.window_zncc(a, b, 2, 9, 4))
    b[:, :, :12] = 0.0  # windows without variance (scored 0) beside the border's -1
    with torch.inference_mode():
        z_fast = corr_ops.window_zncc(a, b, 2, 9, 1)
    z_plain = corr_ops.window_zncc(a, b, 2, 9, 1)
    assert torch.equal(z_fast, z_plain)
    assert (z_plain == 0.0).any() and (z_plain == -1.0).any() and (z_plain.abs() < 1.0).any()
    gd = encoder.GradientDescriptor(1.0)
    torch.nn.init.normal_(gd.gain, std=1.0)
    with torch.inference_mode():
        e_fast = gd(img)
    e_plain = gd(img)
    assert torch.allclose(e_fast, e_plain, atol=1e-6)
    assert torch.allclose(e_plain, F.conv2d(encoder.blur(img, gd.g1), encoder.kernel_bank(gd.k3, gd.k5).unsqueeze(1),
                                            padding=2).abs() * gd.gain.view(1, -1, 1, 1), atol=1e-6)


def test_channels_last_stages_equal_their_plain_forms():
    """The encoder pools and blurs its oriented channels channels-last and the dense head
    convolves channels-last: the outputs equal the same operations on the usual layout, and come
    back in it."""
    torch.manual_seed(5)
    enc = encoder.Encoder(SomaConfig().encoder)
    img = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        m1, m2, m4, m8 = enc(img)
        e = enc.grad(img)
    assert all(m.is_contiguous() for m in (m1, m2, m4, m8))
    assert torch.allclose(m1, encoder.blur(e, enc.g2), atol=1e-6)
    for m, s in ((m2, 2), (m4, 4), (m8, 8)):
        assert torch.allclose(m[:, :16], F.avg_pool2d(e, 2 * s, s, s // 2, count_include_pad=False), atol=1e-6)
    head = stages.DenseHead(7, 16)
    torch.nn.init.normal_(head.net[-1].weight, std=0.3)
    x = torch.randn(1, 7, 32, 40)
    with torch.inference_mode():
        got = head(x)
        plain = x
        for layer in head.net:
            plain = layer(plain)
    assert got.is_contiguous() and torch.allclose(got, plain, atol=1e-5)


def test_row_sums_and_window_means_are_exact_where_they_must_be():
    """The blocked row cumulative sum equals ``torch.cumsum`` (to float rounding; the large tensor
    takes the blocked path), and the window mean of a 0/1 map is exactly 0 where the window holds
    no 1 (the matching masks' border margin relies on it), as the dilation by max pooling says."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 4, 384, 384, generator=g)
    with torch.inference_mode():
        got = corr_ops.cumsum_rows(x)
    assert torch.allclose(got, torch.cumsum(x, 2), atol=1e-3)
    bad = (torch.rand(1, 1, 768, 768, generator=g) > 0.999).float()
    with torch.inference_mode():
        near = corr_ops.box(bad, 17) > 0.0
    assert torch.equal(near, F.max_pool2d(bad, 17, 1, 8) > 0.0)
    assert 0.05 < near.float().mean().item() < 0.95


def test_param_count(model):
    assert 100_000 <= net.n_params(model) <= 1_500_000


@pytest.mark.parametrize("b,size", [(2, 256), (1, 512)])
def test_shapes_and_finite(model, b, size):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 1, size, size, generator=g)
    y = torch.randn(b, 1, size, size, generator=g)
    with torch.inference_mode():
        flow, cert = model(x, y)
    assert flow.shape == (b, 2, size, size) and cert.shape == (b, 1, size, size)
    assert torch.isfinite(flow).all() and torch.isfinite(cert).all()
    assert cert.min() >= 0 and cert.max() <= 1


def test_training_outputs_and_gradients(model):
    m = net.SomaNet().train()
    x = torch.randn(1, 1, 128, 128)
    out = m.run(x, x.clone())
    for k in ("flow", "flow2", "flow4", "affine_global", "affine8", "affine4", "logit", "global_scores"):
        assert k in out and torch.isfinite(out[k]).all(), k
    assert out["flow2"].shape[-1] == 64 and out["flow4"].shape[-1] == 32
    r = m.global_search.search_radius(16, 16)
    assert r == 2 and out["global_scores"].shape == (1, m.global_search.n_rotations(), 2 * r + 1, 2 * r + 1)
    # the global stage matches the oriented channels only: the learnt ones (p8) learn through the affines
    (out["flow"].abs().mean() + out["global_scores"].mean() + out["affine8"].abs().mean()).backward()
    for p in (m.enc_sar.fge1.k3, m.enc_sar.grad.k3, m.enc_opt.grad.k5, m.enc_sar.p8.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_peak_subpixel_and_xcorr():
    """The sub-pixel peak of a sampled parabola-like surface, and FFT correlation shifts."""
    r = 2
    d = torch.arange(-r, r + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(d, d, indexing="ij")
    corr = -((dx - 0.3) ** 2 + (dy + 0.2) ** 2).reshape(1, -1, 1, 1)
    disp, interior = corr_ops.peak_subpixel(corr, r, False)
    assert torch.allclose(disp.flatten(), torch.tensor([0.3, -0.2]), atol=1e-5) and interior.item() == 1
    edge = -((dx - 2.0) ** 2 + dy ** 2).reshape(1, -1, 1, 1)  # best displacement on the window border
    assert corr_ops.peak_subpixel(edge, r, False)[1].item() == 0
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 3, 20, 24, generator=g)
    b = torch.roll(a, shifts=(2, -3), dims=(2, 3))  # b(q + (dx=-3, dy=2)) = a(q)
    c = corr_ops.xcorr_shifts(a, b, 4)
    iy, ix = divmod(int(c[0].argmax()), 9)
    assert (ix - 4, iy - 4) == (-3, 2)


def test_window_zncc_matches_brute_force_and_peaks_at_the_shift():
    """window_zncc equals the zero-normalised cross-correlation of explicit windows, and peaks at
    the displacement between two shifted copies even under a per-window gain and offset."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1, 3, 24, 26, generator=g)
    b = torch.roll(a, shifts=(1, -2), dims=(2, 3))  # a(q) = b(q + (dx=-2, dy=1))
    b = 2.5 * b + 0.7
    r, k = 3, 7
    z = corr_ops.window_zncc(a, b, r, k)
    assert z.shape == (1, (2 * r + 1) ** 2, 24, 26)
    y, x = 12, 11
    for dy, dx in ((0, 0), (1, -2), (-2, 3)):
        wa = a[0, :, y - 3:y + 4, x - 3:x + 4]
        wb = b[0, :, y + dy - 3:y + dy + 4, x + dx - 3:x + dx + 4]
        wa = wa - wa.mean((1, 2), keepdim=True)
        wb = wb - wb.mean((1, 2), keepdim=True)
        want = (wa * wb).sum() / torch.sqrt((wa * wa).sum() * (wb * wb).sum())
        got = z[0, (dy + r) * (2 * r + 1) + dx + r, y, x]
        assert abs(got.item() - want.item()) < 1e-4, (dy, dx)
    best = z[0, :, 6:18, 6:20].argmax(0)
    assert (best == (1 + r) * (2 * r + 1) + (-2 + r)).all()
    assert z[0, :, 6:18, 6:20].amax(0).min().item() > 0.999


@pytest.mark.parametrize("block_bytes", [1, 4096, 1 << 30])
@pytest.mark.parametrize("step", [1, 2, 4])
@pytest.mark.parametrize("sampled", [False, True])
def test_local_corr_blocks_equal_the_explicit_products(block_bytes, step, sampled):
    """local_corr, computed a block of rows at a time without autograd (bands of all shifts
    accumulated channel by channel) and with it (products summed per shift), from the whole first
    level or from its scored positions (``sampled``), equals the explicit channel dot products at
    each kept position and shift, zero outside."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 21, 18, generator=g)
    b = torch.randn(2, 5, 21, 18, generator=g)
    r = 2
    n = 2 * r + 1
    bp = F.pad(b, [r, r, r, r])
    ys = torch.arange(step // 2, 21, step)
    xs = torch.arange(step // 2, 18, step)
    want = torch.stack([(a[:, :, ys][:, :, :, xs] * bp[:, :, ys + dy][:, :, :, xs + dx]).sum(1)
                        for dy in range(n) for dx in range(n)], 1)
    a1 = a[:, :, ys][:, :, :, xs] if sampled else a
    with torch.inference_mode():
        got = corr_ops.local_corr(a1, b, r, step, block_bytes, sampled=sampled)
    assert got.shape == want.shape == (2, n * n, len(ys), len(xs))
    assert torch.allclose(got, want, atol=1e-5)
    a.requires_grad_(True)
    tracked = corr_ops.local_corr(a, b, r, step, block_bytes)
    assert torch.allclose(tracked.detach(), got, atol=1e-5)  # the channel sums in another order
    tracked[:, n * n // 2].sum().backward()  # the zero shift: d/da = b at the kept positions
    expect = torch.zeros_like(a)
    expect[:, :, ys[:, None], xs[None, :]] = b[:, :, ys[:, None], xs[None, :]]
    assert torch.allclose(a.grad, expect)


def test_matching_masks_keep_the_border_margin_from_invalid_pixels(model):
    """The re-encoded SAR's matching mask at full resolution is 0 within ``border_margin`` px
    (Chebyshev) of an invalid pixel, 1 elsewhere: the dilation of the invalid pixels by a square of
    side 2m + 1 (clipped at the tile border), exactly."""
    m = model.border_margin
    g = torch.Generator().manual_seed(4)
    vo = (torch.rand(1, 1, 96, 128, generator=g) > 0.002).float()
    vo[:, :, 40:44, 70:90] = 0.0
    sar = torch.randn(1, 1, 96, 128, generator=g)
    with torch.inference_mode():
        _, vl = model.reencode_sar(sar, torch.ones_like(sar), vo, geometry.identity_affine(1, sar.device, sar.dtype))
    bad = 1.0 - vo * (geometry.warp(torch.ones_like(sar), geometry.affine_to_flow(
        geometry.identity_affine(1, sar.device, sar.dtype), 96, 128)) > 0.99).float()
    want = 1.0 - F.max_pool2d(bad, 2 * m + 1, 1, m)
    assert torch.equal(vl[0], want)
    assert 0 < vl[0].mean().item() < 1


def test_window_zncc_is_bounded_and_scores_zero_without_a_window():
    """Scores stay in [-1, 1] everywhere, borders included: a window without variance scores 0 and a
    shift whose window centre falls outside the image -1 (no candidate), not num / eps, which gave
    |z| in the thousands along the borders and swamped the training's matching loss."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(2, 4, 30, 34, generator=g)
    b = torch.randn(2, 4, 30, 34, generator=g)
    b[1, :, :, :12] = 0.0  # flat: no variance
    r, k = 3, 7
    z = corr_ops.window_zncc(a, b, r, k)
    assert torch.isfinite(z).all() and z.abs().max().item() <= 1.0
    n = 2 * r + 1
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            c = (dy + r) * n + dx + r
            if dy < 0:
                assert (z[:, c, 0] == -1).all()  # centre q + d above the first row
            if dx > 0:
                assert (z[:, c, :, -1] == -1).all()  # right of the last column
    assert (z[1, :, r:-r, r:12 - k // 2 - r] == 0).all()  # every shifted window flat, inside
    sparse = corr_ops.window_zncc(a, b, r, k, 4)
    assert torch.equal(sparse, geometry.subsample(z, 4))


def test_sub_pixel_fits_parabola_and_equiangular():
    """Both sub-pixel fits recover the vertex of their own peak shape exactly: the parabola for a
    quadratic peak, the equiangular (V) fit for a cone-shaped one, which the parabola biases
    towards the integer position."""
    for true in (-0.35, 0.1, 0.4):
        d = torch.tensor([-1.0, 0.0, 1.0])
        quad = -((d - true) ** 2)
        cone = -(d - true).abs()
        assert abs(corr_ops.parabola(quad[0], quad[1], quad[2]).item() - true) < 1e-6
        assert abs(corr_ops.equiangular(cone[0], cone[1], cone[2]).item() - true) < 1e-6
        assert abs(corr_ops.parabola(cone[0], cone[1], cone[2]).item()) < abs(true)
    r = 2
    g = torch.arange(-r, r + 1, dtype=torch.float32)
    dy, dx = torch.meshgrid(g, g, indexing="ij")
    corr = -((dx - 0.3).abs() + (dy + 0.2).abs()).reshape(1, -1, 1, 1)
    disp, _ = corr_ops.peak_subpixel(corr, r, True)
    assert torch.allclose(disp.flatten(), torch.tensor([0.3, -0.2]), atol=1e-5)


def test_strided_window_zncc_equals_the_dense_one_subsampled():
    """window_zncc with a step scores exactly the positions geometry.subsample keeps, whatever the
    image size, and the Encoder's coarse-only pass gives the same 1/8 descriptor as the full one."""
    g = torch.Generator().manual_seed(3)
    for h, w in ((40, 40), (45, 62)):
        a = torch.randn(1, 4, h, w, generator=g, dtype=torch.float64)
        b = torch.randn(1, 4, h, w, generator=g, dtype=torch.float64)
        full = corr_ops.window_zncc(a, b, 2, 9)
        for step in (2, 3, 4):
            sparse = corr_ops.window_zncc(a, b, 2, 9, step)
            ref = geometry.subsample(full, step)
            assert sparse.shape == ref.shape == (1, 25, len(range(step // 2, h, step)), len(range(step // 2, w, step)))
            assert torch.allclose(sparse, ref, atol=1e-12), (h, w, step)
    torch.manual_seed(0)
    enc = encoder.Encoder(EncoderConfig(channels=(8, 8, 8), learnt=4)).eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(enc(x, False)[0], enc(x)[3][:, :enc.oriented])


def test_box_matches_pooling():
    """The cumulative-sum box equals separable average pooling that averages only what lies inside,
    for small and large windows, windows wider than the image included; with a step it gives the
    subsampled values bit for bit, and under autograd the same values as without."""
    x = torch.randn(2, 3, 40, 37, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for k in (3, 5, 9, 15, 17, 31, 61):
        ref = F.avg_pool2d(x, [1, k], 1, [0, k // 2], count_include_pad=False)
        ref = F.avg_pool2d(ref, [k, 1], 1, [k // 2, 0], count_include_pad=False)
        assert torch.allclose(corr_ops.box(x, k), ref, atol=1e-9), k
    wide = corr_ops.box(x, 121)  # wider than the image: every position averages the whole image
    assert torch.allclose(wide, x.mean((2, 3), keepdim=True).expand_as(x), atol=1e-9)
    for k in (9, 61):
        for step in (2, 3, 4):
            assert torch.equal(corr_ops.box(x, k, step), geometry.subsample(corr_ops.box(x, k), step)), (k, step)
    for step in (2, 3, 4):  # wider than the image: the whole axis summed, then sampled (to rounding)
        assert torch.allclose(corr_ops.box(x, 121, step), geometry.subsample(wide, step), atol=1e-12), step
        tracked = corr_ops.box(x.clone().requires_grad_(True), k)
        assert tracked.requires_grad and torch.equal(tracked.detach(), corr_ops.box(x, k)), k


def test_consensus_support_counts_beyond_the_border_as_zero_weight():
    """norm_conv: the weighted window mean over the part of the window inside the grid, and as
    support the window *sum* of the weights over the full window area (zero-padded pooling), so a
    window cut by the border has less support than a full one; ``window_fraction`` is the share
    of a window inside the grid."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 30, 41, generator=g, dtype=torch.float64)
    w = torch.rand(2, 1, 30, 41, generator=g, dtype=torch.float64)

    def pool(v, k, pad):
        v = F.avg_pool2d(v, [1, k], 1, [0, k // 2], count_include_pad=pad)
        return F.avg_pool2d(v, [k, 1], 1, [k // 2, 0], count_include_pad=pad)

    for k in (5, 15, 61):
        mean, sup = corr_ops.norm_conv(x, w, k)
        assert torch.allclose(mean, pool(x * w, k, False) / pool(w, k, False), atol=1e-9), k
        assert torch.allclose(sup, pool(w, k, True), atol=1e-9), k
    frac = corr_ops.window_fraction(30, 41, 5, x.device, x.dtype)[0, 0]
    assert frac[0, 0] == pytest.approx(9 / 25) and frac[15, 20] == 1.0 and frac[0, 20] == pytest.approx(3 / 5)
    # uniform weights: the support falls towards the border and corners, and stays 1 inside
    _, sup = corr_ops.norm_conv(x, torch.ones_like(w), 15)
    assert sup[0, 0, 15, 20] == pytest.approx(1.0) and sup[0, 0, 0, 0] < 0.3 and sup[0, 0, 0, 20] < 0.6


def test_global_verification_prefers_the_supported_candidate():
    """Of several global candidates, verify keeps the one under which the two descriptor maps
    agree window by window (here the identity), whatever their order."""
    torch.manual_seed(0)
    m = net.SomaNet().eval()
    g = torch.Generator().manual_seed(5)
    img = F.avg_pool2d(torch.randn(1, 1, 256, 256, generator=g), 5, 1, 2)
    with torch.inference_mode():
        d8 = corr_ops.l2n(m.enc_opt(img)[3])
        ones = torch.ones(1, 1, 32, 32)
        eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        wrong = torch.tensor([[1.0, 0.0, 2.5], [0.0, 1.0, -1.5]])
        for order in ((eye, wrong, wrong + 0.01), (wrong, wrong + 0.01, eye)):
            best = m.global_search.verify(d8, d8, ones, ones, torch.stack(order)[None], m.log_scale[1].exp())
            assert torch.allclose(best[0], eye), order


def test_untrained_net_recovers_rotation_and_shift():
    """The structure alone (CFOG-like initial descriptors, rotation hypotheses, sub-pixel peaks,
    affine fits) recovers a rotated and shifted copy of a textured image to well under a pixel."""
    torch.manual_seed(0)
    m = net.SomaNet().eval()
    from scipy import ndimage

    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.standard_normal((256, 256)), 1.5).astype(np.float32)
    t = math.radians(7.0)
    c = 127.5
    a = torch.tensor([[[math.cos(t), -math.sin(t), 0.0], [math.sin(t), math.cos(t), 0.0]]])
    a[0, 0, 2] = c - (math.cos(t) * c - math.sin(t) * c) + 9.3
    a[0, 1, 2] = c - (math.sin(t) * c + math.cos(t) * c) - 5.6
    x = torch.from_numpy(img)[None, None]
    gt = geometry.affine_to_flow(a, 256, 256)
    # moving image: opt(q) = sar(q + gt(q)), i.e. sar = opt warped by the inverse affine
    inv = torch.linalg.inv(torch.cat([a[0], torch.tensor([[0.0, 0.0, 1.0]])]))[:2].unsqueeze(0)
    sar = geometry.warp(x, geometry.affine_to_flow(inv, 256, 256))
    with torch.inference_mode():
        flow, _ = m(x, sar)
    err = (flow - gt)[0, :, 48:-48, 48:-48].norm(dim=0)
    assert float(err.median()) < 0.5


def _export(model, path):
    """Export ``model`` to ``path`` the way ``soma export`` does, through a checkpoint."""
    ckpt = path.with_name(path.stem + ".ckpt")
    save_checkpoint(ckpt, model, step=0, val=None)
    return export(ckpt, path, overwrite=True)


def test_export_loads_in_fresh_process(model, tmp_path):
    """The TorchScript file matches the eager model in a fresh process, with a trained certainty
    calibration, so that the global-local blend is part of what is compared."""
    import copy

    model = copy.deepcopy(model)
    with torch.no_grad():
        model.cert_w.copy_(torch.tensor([1.0, 2.0, 1.5, -1.0]))
    assert model.blend_active()
    w = tmp_path / "soma-test.pt"
    _export(model, w)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 256, 256, generator=g)
    y = torch.randn(1, 1, 256, 256, generator=g)
    torch.save({"x": x, "y": y}, tmp_path / "in.pt")
    with torch.inference_mode():
        ref, rc = model(x, y)
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from soma_cli.model.loader import load_weights\n"
        f"m, meta = load_weights(r'{w}')\n"
        f"d = torch.load(r'{tmp_path / 'in.pt'}')\n"
        "with torch.inference_mode():\n"
        "    f, c = m(d['x'], d['y'])\n"
        f"torch.save({{'f': f, 'c': c}}, r'{tmp_path / 'out.pt'}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, timeout=120)
    got = torch.load(tmp_path / "out.pt")
    assert torch.allclose(got["f"], ref, atol=1e-4)
    assert torch.allclose(got["c"], rc, atol=1e-5)


def test_affine_blend_keeps_certain_flow_and_fills_the_rest_with_its_affine(model):
    """``affine_blend``: where the certainty is 1 the flow is kept; where it is 0 the output is the
    robust certainty-weighted affine of the flow, so a local blunder under zero certainty is
    replaced by the surrounding affine to well under 0.01 px; in between it is the convex mix."""
    h = w = 128
    a = torch.tensor([[[math.cos(0.1), -math.sin(0.1), 3.0], [math.sin(0.1), math.cos(0.1), -2.5]]])
    aff = geometry.affine_to_flow(a, h, w)
    flow = aff.clone()
    flow[:, :, 40:60, 40:60] += torch.tensor([7.0, -4.0]).view(1, 2, 1, 1)  # a blunder
    cert = torch.ones(1, 1, h, w)
    cert[:, :, 40:60, 40:60] = 0.0
    flow[:, :, 100:110, 100:110] += 0.8  # a small local deviation, a quarter certain
    cert[:, :, 100:110, 100:110] = 0.25
    out = model.blend(flow, cert)
    assert torch.equal(out[:, :, :40], flow[:, :, :40])
    assert (out[:, :, 40:60, 40:60] - aff[:, :, 40:60, 40:60]).abs().max() < 0.01
    assert torch.allclose(out[:, :, 100:110, 100:110], aff[:, :, 100:110, 100:110] + 0.2, atol=0.01)
    # an untrained calibration (cert_w = 0, certainty 0.5) leaves the blend off
    assert not net.SomaNet().blend_active()


def test_weights_errors(model, tmp_path):
    w = tmp_path / "soma-x.pt"
    with pytest.raises(WeightsError, match="not found"):
        loader.load_weights(w)
    _export(model, w)
    loader.load_weights(w)
    meta_path = loader.metadata_path(w)
    good = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**good, "sha256": "0" * 64}))
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        loader.load_weights(w)
    # truncated file whose metadata matches: the TorchScript loader fails -> WeightsError
    w.write_bytes(w.read_bytes()[:5000])
    meta_path.write_text(json.dumps({**good, "sha256": loader.sha256_file(w)}))
    with pytest.raises(WeightsError, match="cannot load"):
        loader.load_weights(w)
    meta_path.unlink()
    with pytest.raises(WeightsError, match="metadata"):
        loader.load_weights(w)


def test_loader_reads_the_config_back_and_refuses_a_wrong_one(tmp_path):
    """The exported metadata records the network's configuration; the loader reads it back as the
    same SomaConfig, and refuses metadata whose config lacks a key, has an unknown one, a value of
    the wrong type, or is absent, before loading anything."""
    cfg = SomaConfig(blend_iterations=4, dense1=DenseLevelConfig(radius=1, window=31, smooth=61, step=2, cone=False))
    w = tmp_path / "soma-c.pt"
    meta = _export(net.SomaNet(cfg).eval(), w)
    model, got = loader.load_weights(w)
    assert got["config"] == meta["config"] == cfg.to_dict()
    assert loader.weights_config(got, w) == cfg
    meta_path = loader.metadata_path(w)
    good = json.loads(meta_path.read_text())
    c = good["config"]
    wrong = [{**c, "n_aff8": 3}, {k: v for k, v in c.items() if k != "blend_step"},
             {**c, "affine4": {**c["affine4"], "window": "9"}}]
    for bad in wrong:
        meta_path.write_text(json.dumps({**good, "config": bad}))
        with pytest.raises(WeightsError, match="invalid network config"):
            loader.load_weights(w)
    meta_path.write_text(json.dumps({k: v for k, v in good.items() if k != "config"}))
    with pytest.raises(WeightsError, match="metadata has no config"):
        loader.load_weights(w)


def test_infer_pads_crops_and_masks(model):
    rng = np.random.default_rng(0)
    opt = rng.standard_normal((3, 100, 70)).astype(np.float32)
    valid = np.ones_like(opt, bool)
    valid[:, :, :10] = False
    flow, cert = infer.run_model(model, opt, opt.copy(), valid, None, batch_size=2)
    assert flow.shape == (3, 2, 100, 70) and cert.shape == (3, 100, 70)
    assert np.isfinite(flow).all()
    assert (cert[:, :, :10] == 0).all()


def test_infer_runs_tiles_one_by_one_on_cpu():
    """On the CPU every tile goes through the model alone, whatever batch_size says (batches only
    add memory traffic there); the results keep the input order."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, opt, sar, vo, vs):
            seen.append(opt.shape[0])
            b = opt.shape[0]
            flow = opt.mean((1, 2, 3)).view(b, 1, 1, 1).expand(b, 2, opt.shape[-2], opt.shape[-1])
            return flow, torch.ones_like(opt)

    opt = np.stack([np.full((64, 64), float(i), np.float32) for i in range(5)])
    flow, _ = infer.run_model(Probe(), opt, opt.copy(), batch_size=4, device=torch.device("cpu"))
    assert seen == [1, 1, 1, 1, 1]
    assert np.allclose(flow[:, 0, 0, 0], np.arange(5))


def test_identical_inputs_zero_flow_with_shipped_weights():
    """Identical optical and SAR inputs (smooth noise, unlike either modality) give ~zero flow.

    With the shipped weights the measured median |flow| on this image is 0.026 px, and the largest
    component 0.047 px (seeds 4 and 5: 0.026-0.027 and 0.048-0.050). The bound 0.25 px leaves a
    margin and still fails on any half-pixel slip or a flow that runs away.
    """
    w = loader.default_weights_path()
    if not w.is_file():
        pytest.skip(f"no shipped weights at {w}")
    from soma_cli.matchers import get_matcher

    m = get_matcher("soma", weights=w, device="cpu")
    rng = np.random.default_rng(3)
    from scipy import ndimage

    img = ndimage.gaussian_filter(rng.standard_normal((256, 256)), 2).astype(np.float32)
    img = (img - img.mean()) / img.std()
    flow, cert = m.match(img[None], img[None].copy())
    inner = flow[0][:, 32:-32, 32:-32]
    assert np.median(np.hypot(inner[0], inner[1])) < 0.25


def test_cpu_allocator_tuning_applies_on_glibc():
    """The soma matcher's allocator setting takes effect where the C library is glibc (mallopt
    accepts all three parameters), and so does handing the kept memory back; elsewhere both report
    that they did nothing."""
    import platform

    expected = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert cpu.tune_allocator() is expected
    assert cpu.tune_allocator() is expected  # idempotent
    assert cpu.release_heap() is expected


def test_global_stage_searching_its_own_rotation_changes_nothing():
    """Given the rotation its full search picks (global_rotation, degrees on the hypothesis grid),
    the network searches that rotation alone and returns the same flow and certainty bit for bit;
    another rotation changes the answer."""
    torch.manual_seed(0)
    m = torch.jit.script(net.SomaNet().eval())
    g = torch.Generator().manual_seed(4)
    img = F.avg_pool2d(torch.randn(2, 1, 264, 264, generator=g), 9, 1)[..., :256, :256]
    img = (img - img.mean()) / img.std()
    sar = torch.roll(img, (3, -5), (2, 3))
    v = torch.ones_like(img)
    with torch.inference_mode():
        rot = m.global_rotation(img, sar, v, v)
        step = m.global_search.rotation_step
        assert rot.shape == (2,) and torch.equal(torch.round(rot / step) * step, rot)
        f0, c0 = m(img, sar, v, v)
        f1, c1 = m(img, sar, v, v, rotation=rot)
        f2, _ = m(img, sar, v, v, rotation=rot + 2 * step)
    assert torch.equal(f0, f1) and torch.equal(c0, c1)
    assert not torch.equal(f0, f2)


def test_global_search_radius_follows_small_tiles_only():
    """512 px tiles (64 cells at stride 8) and larger search the full radius; smaller tiles search
    in proportion to their shorter side (256 px: +-5 cells), at least 2 cells; the scores follow."""
    m = net.SomaNet().eval()
    gs = m.global_search
    assert gs.radius == 10
    assert [gs.search_radius(n, n) for n in (64, 128, 48, 32, 16, 8)] == [10, 10, 7, 5, 2, 2]
    assert gs.search_radius(32, 64) == 5 and gs.search_radius(64, 40) == 6
    with torch.inference_mode():
        x = torch.randn(1, 1, 256, 256)
        out = m.run(x, x.clone())
    assert out["global_scores"].shape[-2:] == (11, 11)
