"""The fit loop: resumable training of the SOMA network with periodic validation.

:func:`fit` (torch, numpy, scipy only: runs where rasterio is absent) trains on random samples of
the cache (:class:`~soma_cli.train.data.TrainSamples`) and scores seeded validation chips of the
held-out pairs with :mod:`soma_cli.metrics`, the metrics of ``soma evaluate``.  A run folder holds
``ckpt.pt`` (resumable: optimizer, RNG, history), ``model.pt`` (latest weights), ``best.pt`` (best
validation) and ``log.jsonl``; progress goes through a callback.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .. import coords, metrics
from ..errors import ConfigError, WeightsError
from ..infer import resolve_device
from ..model.checkpoint import network, read_checkpoint, save_checkpoint
from ..model.config import SomaConfig
from ..model.net import SomaNet, n_params
from .data import Progress, TrainSamples, load_cache, val_chips
from .losses import training_loss


@dataclass
class FitConfig:
    steps: int = 20000
    time_budget_min: float = 0.0  # 0: no time limit
    batch_size: int = 4
    crop: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 0  # 0: leave torch's default
    device: str = "auto"
    workers: int = 0
    val_chip: int = 256
    val_pairs: int = 12
    val_every: int = 200
    ckpt_every_s: float = 120.0
    warmup: float = 0.03
    init: str = ""  # start from this checkpoint's network (fresh optimizer and schedule)
    consistency: float = 1.0  # weight of the self-consistency loss (0: off, one forward pass per step)
    absolute: float = 0.3  # weight of the losses against the synthetic deformation
    only: str = ""  # "certainty": train only the certainty calibration (the flow stays exactly as it is)


def check_crop(crop: int) -> None:
    """``FitConfig.crop`` / ``soma train --crop``: the network needs a multiple of 32 px."""
    if crop % 32:
        raise ConfigError("--crop must be a multiple of 32")


def check_only(only: str) -> None:
    """``FitConfig.only`` / ``soma train --only``: empty (train everything) or ``certainty``."""
    if only not in ("", "certainty"):
        raise ConfigError(f"unknown --only {only!r}; expected certainty")


def lr_at(frac: float, cfg: FitConfig) -> float:
    """Learning rate at ``frac`` of the run: linear warm-up, then cosine decay to 3 %."""
    if frac < cfg.warmup:
        return cfg.lr * max(frac / cfg.warmup, 0.02)
    t = min((frac - cfg.warmup) / max(1.0 - cfg.warmup, 1e-6), 1.0)
    return cfg.lr * (0.03 + 0.97 * 0.5 * (1.0 + math.cos(math.pi * t)))


def score(val: dict, only: str) -> Tuple[float, float]:
    """What selects ``best.pt`` (higher first, then lower second): the relative CMR@1px and median
    RMSE, or, when only the certainty trains, the negated certainty cross-entropy."""
    if only == "certainty":
        return -val["cert_bce"], 0.0
    return val["rel_cmr1"], val["rel_rmse_median"]


def better(a: Tuple[float, float], b: Tuple[float, float]) -> bool:
    """Score ``a`` beats ``b`` (:func:`score`): a higher first number, or the same and a second
    number that is not higher."""
    if a[0] != b[0]:
        return a[0] > b[0]
    return not (a[1] > b[1])


def certainty_params(model: SomaNet) -> List[torch.nn.Parameter]:
    """Freeze the network except its certainty calibration (:attr:`SomaNet.cert_w`, 4 numbers): the
    flow, and every other output, stay exactly as they are.  Returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.cert_w.requires_grad_(True)
    return [model.cert_w]


# ----------------------------------------------------------------------------- validation


def _chip_scores(chip: Dict[str, np.ndarray], flow: np.ndarray,
                 flow0: np.ndarray) -> Tuple[dict, dict, np.ndarray, np.ndarray]:
    """Absolute and relative :func:`metrics.error_metrics` of one chip, where its flow is within
    1 px of the self-consistent flow (and the ground truth's match lands on valid SAR), and the
    optical validity."""
    gt = chip["gt"]
    ov = chip["opt_valid"][0] > 0.5
    scored = metrics.eval_mask(gt, ov)
    err, defined = metrics.relative_error(flow0, flow, gt)
    rel = metrics.error_metrics(err, defined & ov)
    sar_ok = coords.warp_np(chip["sar_valid"][0], gt, order=1, cval=0.0) > 0.99
    correct = defined & scored & sar_ok & (np.hypot(err[0], err[1]) < 1.0)
    return metrics.chip_metrics(flow, gt, scored), rel, correct, ov


def _summary(abs_recs: List[dict], rel_recs: List[dict]) -> dict:
    out = metrics.aggregate(abs_recs)
    out.update(metrics.aggregate(rel_recs, prefix="rel_"))
    out.pop("rel_n", None)
    return out


@torch.no_grad()
def validate(model: torch.nn.Module, chips: List[Dict[str, np.ndarray]], device: torch.device,
             batch_size: int = 4) -> dict:
    """The metrics of ``soma evaluate`` (:func:`metrics.aggregate`, absolute against the synthetic
    deformation and relative ``rel_*``) over all chips and per protocol (``by_protocol``), and the
    certainty against "within 1 px of the self-consistent flow" (:func:`metrics.certainty_metrics`)."""
    was = model.training
    model.eval()
    abs_recs: List[dict] = []
    rel_recs: List[dict] = []
    certs: List[np.ndarray] = []
    correct: List[np.ndarray] = []
    valid: List[np.ndarray] = []
    for i in range(0, len(chips), batch_size):
        group = chips[i:i + batch_size]
        t = {k: torch.from_numpy(np.stack([c[k] for c in group])).to(device)
             for k in ("opt", "sar", "opt_valid", "sar_valid", "sar0", "sar0_valid")}
        flow, cert = model(t["opt"], t["sar"], t["opt_valid"], t["sar_valid"])
        flow0, _ = model(t["opt"], t["sar0"], t["opt_valid"], t["sar0_valid"])
        for c, f1, f0, ce in zip(group, flow.float().cpu().numpy(), flow0.float().cpu().numpy(),
                                 cert.float().cpu().numpy()):
            a, r, ok, ov = _chip_scores(c, f1, f0)
            abs_recs.append(a)
            rel_recs.append(r)
            certs.append(ce[0].ravel())
            correct.append(ok.ravel())
            valid.append(ov.ravel())
    model.train(was)
    res = _summary(abs_recs, rel_recs)
    if chips:
        res.update(metrics.certainty_metrics(np.concatenate(certs), np.concatenate(correct), np.concatenate(valid)))
    protos = [c["protocol"] for c in chips]
    res["by_protocol"] = {p: _summary([a for a, q in zip(abs_recs, protos) if q == p],
                                      [r for r, q in zip(rel_recs, protos) if q == p])
                          for p in sorted(set(protos))}
    return res


# ----------------------------------------------------------------------------- the run


class Run:
    """One run folder: the network, its optimizer and what has been recorded so far.

    A run starts fresh (a new network from :class:`SomaConfig`), from ``cfg.init`` (that
    checkpoint's network, fresh optimizer and schedule), or resumes ``ckpt.pt`` (which takes
    precedence)."""

    def __init__(self, cache_path: Path, out_dir: Path, cfg: FitConfig):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        cache = load_cache(cache_path)
        self.data = TrainSamples(cache["train_opt"], cache["train_sar"], cache["train_valid"], cfg.crop, cfg.seed)
        self.chips = val_chips(cache, cfg.val_chip, seed=cfg.seed, max_pairs=cfg.val_pairs)
        self.step = 0
        self.elapsed_before = 0.0
        self.best = (-1.0, math.inf)
        self.history: List[dict] = []
        ckpt_path = self.out_dir / "ckpt.pt"
        resume = read_checkpoint(ckpt_path) if ckpt_path.is_file() else None
        torch.manual_seed(cfg.seed)
        if resume is not None:
            self.model = network(resume, ckpt_path)
        elif cfg.init:
            self.model = network(read_checkpoint(Path(cfg.init)), Path(cfg.init))
        else:
            self.model = SomaNet(SomaConfig())
        self.model.to(self.device)
        if cfg.only == "certainty":  # no weight decay: it would pull the calibration towards zero
            self.optimizer = torch.optim.AdamW(certainty_params(self.model), lr=cfg.lr, weight_decay=0.0)
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        if resume is not None:
            self._resume(resume, ckpt_path)
        self.t0 = time.time()

    def _resume(self, ck: dict, path: Path) -> None:
        try:
            self.optimizer.load_state_dict(ck["optimizer"])
        except ValueError:
            raise WeightsError(f"{path}: its optimizer state does not fit this run's trainable parameters "
                               "(another --only?); start a new run folder with --init instead of resuming") from None
        self.step = int(ck["step"])
        self.elapsed_before = float(ck["elapsed"])
        self.best = (float(ck["best"]), float(ck["best_rmse"]))
        self.history = list(ck["history"])
        torch.set_rng_state(ck["torch_rng"])

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.t0

    def record(self, val: Optional[dict]) -> dict:
        return {"fit": asdict(self.cfg), "step": self.step, "val": val, "arch": "SomaNet",
                "params": n_params(self.model)}

    def save(self, val: Optional[dict]) -> None:
        """``ckpt.pt`` (everything to resume) and ``model.pt`` (the latest network)."""
        save_checkpoint(self.out_dir / "ckpt.pt", self.model, optimizer=self.optimizer.state_dict(),
                        elapsed=self.elapsed(), best=self.best[0], best_rmse=self.best[1],
                        history=self.history, torch_rng=torch.get_rng_state(), **self.record(val))
        save_checkpoint(self.out_dir / "model.pt", self.model, **self.record(val))

    def validate(self, first: bool = False) -> dict:
        """Validate, record it, and write ``best.pt`` when it beats the best so far (or is the
        ``first``: training must beat the starting point to replace it)."""
        val = validate(self.model, self.chips, self.device)
        self.history.append({"step": self.step, "val": val})
        s = score(val, self.cfg.only)
        if first or better(s, self.best):
            self.best = s
            save_checkpoint(self.out_dir / "best.pt", self.model, **self.record(val))
        return val

    def log(self, rec: dict) -> None:
        with open(self.out_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def loader(self) -> torch.utils.data.DataLoader:
        """Batches of the samples from the current step on (sample ``i`` is always the same)."""
        cfg = self.cfg
        return torch.utils.data.DataLoader(
            self.data, batch_size=cfg.batch_size, sampler=range(self.step * cfg.batch_size, cfg.steps * cfg.batch_size),
            num_workers=cfg.workers, worker_init_fn=_one_thread if cfg.workers > 0 else None,
            persistent_workers=False, pin_memory=self.device.type == "cuda", drop_last=True,
        )

    def train_step(self, batch: Dict[str, torch.Tensor], lr: float) -> Tuple[float, Dict[str, float]]:
        """One optimizer step (skipped when the loss is not finite); returns the loss and its parts."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        cfg = self.cfg
        loss, parts = training_loss(self.model, b, cfg.only, cfg.absolute, cfg.consistency)
        self.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
            self.optimizer.step()
        self.step += 1
        return float(loss.detach()), parts


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def fit(cache_path: Path, out_dir: Path, cfg: FitConfig, progress: Optional[Progress] = None) -> dict:
    """Train (or resume) into ``out_dir`` (see the module doc; ``best.pt``: the best relative CMR@1px,
    ties broken by the relative median RMSE, or the lowest certainty cross-entropy with ``only``).
    Returns the final summary."""
    check_only(cfg.only)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    run = Run(cache_path, out_dir, cfg)
    val: Optional[dict] = run.history[-1]["val"] if run.history else None
    if run.step == 0 and not run.history:
        val = run.validate(first=True)
        run.log({"step": 0, "val": val})
    # the network has no dropout or batch statistics: eval mode only skips the training-only
    # descriptors, which certainty training does not use
    run.model.train(cfg.only != "certainty")
    budget_s = cfg.time_budget_min * 60.0
    total_s = run.elapsed_before + budget_s if budget_s > 0 else 0.0
    last_ckpt = time.time()
    ema: Optional[float] = None
    stop = "steps"
    for batch in (run.loader() if run.step < cfg.steps else []):
        frac = run.step / max(cfg.steps, 1)
        if total_s > 0:
            frac = max(frac, run.elapsed() / total_s)
            if time.time() - run.t0 >= budget_s:
                stop = "time budget"
                break
        lr = lr_at(frac, cfg)
        loss, parts = run.train_step(batch, lr)
        ema = loss if ema is None or not math.isfinite(ema) else 0.95 * ema + 0.05 * loss
        rec = {"step": run.step, "loss": loss, "lr": lr, **parts, "t": run.elapsed()}
        if run.step % cfg.val_every == 0 or run.step == cfg.steps:
            val = rec["val"] = run.validate()
        run.log(rec)
        if time.time() - last_ckpt >= cfg.ckpt_every_s or "val" in rec:
            run.save(val)
            last_ckpt = time.time()
        if progress is not None:
            info = {"loss": ema, "lr": lr, "elapsed": run.elapsed()}
            if val is not None:
                info["val_cmr1"] = val["rel_cmr1"]
                info["val_median_rmse"] = val["rel_rmse_median"]
            progress(run.step, cfg.steps, info)
    final = run.validate()
    run.save(final)
    run.log({"step": run.step, "final_val": final, "stop": stop})
    return {"step": run.step, "val": final, "best_cmr1": run.best[0], "stop": stop, "elapsed_s": run.elapsed(),
            "out_dir": str(run.out_dir), "device": str(run.device), "params": n_params(run.model)}
