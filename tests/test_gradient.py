"""Tests of the training-free structural-gradient matcher (``--method gradient``)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from soma_cli import coords, synth
from soma_cli.matchers import get_matcher
from soma_cli.matchers.gradient import GradientMatcher
from soma_cli.matchers.gradient_ops import descriptor
from soma_cli import preprocess as pp

CROP = 384
MARGIN = 40  # interior used for the accuracy checks


def _rigid(theta_deg: float, tx: float, ty: float, h: int, w: int) -> synth.Deformation:
    """A pure rotation about the chip centre plus a translation, as a synth.Deformation."""
    t = np.deg2rad(theta_deg)
    lin = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    c = np.array([(w - 1) / 2.0, (h - 1) / 2.0])
    affine = np.concatenate([lin, (c - lin @ c + np.array([tx, ty]))[:, None]], axis=1)
    return synth.Deformation(affine=affine, bumps=synth.Bumps(), h=h, w=w)


def _deformed(sar_log: np.ndarray, d: synth.Deformation):
    moved = d.apply(sar_log)
    valid = np.isfinite(moved)
    return pp.standardise(moved, valid), valid


def _rmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.sum((a - b) ** 2, 0)[mask])))


def _interior(h: int, w: int, m: int = MARGIN) -> np.ndarray:
    out = np.zeros((h, w), bool)
    out[m:-m, m:-m] = True
    return out


# ----------------------------------------------------------------------------- synthetic (no data)


def _synthetic_pair(n: int = 256, seed: int = 0):
    """An 'optical' texture with blobs and straight edges, and a 'SAR' of the same structure with
    reversed/non-linear contrast and multiplicative speckle."""
    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.normal(size=(n, n)), 6.0)
    yy, xx = np.mgrid[:n, :n]
    base += 0.6 * (((xx + 2 * yy) // 37) % 2) * 0.05 + 0.02 * ((xx - yy) % 61 < 4)
    opt = pp.standardise(base.astype(np.float32))
    speckle = rng.gamma(4.0, 0.25, size=(n, n))
    sar = np.log10(np.exp(-3.0 * base / base.std()) * speckle + 0.01)
    return opt, sar.astype(np.float32)


def test_contract_shapes_dtypes_and_invalid_certainty():
    opt, sar = _synthetic_pair(192, seed=1)
    opt_valid = np.ones_like(opt, bool)
    opt_valid[:, :40] = False  # an invalid optical strip
    d = _rigid(0.0, 6.0, -4.0, *opt.shape)
    sar_d, sar_valid = _deformed(sar, d)
    matcher = get_matcher("gradient")
    assert matcher.name == "gradient"
    flow, cert = matcher.match(np.stack([opt, opt]), np.stack([sar_d, sar_d]),
                               np.stack([opt_valid, opt_valid]), np.stack([sar_valid, sar_valid]))
    assert flow.shape == (2, 2, 192, 192) and flow.dtype == np.float32
    assert cert.shape == (2, 192, 192) and cert.dtype == np.float32
    assert np.isfinite(flow).all()
    assert cert.min() >= 0.0 and cert.max() <= 1.0
    assert cert.max() > 0.2  # a textured pair gets real certainty somewhere
    assert np.all(cert[:, :, :40] == 0.0)  # invalid optical pixels
    # pixels whose match falls on invalid (NaN-filled) SAR get certainty 0
    lands = coords.warp_np(sar_valid.astype(np.float32), flow[0], order=1, cval=0.0)
    assert np.all(cert[0][lands < 0.5] == 0.0)
    assert np.allclose(flow[0], flow[1]) and np.allclose(cert[0], cert[1])


def test_synthetic_rotation_and_shift_recovered():
    opt, sar = _synthetic_pair(256, seed=2)
    d = _rigid(9.0, 14.0, -9.0, 256, 256)
    sar_d, sar_valid = _deformed(sar, d)
    flow, cert = GradientMatcher().match(opt[None], sar_d[None], None, sar_valid[None])
    gt = d.forward()
    mask = _interior(256, 256, 24) & coords.inside_mask_np(gt, 256, 256)
    assert _rmse(flow[0], gt, mask) < 0.8  # measured ~0.45 px (speckled synthetic SAR)


def test_empty_inputs_give_zero_certainty():
    z = np.zeros((1, 160, 160), np.float32)
    flow, cert = GradientMatcher().match(z, z, np.zeros_like(z, bool), np.zeros_like(z, bool))
    assert flow.shape == (1, 2, 160, 160) and not cert.any()


def test_descriptor_is_normalised_and_masked():
    opt, _ = _synthetic_pair(128, seed=3)
    valid = np.ones_like(opt, bool)
    valid[:, 100:] = False
    d = descriptor(opt, valid, n_orient=8)
    assert d.shape == (8, 128, 128) and d.dtype == np.float32
    assert np.all(d[:, :, 100:] == 0)
    norm = np.sqrt((d[:, 20:80, 20:80] ** 2).sum(0))
    assert norm.max() <= 1.0 + 1e-5 and np.median(norm) > 0.5


# ----------------------------------------------------------------------------- real crops


@pytest.fixture(scope="module")
def real_crop(shared_data):
    """A 384 px crop of a held-out T11SLT pair: standardised optical gray, SAR log, and the flow
    the matcher measures on the undeformed pair (the pair's own residual misregistration)."""
    from soma_cli.io.dataset import list_pairs, read_pair

    entries = list_pairs(shared_data, ["T11SLT"])
    entry = next((e for e in entries if e.name == "020"), entries[0])
    pair = read_pair(entry)
    r0, c0 = 320, 320
    opt = pp.standardise(pp.optical_to_gray(pp.select_bands(pair.opt[:, r0:r0 + CROP, c0:c0 + CROP])))
    sar_log = pp.sar_to_log(pair.sar[r0:r0 + CROP, c0:c0 + CROP])
    matcher = GradientMatcher()
    f0, _ = matcher.match(opt[None], pp.standardise(sar_log)[None])
    return matcher, opt, sar_log, f0[0]


def test_real_subpixel_translation(real_crop):
    matcher, opt, sar_log, f0 = real_crop
    shift = np.array([2.3, -1.7], np.float32)
    # moved(p) = sar(p - shift): content moves by +shift, so optical q now matches at q + F0 + shift
    const = np.broadcast_to(-shift[:, None, None], (2, CROP, CROP))
    moved = coords.warp_np(sar_log, const, order=3, cval=np.nan)
    valid = np.isfinite(moved)
    f1, _ = matcher.match(opt[None], pp.standardise(moved, valid)[None], None, valid[None])
    err = np.hypot(*(f1[0] - f0 - shift[:, None, None]))[_interior(CROP, CROP)]
    assert np.median(err) < 0.15  # measured ~0.03 px
    assert np.percentile(err, 90) < 0.4


def test_real_smooth_field(real_crop):
    matcher, opt, sar_log, f0 = real_crop
    d = synth.draw_for("geo", 0, "test", 3, CROP, CROP)
    sar_d, valid = _deformed(sar_log, d)
    f1, cert = matcher.match(opt[None], sar_d[None], None, valid[None])
    expected = coords.compose_flow_np(d.forward(), f0)  # F0 first (the pair), then D
    mask = _interior(CROP, CROP) & coords.inside_mask_np(expected, CROP, CROP)
    err = np.hypot(*(f1[0] - expected))[mask]
    assert np.median(err) < 0.5  # measured ~0.25 px (RMSE ~0.55)
    assert _rmse(f1[0], expected, mask) < 1.0


def test_real_paper_rotation_translation(real_crop):
    matcher, opt, sar_log, f0 = real_crop
    d = _rigid(15.0, 32.0, -24.0, CROP, CROP)  # 15 degrees, 40 px
    sar_d, valid = _deformed(sar_log, d)
    f1, cert = matcher.match(opt[None], sar_d[None], None, valid[None])
    expected = coords.compose_flow_np(d.forward(), f0)
    mask = coords.inside_mask_np(expected, CROP, CROP) & _interior(CROP, CROP, 8)
    assert _rmse(f1[0], expected, mask) < 2.0  # measured ~0.5 px
    assert _rmse(f1[0], d.forward(), mask) < 5.0  # against the synthetic truth alone
    assert np.all(cert[0][~coords.inside_mask_np(f1[0], CROP, CROP)] == 0.0)


def test_get_matcher_options_threads_and_unknown_keys():
    """Options reach the matcher (threads: the gradient matcher's concurrency, torch's threads for
    the network), and an option name that no matcher takes is a ConfigError, not ignored."""
    import torch

    from soma_cli.errors import ConfigError

    assert get_matcher("gradient", threads=3).cpu.threads() == 3
    assert get_matcher("gradient", device="cpu", batch_size=2, weights=None).cpu.threads() >= 1
    for name in ("gradient", "identity", "soma"):
        with pytest.raises(ConfigError, match="batchsize"):
            get_matcher(name, batchsize=2)
    before = torch.get_num_threads()
    try:
        m = get_matcher("soma", device="cpu", batch_size=3, threads=2)
        assert m.batch_size == 3 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_network_matches_two_tiles_at_once_on_half_the_threads_each():
    """On the CPU with two threads or more, ``soma`` takes two tiles at once, each call on half the
    threads, while the pipeline shares the cores (``sharing_cores``); with one thread, one tile on it."""
    import torch

    from soma_cli.matchers import sharing_cores

    before = torch.get_num_threads()
    try:
        for threads, lanes, each in ((4, 2, 2), (3, 2, 1), (1, 1, 1)):
            m = get_matcher("soma", device="cpu", threads=threads)
            with sharing_cores(m) as n:
                assert n == m.lanes == lanes
                m.match(np.zeros((1, 128, 128), np.float32), np.zeros((1, 128, 128), np.float32))
                assert torch.get_num_threads() == each
            assert m.lanes == 1
            m.match(np.zeros((1, 128, 128), np.float32), np.zeros((1, 128, 128), np.float32))
            assert torch.get_num_threads() == threads
        with sharing_cores(get_matcher("gradient", threads=4)) as n:
            assert n == 1  # a matcher without concurrency() is called one tile at a time
    finally:
        torch.set_num_threads(before)


def test_cpu_share_follows_other_processes(monkeypatch):
    """Without --threads the thread count is the cores other processes leave free (at least 1, at
    most the usable cores); a pinned count is used as is."""
    from soma_cli import cpu

    share = cpu.CpuShare()
    share.cores = 4
    for others, expected in ((0.0, 4), (1.0, 3), (2.6, 1), (9.0, 1)):
        monkeypatch.setattr(share, "others_busy", lambda o=others: o)
        assert share.threads() == expected
    assert cpu.CpuShare(3).threads() == 3


def test_background_priority_lowers_the_calling_thread_only():
    """A tile reader beside the CPU network runs at nice 19 where threads have priorities of their own
    (Linux), and reads ahead there by default; the thread that called it keeps its priority."""
    import os
    import sys
    import threading

    from soma_cli import cpu

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}

    def reader():
        cpu.background_priority()
        seen["reader"] = nice()

    before = nice()
    t = threading.Thread(target=reader)
    t.start()
    t.join()
    assert nice() == before
    if sys.platform.startswith("linux"):
        assert seen["reader"] == 19
        assert cpu.io_threads(False)[0] >= 1
    else:
        assert seen["reader"] == before and cpu.io_threads(False)[0] == 0


def test_cpu_share_sees_a_busy_process():
    """A process spinning on one core counts as one busy core (give or take the sampling)."""
    import subprocess
    import sys
    import time

    from soma_cli import cpu

    share = cpu.CpuShare()
    share.others_busy()
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 5: pass"])
    try:
        time.sleep(1.0)
        share.others_busy()
        time.sleep(1.0)
        assert share.others_busy() > 0.6
    finally:
        spin.kill()
        spin.wait()
