"""Training: cache preparation (with a stand-in cleaning matcher), fit, checkpoint, resume,
validation, losses, export."""

import json

import numpy as np
import pytest
import torch

from soma_cli import metrics, train
from soma_cli.errors import ConfigError, OutputError, WeightsError
from soma_cli.model import loader
from soma_cli.model.checkpoint import load_model_checkpoint, save_checkpoint
from soma_cli.model.export import export
from soma_cli.model.net import SomaNet
from soma_cli.train import data, losses, loop


class ShiftMatcher:
    """Stand-in matcher: a constant residual (dx, dy) with full certainty."""

    name = "shift"

    def __init__(self, dx, dy):
        self.d = (dx, dy)

    def match(self, opt, sar, opt_valid=None, sar_valid=None):
        b, h, w = opt.shape
        f = np.zeros((b, 2, h, w), np.float32)
        f[:, 0], f[:, 1] = self.d
        return f, np.ones((b, h, w), np.float32)


def _write_dataset(root, n_per_group=2, size=160):
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin
    from scipy import ndimage

    (root / "sar").mkdir(parents=True)
    (root / "opt").mkdir()
    rows = ["id,sar,opt,s2_scene"]
    rng = np.random.default_rng(0)
    k = 0
    for group in ("T11SMT", "T11SLT"):
        for _ in range(n_per_group):
            name = f"{k:03d}"
            k += 1
            base = ndimage.gaussian_filter(rng.standard_normal((size, size)), 3)
            base = (base - base.min()) / (base.max() - base.min())
            opt = (np.stack([base, base * 0.9, base * 0.8]) * 250).astype(np.uint8)
            sar = np.clip(base * 200 + rng.gamma(4, 5, base.shape), 1, 255).astype(np.uint8)
            prof = dict(driver="GTiff", width=size, height=size, crs="EPSG:3395",
                        transform=from_origin(0, 0, 10, 10), dtype="uint8")
            with rasterio.open(root / "opt" / f"{name}.tif", "w", count=3, **prof) as d:
                d.write(opt)
            with rasterio.open(root / "sar" / f"{name}.tif", "w", count=1, **prof) as d:
                d.write(sar, 1)
            rows.append(f"{name},sar/{name}.tif,opt/{name}.tif,S2A_MSIL1C_X_N0209_R027_{group}_X.SAFE")
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root


def test_smooth_residual_recovers_constant_and_clips():
    f = np.zeros((2, 64, 64), np.float32)
    f[0], f[1] = 1.5, -0.5
    noisy = f.copy()
    noisy[:, :8, :8] = 40.0  # outliers
    sm = data.smooth_residual(noisy, np.ones((64, 64)), step=2)
    assert np.allclose(sm[:, 32:, 32:], f[:, 32:, 32:], atol=0.05)
    assert np.abs(data.smooth_residual(f * 10, np.ones((64, 64)))).max() <= 4.0


def test_prepare_fit_resume_export(tmp_path):
    data = _write_dataset(tmp_path / "data")
    cache = tmp_path / "cache.npz"
    ticks = []
    meta = train.prepare(data, cache, crop=128, val_crop=128, matcher=ShiftMatcher(1.0, 0.0),
                         min_support=0.1, progress=lambda d, n, i: ticks.append(d))
    assert ticks[-1] == 4 and meta["train_names"] == ["000", "001"] and meta["val_names"] == ["002", "003"]
    assert all(abs(v - 1.0) < 1e-3 for v in meta["clean_mean_shift_px"].values())
    with pytest.raises(OutputError):
        train.prepare(data, cache, matcher=ShiftMatcher(0, 0))
    c = train.load_cache(cache)
    assert c["train_opt"].shape == (2, 128, 128) and c["train_opt"].dtype == np.uint8
    assert c["train_valid"].dtype == bool and c["train_valid"].shape == (2, 128, 128)
    # cleaning resampled the SAR by +1 px in x: the cleaned SAR at column c is the raw SAR at c+1
    import rasterio

    with rasterio.open(data / "sar" / "000.tif") as d:
        raw = d.read(1).astype(np.float32)
    crop = raw[16:144, 16:144]
    shifted = raw[16:144, 17:145]
    got = c["train_sar"][0].astype(np.float32)
    assert np.abs(got - shifted).mean() < np.abs(got - crop).mean() / 3

    cfg = train.FitConfig(steps=4, batch_size=2, crop=64, threads=1, device="cpu", val_chip=64, val_pairs=2,
                          val_every=2, ckpt_every_s=0.0)
    out = tmp_path / "run"
    progress = []
    res = train.fit(cache, out, cfg, progress=lambda d, n, i: progress.append((d, n, i)))
    assert res["step"] == 4 and progress[-1][0] == 4 and "val_cmr1" in progress[-1][2]
    assert 0.0 <= res["val"]["cmr1"] <= 1.0 and np.isfinite(res["val"]["rmse_median"])
    assert set(res["val"]["by_protocol"]) == {"paper", "geo"} and res["val"]["n"] == 4
    for name in ("ckpt.pt", "model.pt", "best.pt", "log.jsonl"):
        assert (out / name).is_file()
    # resume: a longer schedule continues from step 4
    cfg.steps = 6
    res2 = train.fit(cache, out, cfg)
    assert res2["step"] == 6
    steps = [json.loads(line).get("step") for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps.count(5) == 1 and steps.count(1) == 1
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    assert ck["step"] == 6
    # time budget stops early
    cfg.steps, cfg.time_budget_min = 1000, 0.001
    res3 = train.fit(cache, out, cfg)
    assert res3["stop"] == "time budget" and res3["step"] < 1000
    # export -> TorchScript + metadata, loadable by the loader
    w = tmp_path / "soma-t.pt"
    meta = export(out / "model.pt", w, training_data="tiny")
    model, m2 = loader.load_weights(w)
    assert m2["sha256"] == meta["sha256"] == loader.sha256_file(w) and m2["tile_multiple"] == 32
    assert m2["training_step"] == res3["step"] and m2["config"] == SomaNet().config.to_dict()
    with pytest.raises(OutputError):
        export(out / "model.pt", w)
    with pytest.raises(ConfigError):
        export(out / "model.pt", tmp_path / "soma-t.pth")


def _tiny_cache(tmp_path, seed: int, size: int):
    """A two-image training cache (smooth noise, SAR = optical, all valid; the first image also the
    validation pair), written as ``tmp_path/c.npz``."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    base = ndimage.gaussian_filter(rng.standard_normal((2, size, size)), (0, 2, 2))
    img = ((base - base.min()) / (base.max() - base.min()) * 250).astype(np.uint8)
    valid = np.packbits(np.ones((2, size, size), bool), axis=-1)
    cache = tmp_path / "c.npz"
    np.savez_compressed(cache, train_opt=img, train_sar=img, train_valid=valid, val_opt=img[:1],
                        val_sar=img[:1], val_valid=valid[:1],
                        meta=np.frombuffer(json.dumps({"val_names": ["v"]}).encode(), np.uint8))
    return cache


def test_fit_init_starts_from_checkpoint_weights(tmp_path):
    """``FitConfig.init``: the fit starts from a checkpoint's weights (not a fresh model) with a fresh
    optimizer and step counter; an existing ckpt.pt in the run folder is resumed instead."""
    cache = _tiny_cache(tmp_path, seed=1, size=96)
    # a "pretrained" checkpoint whose weights are all distinctive
    src = SomaNet()
    with torch.no_grad():
        for p in src.parameters():
            p.fill_(0.0123)
    save_checkpoint(tmp_path / "pre.pt", src, step=777)
    cfg = train.FitConfig(steps=1, batch_size=1, crop=64, lr=0.0, weight_decay=0.0, threads=1, device="cpu",
                          val_chip=64, val_pairs=1, val_every=1, init=str(tmp_path / "pre.pt"))
    res = train.fit(cache, tmp_path / "run", cfg)
    assert res["step"] == 1  # fresh step counter, not the checkpoint's 777
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["model"]
    ref = src.state_dict()
    params = {n for n, _ in src.named_parameters()}
    assert all(torch.allclose(got[n], ref[n]) for n in params)  # lr 0: still the init weights
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert ck["optimizer"]["param_groups"][0]["lr"] == 0.0 and ck["step"] == 1
    # without init the weights differ (fresh random model)
    res0 = train.fit(cache, tmp_path / "run0", train.FitConfig(**{**cfg.__dict__, "init": ""}))
    got0 = torch.load(tmp_path / "run0" / "model.pt", weights_only=False)["model"]
    assert res0["step"] == 1 and not all(torch.allclose(got0[n], ref[n]) for n in params)
    # an existing ckpt.pt is resumed, not replaced by the init weights
    cfg2 = train.FitConfig(**{**cfg.__dict__, "steps": 2, "init": str(tmp_path / "pre.pt")})
    assert train.fit(cache, tmp_path / "run0", cfg2)["step"] == 2
    got2 = torch.load(tmp_path / "run0" / "model.pt", weights_only=False)["model"]
    assert all(torch.allclose(got2[n], got0[n]) for n in params)
    # a missing init checkpoint, or a file that is no checkpoint, is a clear WeightsError
    with pytest.raises(WeightsError, match="not found"):
        train.fit(cache, tmp_path / "run2", train.FitConfig(**{**cfg.__dict__, "init": str(tmp_path / "nope.pt")}))
    torch.save({"model": src.state_dict()}, tmp_path / "bare.pt")  # no network configuration
    with pytest.raises(WeightsError, match="not a SOMA training checkpoint"):
        train.fit(cache, tmp_path / "run3", train.FitConfig(**{**cfg.__dict__, "init": str(tmp_path / "bare.pt")}))


def test_fit_only_certainty_changes_nothing_but_the_calibration(tmp_path):
    """``only="certainty"``: every parameter but the certainty calibration ``cert_w`` stays
    bit-identical, ``cert_w`` moves, the network's flow before the global-local blend is unchanged,
    and its certainty is no longer the untrained 0.5."""
    cache = _tiny_cache(tmp_path, seed=2, size=128)
    torch.manual_seed(0)
    src = SomaNet()
    save_checkpoint(tmp_path / "pre.pt", src, step=0)
    cfg = train.FitConfig(steps=3, batch_size=1, crop=96, lr=0.2, threads=1, device="cpu", val_chip=96,
                          val_pairs=1, val_every=3, init=str(tmp_path / "pre.pt"), only="certainty")
    res = train.fit(cache, tmp_path / "run", cfg)
    assert res["step"] == 3 and 0.0 <= res["val"]["cert_bce"] < 10.0
    got = torch.load(tmp_path / "run" / "model.pt", weights_only=False)["model"]
    ref = src.state_dict()
    moved = [n for n in ref if not torch.equal(got[n], ref[n])]
    assert moved == ["cert_w"], moved
    trained = load_model_checkpoint(tmp_path / "run" / "model.pt")
    src.eval()
    img = np.load(cache)["train_opt"]
    x = torch.from_numpy(img[:1, :96, :96].astype(np.float32) / 100.0)[None]
    with torch.no_grad():
        f0, c0 = src(x, x)
        f1, c1 = trained(x, x)
        assert torch.equal(src.run(x, x)["flow"], trained.run(x, x)["flow"])
    assert (c0 - 0.5).abs().max() < 0.01 and (c1 - 0.5).abs().max() > 0.05
    assert trained.blend_active() and not src.blend_active()
    assert not torch.equal(f0, f1)  # the blend now acts on the output
    with pytest.raises(ConfigError):
        train.fit(cache, tmp_path / "run2", train.FitConfig(**{**cfg.__dict__, "only": "heads"}))


def test_certainty_calibration_follows_the_support():
    """The calibration term is ``cert_gain * (w . supports) + bias``: zero at initialisation (the
    heads' logit alone), and with positive weights, higher where the consensus support is higher."""
    net = SomaNet()
    s = torch.linspace(0.0, 0.5, 11).view(1, 1, 1, 11)
    assert torch.equal(net.certainty_calibration(s, s, s), torch.zeros_like(s))
    with torch.no_grad():
        net.cert_w.copy_(torch.tensor([1.0, 2.0, 3.0, -1.0]))
    z = net.certainty_calibration(s, 2 * s, s)
    assert torch.allclose(z, net.config.cert_gain * (1.0 * s + 4.0 * s + 3.0 * s) - 1.0)
    assert bool((z.diff(dim=-1) > 0).all())


def test_consistency_loss_follows_the_relative_metric():
    """The self-consistency loss is ~0 when the deformed-pair flow is the undeformed-pair flow
    followed by the deformation, whatever that undeformed flow is (the pair's own residual), and
    grows with a violation; its target is the expected flow of the relative metric of
    :mod:`soma_cli.metrics` (soma evaluate's)."""
    from soma_cli.model import geometry

    h = w = 64
    g = geometry.base_grid(1, h, w, torch.device("cpu"), torch.float32)
    gt = torch.stack([0.05 * (g[:, 1] - 32), -0.03 * (g[:, 0] - 32) + 1.5], 1)  # a smooth deformation
    f0 = torch.stack([torch.full((1, h, w), 2.0), 0.02 * (g[:, 0] - 32)], 1)  # a residual of its own
    valid = torch.ones(1, 1, h, w)
    f1 = f0 + geometry.warp(gt, f0)
    assert float(losses.consistency_loss(f0, f1, gt, valid)) < 0.11  # Charbonnier floor eps = 0.1
    bad = f1 + torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    assert float(losses.consistency_loss(f0, bad, gt, valid)) > 2.9
    expected, mask = losses.consistency_target(f0, gt, valid)
    err, defined = metrics.relative_error(f0[0].numpy(), bad[0].numpy(), gt[0].numpy())
    assert np.array_equal(defined, mask[0, 0].numpy() > 0.5)
    np.testing.assert_allclose(err[:, defined], (bad - expected)[0].numpy()[:, defined], atol=1e-4)
    # "absolute" agreement with gt alone is not consistency when f0 is not zero
    assert float(losses.consistency_loss(f0, gt, gt, valid)) > 1.5


def test_validation_scores_chips_as_soma_evaluate_does(tmp_path):
    """Validation uses soma evaluate's metrics: a network that always answers zero flow with
    certainty 0.8 scores, per chip, the RMSE of the ground truth over evaluate's mask (match inside
    the chip, optical valid), relatively the same error with the deformation read at the pixel
    itself, and its certainty covers every pixel, right where the zero flow is within 1 px."""
    cache = data.load_cache(_tiny_cache(tmp_path, seed=3, size=96))
    chips = data.val_chips(cache, 96, seed=1)

    class Zero(torch.nn.Module):
        def forward(self, opt, sar, vo, vs):
            b, _, h, w = opt.shape
            return torch.zeros(b, 2, h, w), torch.full((b, 1, h, w), 0.8)

    res = loop.validate(Zero(), chips, torch.device("cpu"))
    rmse = []
    for c in chips:
        gt = c["gt"]
        h, w = gt.shape[-2:]
        yy, xx = np.mgrid[0:h, 0:w]
        inside = (xx + gt[0] >= 0) & (xx + gt[0] <= w - 1) & (yy + gt[1] >= 0) & (yy + gt[1] <= h - 1)
        rmse.append(np.sqrt(np.mean((gt[0] ** 2 + gt[1] ** 2)[inside])))
    assert res["n"] == len(chips) == 2
    assert res["rmse_median"] == pytest.approx(np.median(rmse), rel=1e-6)
    assert res["rel_rmse_median"] == pytest.approx(res["rmse_median"], rel=1e-6)
    assert res["cmr5"] == float(np.mean(np.array(rmse) < 5))
    assert res["cert_coverage"] == 1.0 and np.isnan(res["uncertain_within_1px"])
    p = res["cert_precision"]  # every pixel is "sure": the share of them within 1 px
    assert 0.0 < p < 1.0 and res["cert_bce"] == pytest.approx(-p * np.log(0.8) - (1 - p) * np.log(0.2), rel=1e-5)
    assert set(res["by_protocol"]) == {"paper", "geo"}
    assert res["by_protocol"]["paper"]["n"] == 1


def test_make_sample_carries_the_undeformed_sar():
    from soma_cli import synth

    rng = np.random.default_rng(0)
    from scipy import ndimage

    img = (ndimage.gaussian_filter(rng.standard_normal((96, 96)), 2) * 60 + 120).clip(1, 255).astype(np.uint8)
    d = synth.draw(np.random.default_rng(1), 96, 96, synth.DeformParams(trans_px=10.0))
    s = data.make_sample(img, img, np.ones((96, 96), bool), d, np.random.default_rng(2))
    assert s["sar0"].shape == s["sar"].shape == (1, 96, 96) and s["sar0_valid"].all()
    # gt: optical (= undeformed SAR) pixel q matches the deformed SAR at q + gt(q), with the same
    # speckle: sampling the deformed SAR there gives the undeformed one back (interior)
    from soma_cli.model import geometry

    back = geometry.warp(torch.from_numpy(s["sar"])[None], torch.from_numpy(s["gt"])[None])[0, 0].numpy()
    inner = (slice(20, -20), slice(20, -20))
    assert np.corrcoef(back[inner].ravel(), s["sar0"][0][inner].ravel())[0, 1] > 0.95
