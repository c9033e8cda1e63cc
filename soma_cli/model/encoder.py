"""The per-modality encoder of SOMA: oriented-gradient descriptors plus a small CNN trunk.

A level-0 FGE on the image (learnable oriented gradient filters, 8 directions x 3x3 and 5x5,
initialised from exactly rotated Sobel kernels, polarity-free magnitude, per-channel gain) gives a
dense structural descriptor; it is pooled into cells at strides 2, 4 and 8.  A CNN trunk with an
FGE (oriented filters on deep features, channel and spatial attention, reconstruction, residual)
after its stride 2, 4 and 8 blocks adds learnt channels at each of those levels.  At
initialisation the learnt channels are small, so the descriptor is CFOG-like and the untrained
network already matches like a structural-gradient matcher.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig

ANGLES_DEG = [0.0, 22.5, 45.0, 67.5, 90.0, 112.5, 135.0, 157.5]


def sobel_pair(size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sobel ``(Gx, Gy)`` of size 3 or 5 (smoothing x derivative outer products), x along columns."""
    if size == 3:
        smooth = torch.tensor([1.0, 2.0, 1.0])
        deriv = torch.tensor([-1.0, 0.0, 1.0])
    elif size == 5:
        smooth = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
        deriv = torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0])
    else:
        raise ValueError("Sobel size must be 3 or 5")
    gx = torch.outer(smooth, deriv)  # rows smooth, columns derivative
    gy = torch.outer(deriv, smooth)
    return gx, gy


def oriented_kernels(size: int, angles_deg: List[float]) -> torch.Tensor:
    """``(len(angles), size, size)`` exact rotations of the Sobel pair: ``cos(t) Gx + sin(t) Gy``
    (the directional derivative along ``t``, measured from the column axis towards the row axis)."""
    gx, gy = sobel_pair(size)
    return torch.stack([math.cos(math.radians(a)) * gx + math.sin(math.radians(a)) * gy for a in angles_deg])


def kernel_bank(k3: torch.Tensor, k5: torch.Tensor) -> torch.Tensor:
    """``(2n, 5, 5)``: the ``n`` 3x3 kernels ``k3`` zero-padded to 5x5, then the ``n`` 5x5 kernels
    ``k5``, for one convolution that computes both sizes."""
    return torch.cat([F.pad(k3, [1, 1, 1, 1]), k5], 0)


def gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable blur of every channel with the 1-D kernel ``g`` (replicate padding): a depthwise
    convolution, or for one channel weighted sums of shifted views (oneDNN's convolution is 5
    times slower there on the CPU)."""
    c = x.shape[1]
    r = (g.shape[0] - 1) // 2
    if c == 1:
        h = x.shape[-2]
        w = x.shape[-1]
        xp = F.pad(x, [r, r, 0, 0], mode="replicate")
        y = xp[:, :, :, 0:w] * g[0]
        for i in range(1, 2 * r + 1):
            y.addcmul_(xp[:, :, :, i:i + w], g[i])
        yp = F.pad(y, [0, 0, r, r], mode="replicate")
        z = yp[:, :, 0:h, :] * g[0]
        for i in range(1, 2 * r + 1):
            z.addcmul_(yp[:, :, i:i + h, :], g[i])
        return z
    kx = g.view(1, 1, 1, -1).expand(c, 1, 1, g.shape[0])
    ky = g.view(1, 1, -1, 1).expand(c, 1, g.shape[0], 1)
    x = F.conv2d(F.pad(x, [r, r, 0, 0], mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, [0, 0, r, r], mode="replicate"), ky, groups=c)


def nchw(x: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """``x.contiguous()``: a channels-last map in the default layout.  On the CPU without autograd
    it is copied ``rows`` rows at a time, so that each band's reads and writes stay in a core's
    cache (a 16-channel 768 px map goes about 1.7 times faster than by one strided copy); the same
    values."""
    if x.is_contiguous() or x.is_cuda or x.requires_grad:
        return x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for i in range(0, x.shape[2], rows):
        out[:, :, i:i + rows].copy_(x[:, :, i:i + rows])
    return out


def cell_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """Overlapping cells (``2s`` wide, stride ``s``): full resolution -> stride-``s`` level."""
    return F.avg_pool2d(x, 2 * s, s, s // 2, count_include_pad=False)


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 convolution (``weight`` ``(Co, Ci, 1, 1)``) as one matrix product over the positions:
    2 to 4 times faster than oneDNN's 1x1 convolution on the CPU, the same values up to rounding."""
    b, c, h, w = x.shape
    y = torch.matmul(weight.view(weight.shape[0], c), x.reshape(b, c, h * w))
    if bias is not None:
        y.add_(bias.view(1, -1, 1))
    return y.view(b, -1, h, w)


class Pointwise(nn.Conv2d):
    """``nn.Conv2d(cin, cout, 1)`` (its parameters and initialisation) computed by :func:`pointwise`."""

    def __init__(self, cin: int, cout: int):
        super().__init__(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise(x, self.weight, self.bias)


def conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.LeakyReLU(0.1, inplace=True))


class FGE(nn.Module):
    """Feature Gradient Enhancer: learnable oriented gradient filters (8 directions x 2 scales,
    initialised from exactly rotated Sobel kernels) applied depthwise to a channel reduction of the
    features, magnitude, SE channel attention, CBAM spatial attention, 1x1 reconstruction, residual.

    The gradient energies are ordered all 3x3 responses, then all 5x5, group-major within each
    (the order of the SE and reconstruction weights); :meth:`forward` computes both sizes in one
    grouped convolution (:func:`kernel_bank`), whose outputs come per group, and
    reads those weights in that order (:attr:`order`) instead of reordering the energies."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        g = min(channels, groups)
        self.g = g
        self.n_dir = len(ANGLES_DEG)
        self.reduce = Pointwise(channels, g)
        self.k3 = nn.Parameter(oriented_kernels(3, ANGLES_DEG) / 8.0)
        self.k5 = nn.Parameter(oriented_kernels(5, ANGLES_DEG) / 96.0)
        n = 2 * self.n_dir * g
        hidden = max(n // 4, 8)
        self.se1 = nn.Conv2d(n, hidden, 1)
        self.se2 = nn.Conv2d(hidden, n, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.recon = Pointwise(n, channels)
        nn.init.normal_(self.recon.weight, std=0.01)
        nn.init.zeros_(self.recon.bias)
        # order[i]: the energy (in the weights' order) that the grouped convolution's output i holds:
        # group j's direction d at size s (0: 3x3, 1: 5x5) is energy s * g * n_dir + j * n_dir + d
        j = torch.arange(g).view(g, 1, 1)
        sz = torch.arange(2).view(1, 2, 1)
        d = torch.arange(self.n_dir).view(1, 1, self.n_dir)
        self.register_buffer("order", (sz * g * self.n_dir + j * self.n_dir + d).reshape(-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.g
        nd = self.n_dir
        kernels = kernel_bank(self.k3, self.k5).unsqueeze(0).expand(g, 2 * nd, 5, 5).reshape(g * 2 * nd, 1, 5, 5)
        e = F.conv2d(self.reduce(x), kernels, padding=2, groups=g)
        # in place where no gradient is recorded (fewer large temporaries: about 30 % faster at stride 2)
        inplace = not torch.is_grad_enabled()
        e = e.abs_() if inplace else e.abs()  # polarity-free oriented gradient energy
        o = self.order
        bias = self.se2.bias
        assert bias is not None
        hid = F.relu(F.conv2d(e.mean((2, 3), keepdim=True), self.se1.weight[:, o], self.se1.bias))
        ca = torch.sigmoid(F.conv2d(hid, self.se2.weight[o], bias[o]))
        e = e.mul_(ca) if inplace else e * ca
        sa = torch.sigmoid(self.spatial(torch.cat([e.mean(1, keepdim=True), e.amax(1, keepdim=True)], 1)))
        e = e.mul_(sa) if inplace else e * sa
        return pointwise(e, self.recon.weight[:, o], self.recon.bias).add_(x)


class GradientDescriptor(nn.Module):
    """Level-0 FGE on the image: Gaussian pre-smoothing, learnable oriented gradient filters
    (8 directions x 3x3 and 5x5, exactly rotated Sobel initialisation; one convolution,
    :func:`kernel_bank`), polarity-free magnitude and a learnable per-channel gain.
    ``(B, 1, H, W)`` -> ``(B, 16, H, W)``."""

    def __init__(self, sigma: float):
        super().__init__()
        self.n_dir = len(ANGLES_DEG)
        self.k3 = nn.Parameter(oriented_kernels(3, ANGLES_DEG) / 8.0)
        self.k5 = nn.Parameter(oriented_kernels(5, ANGLES_DEG) / 96.0)
        self.gain = nn.Parameter(torch.ones(2 * self.n_dir))
        self.register_buffer("g1", gaussian_1d(sigma, int(round(2 * sigma))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = kernel_bank(self.k3, self.k5).unsqueeze(1)
        e = F.conv2d(blur(x, self.g1), kernels, padding=2)
        if torch.is_grad_enabled():
            return e.abs() * self.gain.view(1, -1, 1, 1)
        return e.abs_().mul_(self.gain.view(1, -1, 1, 1))


class Encoder(nn.Module):
    """One modality: raw matching descriptors at strides 1, 2, 4 and 8 (see the module doc)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        ch = config.channels
        self.grad = GradientDescriptor(config.gradient_sigma)
        #: the oriented channels, the first of every level's descriptor
        self.oriented = 2 * len(ANGLES_DEG)
        sigma = config.full_res_sigma
        self.register_buffer("g2", gaussian_1d(sigma, int(round(2 * sigma))))
        self.l1 = nn.Sequential(conv(1, ch[0], 2), conv(ch[0], ch[0]))
        self.l2 = nn.Sequential(conv(ch[0], ch[1], 2), conv(ch[1], ch[1]))
        self.l3 = nn.Sequential(conv(ch[1], ch[2], 2), conv(ch[2], ch[2]))
        self.fge1 = FGE(ch[0], config.fge_groups[0])
        self.fge2 = FGE(ch[1], config.fge_groups[1])
        self.fge3 = FGE(ch[2], config.fge_groups[2])
        self.p2 = Pointwise(ch[0], config.learnt)
        self.p4 = Pointwise(ch[1], config.learnt)
        self.p8 = Pointwise(ch[2], config.learnt)
        for p in (self.p2, self.p4, self.p8):
            nn.init.normal_(p.weight, std=0.02)
            nn.init.zeros_(p.bias)

    def forward(self, x: torch.Tensor, full: bool = True) -> List[torch.Tensor]:
        """``[m1, m2, m4, m8]``, or when not ``full`` ``[o8]``: the oriented channels of ``m8``
        alone (its first :attr:`oriented` channels, without the CNN trunk: what the global stage
        matches)."""
        # the oriented channels are pooled and blurred channels last (the pixel's 16 values
        # together): 2-4 times faster there on the CPU, the same values
        e = self.grad(x).contiguous(memory_format=torch.channels_last)
        o8 = nchw(cell_pool(e, 8))
        if not full:
            return [o8]
        f1 = self.fge1(self.l1(x))
        f2 = self.fge2(self.l2(f1))
        f3 = self.fge3(self.l3(f2))
        m8 = torch.cat([o8, self.p8(f3)], 1)
        m1 = nchw(blur(e, self.g2))
        m2 = torch.cat([nchw(cell_pool(e, 2)), self.p2(f1)], 1)
        m4 = torch.cat([nchw(cell_pool(e, 4)), self.p4(f2)], 1)
        return [m1, m2, m4, m8]
