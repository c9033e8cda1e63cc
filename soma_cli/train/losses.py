"""Training losses of the SOMA network (torch).

Against the synthetic deformation ``D`` (``gt``): Charbonnier flow losses at full resolution, 1/2
and 1/4, the global and refined affines at 1/8, a cross-entropy towards the ground-truth global
(rotation, translation) hypothesis, descriptor matching at 1/4 and 1/2, and the certainty towards
"within 1 px".  Self-consistency: the flow on the deformed pair should be the flow on the
undeformed pair followed by ``D``, whatever the pair's own residual misregistration.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from ..model import geometry
from ..model.correlation import window_zncc
from ..model.net import SomaNet

#: Weights of the parts of :func:`synthetic_loss`.
WEIGHTS = {"flow": 1.0, "flow2": 1.0, "flow4": 1.0, "affine_global": 0.1, "affine8": 0.3, "affine4": 0.3,
           "global_ce": 0.3, "match4": 0.5, "match2": 0.5, "cert": 0.3}


def charbonnier(d: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    return torch.sqrt((d * d).sum(1, keepdim=True) + eps * eps)


def masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    return (x * m).sum() / m.sum().clamp(min=1.0)


def level_mask(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """A full-resolution mask on the stride-``stride`` level: cells entirely inside it."""
    return (F.avg_pool2d(mask, stride) > 0.99).to(mask.dtype)


def gt_mask(gt: torch.Tensor, opt_valid: torch.Tensor, sar_valid: torch.Tensor) -> torch.Tensor:
    """Where the ground truth is usable: optical valid, and its match inside the valid SAR."""
    h, w = gt.shape[-2:]
    sv = geometry.warp(sar_valid, gt)
    return opt_valid * geometry.inside_mask(gt, h, w) * (sv > 0.99).to(gt.dtype)


def global_target(model: SomaNet, gt: torch.Tensor, mask: torch.Tensor,
                  scores: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Index into the flattened global scores ``(B, K * n * n)`` of the (rotation, translation)
    hypothesis nearest to the ground truth, and whether it lies inside the hypothesis set.

    The ground truth is reduced to a weighted affine at stride 8; its rotation picks the hypothesis
    ``k``, and the translation is the one that, after that rotation, maps the level centre where
    the ground-truth affine does."""
    search = model.global_search
    b, k, n, _ = scores.shape
    g8 = geometry.downsample_flow(gt, 8)
    h8, w8 = g8.shape[-2:]
    m8 = level_mask(mask, 8).flatten(1)
    pts = geometry.grid_points(b, h8, w8, gt.device, gt.dtype)
    a = geometry.fit_affine(pts, pts + g8.flatten(2).transpose(1, 2), m8)
    theta = torch.atan2(a[:, 1, 0] - a[:, 0, 1], a[:, 0, 0] + a[:, 1, 1]) * (180.0 / math.pi)
    kk = torch.round((theta + search.max_rotation) / search.rotation_step).long()
    ok = (kk >= 0) & (kk < k)
    kk = kk.clamp(0, k - 1)
    rot = search.rotation_affines(search.hypotheses(b, gt.device, gt.dtype), h8, w8).view(b, k, 2, 3)[torch.arange(b, device=gt.device), kk]
    c = torch.tensor([(w8 - 1) / 2.0, (h8 - 1) / 2.0], device=gt.device, dtype=gt.dtype).expand(b, 2)
    p = torch.bmm(a[:, :, :2], c.unsqueeze(-1)).squeeze(-1) + a[:, :, 2]  # where the centre goes
    s = torch.linalg.solve(rot[:, :, :2], (p - rot[:, :, 2]).unsqueeze(-1)).squeeze(-1) - c
    r = (n - 1) // 2
    ix = torch.round(s[:, 0]).long() + r
    iy = torch.round(s[:, 1]).long() + r
    ok = ok & (ix >= 0) & (ix < n) & (iy >= 0) & (iy < n) & (m8.sum(1) > 0.25 * m8.shape[1])
    idx = kk * n * n + iy.clamp(0, n - 1) * n + ix.clamp(0, n - 1)
    return idx, ok


def match_ce(model: SomaNet, fo: torch.Tensor, fs: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor,
             stride: int, temp: int, r: int = 3, agg: int = 7) -> torch.Tensor:
    """Descriptor matching loss at one level: with the SAR descriptors warped by the ground truth,
    the window correlation the network matches with (:func:`window_zncc`) should peak at zero
    displacement (cross-entropy); ``temp`` indexes the network's ``log_scale``."""
    g = geometry.downsample_flow(gt, stride)
    corr = window_zncc(fo, geometry.warp(fs, g), r, agg) * model.log_scale[temp].exp()
    target = torch.full(corr[:, 0].shape, r * (2 * r + 1) + r, dtype=torch.long, device=gt.device)
    ce = F.cross_entropy(corr.float(), target, reduction="none").unsqueeze(1)
    return masked_mean(ce, level_mask(mask, stride))


def certainty_target(flow: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What the certainty should say: 1 where the flow is within 1 px of ``ref`` (and ``mask`` is
    set), else 0.  ``ref`` is the synthetic ground truth, or the self-consistent flow of
    :func:`consistency_target`, which the pair's own residual misregistration does not pollute."""
    err = torch.sqrt(((flow.detach() - ref) ** 2).sum(1, keepdim=True))
    return mask * (err < 1.0).to(ref.dtype)


def synthetic_loss(out: Dict[str, torch.Tensor], gt: torch.Tensor, mask: torch.Tensor,
                   opt_valid: torch.Tensor, model: SomaNet) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The multi-level loss against the synthetic deformation (see the module doc), weighted by
    :data:`WEIGHTS`; returns the total and its parts."""
    parts: Dict[str, torch.Tensor] = {}
    parts["flow"] = masked_mean(charbonnier(out["flow"] - gt), mask)
    for s, key in ((2, "flow2"), (4, "flow4")):
        g = geometry.downsample_flow(gt, s)
        parts[key] = masked_mean(charbonnier((out[key] - g) * s), level_mask(mask, s))
    g8 = geometry.downsample_flow(gt, 8)
    m8 = level_mask(mask, 8)
    h8, w8 = g8.shape[-2:]
    for key in ("affine_global", "affine8", "affine4"):
        af = geometry.affine_to_flow(geometry.scale_affine(out[key], 8.0), h8, w8)
        parts[key] = masked_mean(charbonnier((af - g8) * 8.0, 1.0), m8)
    # global hypotheses: cross-entropy towards the ground-truth (rotation, translation) bin
    scores = out["global_scores"]
    idx, ok = global_target(model, gt, mask, scores)
    ce = F.cross_entropy(scores.flatten(1).float(), idx, reduction="none")
    okf = ok.to(ce.dtype)
    parts["global_ce"] = (ce * okf).sum() / okf.sum().clamp(min=1.0)
    # descriptor matching at strides 4 and 2, at the temperatures of the dense levels there
    parts["match4"] = match_ce(model, out["desc_opt4"], out["desc_sar4"], gt, mask, 4, 3)
    parts["match2"] = match_ce(model, out["desc_opt2"], out["desc_sar2"], gt, mask, 2, 4)
    # certainty: BCE towards "error < 1 px" (0 where there is no valid match)
    target = certainty_target(out["flow"], gt, mask)
    bce = F.binary_cross_entropy_with_logits(out["logit"].float(), target.float(), reduction="none")
    parts["cert"] = masked_mean(bce, opt_valid)
    total = sum(WEIGHTS[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


def consistency_target(flow0: torch.Tensor, gt: torch.Tensor,
                       opt_valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """What a self-consistent flow on the deformed pair is, ``flow0`` followed by ``D`` (``gt``),
    and where that is defined (both displaced positions inside the chip, optical valid)."""
    h, w = gt.shape[-2:]
    expected = geometry.compose_flow(gt, flow0)
    mask = opt_valid * geometry.inside_mask(flow0, h, w) * geometry.inside_mask(expected, h, w)
    return expected, mask


def consistency_loss(flow0: torch.Tensor, flow1: torch.Tensor, gt: torch.Tensor,
                     opt_valid: torch.Tensor) -> torch.Tensor:
    """Self-consistency (the relative metric of ``soma evaluate``, as a loss): the flow ``flow1`` on
    the deformed pair should equal ``flow0 + D(q + flow0)``, the flow on the undeformed pair followed
    by the known deformation ``D`` (``gt``).  Independent of the pair's own misregistration."""
    expected, mask = consistency_target(flow0, gt, opt_valid)
    return masked_mean(charbonnier(flow1 - expected), mask)


def certainty_loss(model: SomaNet, batch: Dict[str, torch.Tensor], out: Dict[str, torch.Tensor],
                   mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the final certainty towards "within 1 px of the self-consistent
    flow" (the undeformed pair's flow, without gradient, followed by the deformation)."""
    with torch.no_grad():
        flow0 = model.run(batch["opt"], batch["sar0"], batch["opt_valid"], batch["sar0_valid"])["flow"]
    expected, defined = consistency_target(flow0, batch["gt"], batch["opt_valid"])
    tgt = certainty_target(out["flow"], expected, defined * mask)
    bce = F.binary_cross_entropy_with_logits(out["logit"].float(), tgt.float(), reduction="none")
    return masked_mean(bce, batch["opt_valid"])


def training_loss(model: SomaNet, batch: Dict[str, torch.Tensor], only: str, absolute: float,
                  consistency: float) -> Tuple[torch.Tensor, Dict[str, float]]:
    """The loss of one batch and its parts: with ``only="certainty"`` :func:`certainty_loss` alone,
    else ``absolute`` x :func:`synthetic_loss` + ``consistency`` x :func:`consistency_loss` (one
    more forward pass, on the undeformed pair; none when ``consistency`` is 0, which also leaves
    the synthetic loss unweighted)."""
    b = batch
    out = model.run(b["opt"], b["sar"], b["opt_valid"], b["sar_valid"])
    mask = gt_mask(b["gt"], b["opt_valid"], b["sar_valid"])
    if only == "certainty":
        loss = certainty_loss(model, b, out, mask)
        return loss, {"cert": float(loss.detach())}
    loss, parts = synthetic_loss(out, b["gt"], mask, b["opt_valid"], model)
    if consistency > 0:
        out0 = model.run(b["opt"], b["sar0"], b["opt_valid"], b["sar0_valid"])
        cons = consistency_loss(out0["flow"], out["flow"], b["gt"], b["opt_valid"])
        parts["consistency"] = float(cons.detach())
        loss = absolute * loss + consistency * cons
    return loss, parts

