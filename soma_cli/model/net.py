"""The SOMA network (CPU-sized): a two-stream encoder with FGE, and GLAM (global-local affine-flow
matching) ending in a dense flow and a certainty.

Contract (RoMa-like)::

    flow, certainty = net(opt, sar, opt_valid=None, sar_valid=None)

``opt``/``sar`` are ``(B, 1, H, W)`` float32 standardised tiles (:mod:`soma_cli.preprocess`), ``H``
and ``W`` multiples of :data:`~soma_cli.model.config.TILE_MULTIPLE`; ``flow`` is ``(B, 2, H, W)`` in
pixels on the optical grid (:mod:`soma_cli.coords` convention: optical pixel ``q`` matches the SAR
at ``q + flow(q)``) and ``certainty`` ``(B, 1, H, W)`` in ``[0, 1]``.  :meth:`SomaNet.run` returns
every intermediate (per-level affines and flows, global scores, logits) for training.  Every warp,
affine and flow resampling goes through :mod:`soma_cli.model.geometry`.  The module is
``torch.jit.script``-able; its hyper-parameters come from one :class:`SomaConfig`.

Structure:

* **encoder** per modality (separate weights, :mod:`.encoder`): matching descriptors at strides 1,
  2, 4 and 8, centred per channel and L2-normalised per position (:func:`l2n`).
* **GLAM** (:mod:`.stages`): (1) a global affine at stride 8 (:class:`GlobalSearch`) on the
  oriented-gradient channels of both descriptors (the SAR's need no CNN trunk); the SAR
  *image* is then resampled by it and encoded again, so that its oriented channels are in the
  optical frame (warping the descriptors of a rotated image would leave them in the SAR frame);
  (2) affine refinement at strides 8, 4 and 2 (:class:`AffineLevel`); (3) dense flow at strides 4,
  2 and full resolution (:class:`DenseLevel`), flows rescaled when upsampled; (4) a certainty
  calibration from the dense consensus supports, and the global-local blend
  (:class:`GlobalLocalBlend`) once that calibration is trained.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import geometry
from .config import SomaConfig
from .correlation import box, l2n
from .encoder import Encoder
from .stages import AffineLevel, DenseLevel, GlobalLocalBlend, GlobalSearch

#: Correlation softmax temperature at initialisation (a learnt parameter per stage).
INITIAL_TEMPERATURE = 50.0


class SomaNet(nn.Module):
    """The network of the module doc, built from one :class:`SomaConfig` (kept as :attr:`config`
    on the Python side; each stage holds the numbers it uses, which is what TorchScript compiles)."""

    __jit_ignored_attributes__ = ["config"]

    def __init__(self, config: SomaConfig = SomaConfig()):
        super().__init__()
        self.config = config
        c = config
        self.enc_opt = Encoder(c.encoder)
        self.enc_sar = Encoder(c.encoder)
        # log temperatures of the correlation softmaxes: 0 global search, 1 affine 1/8 (and the
        # global verification), 2 affine 1/4 and 1/2, 3 dense 1/4, 4 dense 1/2, 5 dense full resolution
        self.log_scale = nn.Parameter(torch.full((6,), math.log(INITIAL_TEMPERATURE)))
        # certainty calibration: the final logit adds cert_gain * (w0 s4 + w1 s2 + w2 s1) + w3, where
        # sN is the consensus support of the dense level at 1/N (the confidence-weighted share of
        # agreeing peaks around a pixel), upsampled to full resolution.  Zero (the initialisation)
        # leaves the heads' logit alone; ``soma train --only certainty`` fits it to "within 1 px of
        # the self-consistent flow".  The supports are detached: the certainty reads the matching,
        # it does not shape it.  The gain keeps the fitted weights O(1), within Adam's reach.
        self.cert_w = nn.Parameter(torch.zeros(4))
        self.cert_gain = c.cert_gain
        self.border_margin = c.border_margin
        self.global_search = GlobalSearch(c.global_search, c.affine8, c.fit_cauchy_px, c.fit_iterations)
        self.affine8 = AffineLevel(8, c.affine8, c.fit_cauchy_px, c.fit_iterations)
        self.affine4 = AffineLevel(4, c.affine4, c.fit_cauchy_px, c.fit_iterations)
        self.affine2 = AffineLevel(2, c.affine2, c.fit_cauchy_px, c.fit_iterations)
        self.dense4 = DenseLevel(c.dense4, True, c.head_hidden, c.consensus_iterations, c.consensus_shrink)
        self.dense2 = DenseLevel(c.dense2, False, c.head_hidden, c.consensus_iterations, c.consensus_shrink)
        self.dense1 = DenseLevel(c.dense1, False, c.head_hidden, c.consensus_iterations, c.consensus_shrink)
        self.blend = GlobalLocalBlend(c.blend_step, c.blend_cauchy_px, c.blend_iterations)

    def reencode_sar(self, sar: torch.Tensor, vs: torch.Tensor, vo: torch.Tensor,
                     a: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The SAR resampled by the affine ``a`` (bicubic, full-resolution pixels) and encoded again,
        so that its oriented channels and learnt features are in the optical frame: its normalised
        descriptors at strides 1, 2, 4, 8, and the matching weights at those strides (both images
        valid and :attr:`border_margin` px away from their borders, where zero padding and the
        coverage edge of the resampled SAR make gradients that the other image lacks)."""
        fl = geometry.affine_to_flow(a, sar.shape[-2], sar.shape[-1]).detach()
        vsw = (geometry.warp(vs, fl) > 0.99).to(vs.dtype)
        msw = [l2n(f) for f in self.enc_sar(geometry.warp(sar * vs, fl, "bicubic") * vsw)]
        m = self.border_margin
        bad = 1.0 - vo * vsw
        # within m px of a bad pixel: the window mean of the 0/1 map is above 0 (exactly 0 elsewhere)
        vb = (box(bad, 2 * m + 1) <= 0.0).to(vo.dtype)
        vl = [vb, (F.avg_pool2d(vb, 2) > 0.99).to(vo.dtype), (F.avg_pool2d(vb, 4) > 0.99).to(vo.dtype),
              (F.avg_pool2d(vb, 8) > 0.99).to(vo.dtype)]
        return msw, vl

    def run(self, opt: torch.Tensor, sar: torch.Tensor, opt_valid: Optional[torch.Tensor] = None,
            sar_valid: Optional[torch.Tensor] = None, rotation: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Full pass returning intermediates: affines (full-resolution pixels), global scores,
        per-level flows (level pixels, composed with the global affine), the final flow and
        certainty logit, and (in training mode only) the first-pass (unresampled) descriptors at
        1/4 and 1/2 for the training losses.  ``rotation`` ``(B,)`` (degrees): the global stage
        searches that rotation only (:class:`GlobalSearch`)."""
        if opt_valid is None:
            vo = torch.ones_like(opt)
        else:
            vo = opt_valid.to(opt.dtype)
        if sar_valid is None:
            vs = torch.ones_like(sar)
        else:
            vs = sar_valid.to(sar.dtype)
        fo = self.enc_opt(opt * vo)
        n = self.enc_opt.oriented
        go = l2n(fo[3][:, :n].clone())  # the global stage's optical descriptors (l2n works in place)
        mo = [l2n(f) for f in fo]
        # first SAR pass, in the SAR frame: only the global stage (its oriented channels at 1/8) and,
        # in training, the losses' descriptors (1/4, 1/2) use it; the later stages match the
        # re-encoded SAR below
        fs = self.enc_sar(sar * vs, self.training)
        out: Dict[str, torch.Tensor] = {}
        if self.training:
            out["desc_opt4"] = mo[2]
            out["desc_sar4"] = l2n(fs[2])
            out["desc_opt2"] = mo[1]
            out["desc_sar2"] = l2n(fs[1])

        ls = self.log_scale
        # (1) global affine at stride 8
        a8, scores = self.global_stage(go, l2n(fs[-1][:, :n].clone()), vo, vs, rotation)
        a_g = geometry.scale_affine(a8, 1.0 / 8.0)
        out["global_scores"] = scores
        out["affine_global"] = a_g
        # re-encode the SAR resampled by the global affine; the later stages estimate what remains
        # (a_rel, then a relative flow) and their outputs are composed with the global affine
        msw, vl = self.reencode_sar(sar, vs, vo, a_g)
        # (2) affine refinement at stride 8, 4 and 2
        a_rel = geometry.identity_affine(opt.shape[0], opt.device, opt.dtype)
        a_rel = self.affine8(mo[3], msw[3], vl[3], a_rel, temperature=ls[1].exp())
        out["affine8"] = geometry.compose_affine(a_g, a_rel)
        a_rel = self.affine4(mo[2], msw[2], vl[2], a_rel, temperature=ls[2].exp())
        out["affine4"] = geometry.compose_affine(a_g, a_rel)
        a_rel = self.affine2(mo[1], msw[1], vl[1], a_rel, temperature=ls[2].exp())
        out["affine2"] = geometry.compose_affine(a_g, a_rel)
        # (3) dense flow at stride 4, 2, then full resolution
        fl4 = geometry.affine_to_flow(geometry.scale_affine(a_rel, 4.0), mo[2].shape[-2], mo[2].shape[-1])
        fl4, lg4, sup4 = self.dense4(mo[2], msw[2], vl[2], fl4, temperature=ls[3].exp(),
                                     prev_logit=None)
        out["flow4"] = geometry.affine_after_flow(geometry.scale_affine(a_g, 4.0), fl4)
        out["logit4"] = lg4
        fl2, lg2, sup2 = self.dense2(mo[1], msw[1], vl[1], geometry.upsample_flow(fl4, 2),
                                     temperature=ls[4].exp(), prev_logit=upsample(lg4, 2))
        out["flow2"] = geometry.affine_after_flow(geometry.scale_affine(a_g, 2.0), fl2)
        out["logit2"] = lg2
        fl1, lg1, sup1 = self.dense1(mo[0], msw[0], vl[0], geometry.upsample_flow(fl2, 2),
                                     temperature=ls[5].exp(), prev_logit=upsample(lg2, 2))
        out["flow"] = geometry.affine_after_flow(a_g, fl1)
        out["logit"] = lg1 + self.certainty_calibration(upsample(sup4, 4), upsample(sup2, 2), sup1)
        return out

    def global_stage(self, mo8: torch.Tensor, ms8: torch.Tensor, vo: torch.Tensor, vs: torch.Tensor,
                     rotation: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """:class:`GlobalSearch` on the normalised stride-8 (oriented) descriptors, with the cells
        whose pixels are all valid (``vo``/``vs`` at full resolution): (affine in level pixels,
        scores)."""
        vo8 = (F.avg_pool2d(vo, 8) > 0.99).to(vo.dtype)
        vs8 = (F.avg_pool2d(vs, 8) > 0.99).to(vs.dtype)
        ls = self.log_scale
        return self.global_search(mo8, ms8, vo8, vs8, temperature=ls[0].exp(), verify_temperature=ls[1].exp(),
                                  rotation=rotation)

    @torch.jit.export
    def global_rotation(self, opt: torch.Tensor, sar: torch.Tensor, opt_valid: torch.Tensor,
                        sar_valid: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the rotation (degrees) of the global stage's answer, the hypothesis it chose
        (what :meth:`run` searches first, on the coarse level alone)."""
        vo = opt_valid.to(opt.dtype)
        vs = sar_valid.to(sar.dtype)
        a8, _ = self.global_stage(l2n(self.enc_opt(opt * vo, False)[0]), l2n(self.enc_sar(sar * vs, False)[0]),
                                  vo, vs, None)
        step = self.global_search.rotation_step
        return torch.round(torch.atan2(a8[:, 1, 0], a8[:, 0, 0]) * (180.0 / math.pi) / step) * step

    def certainty_calibration(self, sup4: torch.Tensor, sup2: torch.Tensor, sup1: torch.Tensor) -> torch.Tensor:
        """The calibration term of the final certainty logit (see :attr:`cert_w`), ``(B, 1, H, W)``."""
        w = self.cert_w
        return self.cert_gain * (w[0] * sup4 + w[1] * sup2 + w[2] * sup1) + w[3]

    def forward(self, opt: torch.Tensor, sar: torch.Tensor, opt_valid: Optional[torch.Tensor] = None,
                sar_valid: Optional[torch.Tensor] = None,
                rotation: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.run(opt, sar, opt_valid, sar_valid, rotation)
        flow = out["flow"]
        cert = torch.sigmoid(out["logit"])
        h = opt.shape[-2]
        w = opt.shape[-1]
        cert = cert * geometry.inside_mask(flow, h, w)
        if opt_valid is not None:
            cert = cert * opt_valid.to(cert.dtype)
        if sar_valid is not None:
            sv = geometry.warp(sar_valid.to(cert.dtype), flow)
            cert = cert * (sv > 0.99).to(cert.dtype)
        if self.blend_active():
            flow = self.blend(flow, cert)
        return flow, cert

    def blend_active(self) -> bool:
        """The global-local blend needs a calibrated certainty: with the untrained certainty of 0.5
        it would halve every local deviation from the affine, so it acts once :attr:`cert_w` is
        trained (not all zero)."""
        return bool((self.cert_w != 0.0).any())


def upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """A map (not a flow: values are kept) on a ``factor`` times finer level, bilinear."""
    return F.interpolate(x, scale_factor=float(factor), mode="bilinear", align_corners=False)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
