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
from typing import List, Tuple

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


def gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable depthwise blur with the 1-D kernel ``g`` (replicate padding)."""
    c = x.shape[1]
    r = (g.shape[0] - 1) // 2
    kx = g.view(1, 1, 1, -1).expand(c, 1, 1, g.shape[0])
    ky = g.view(1, 1, -1, 1).expand(c, 1, g.shape[0], 1)
    x = F.conv2d(F.pad(x, [r, r, 0, 0], mode="replicate"), kx, groups=c)
    return F.conv2d(F.pad(x, [0, 0, r, r], mode="replicate"), ky, groups=c)


def cell_pool(x: torch.Tensor, s: int) -> torch.Tensor:
    """Overlapping cells (``2s`` wide, stride ``s``): full resolution -> stride-``s`` level."""
    return F.avg_pool2d(x, 2 * s, s, s // 2, count_include_pad=False)


def conv(cin: int, cout: int, stride: int = 1, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2), nn.LeakyReLU(0.1))


class FGE(nn.Module):
    """Feature Gradient Enhancer: learnable oriented gradient filters (8 directions x 2 scales,
    initialised from exactly rotated Sobel kernels) applied depthwise to a channel reduction of the
    features, magnitude, SE channel attention, CBAM spatial attention, 1x1 reconstruction, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        g = min(channels, groups)
        self.g = g
        self.n_dir = len(ANGLES_DEG)
        self.reduce = nn.Conv2d(channels, g, 1)
        self.k3 = nn.Parameter(oriented_kernels(3, ANGLES_DEG) / 8.0)
        self.k5 = nn.Parameter(oriented_kernels(5, ANGLES_DEG) / 96.0)
        n = 2 * self.n_dir * g
        hidden = max(n // 4, 8)
        self.se1 = nn.Conv2d(n, hidden, 1)
        self.se2 = nn.Conv2d(hidden, n, 1)
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.recon = nn.Conv2d(n, channels, 1)
        nn.init.normal_(self.recon.weight, std=0.01)
        nn.init.zeros_(self.recon.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        w3 = self.k3.unsqueeze(0).expand(self.g, self.n_dir, 3, 3).reshape(self.g * self.n_dir, 1, 3, 3)
        w5 = self.k5.unsqueeze(0).expand(self.g, self.n_dir, 5, 5).reshape(self.g * self.n_dir, 1, 5, 5)
        e3 = F.conv2d(r, w3, padding=1, groups=self.g)
        e5 = F.conv2d(r, w5, padding=2, groups=self.g)
        e = torch.cat([e3, e5], 1).abs()  # polarity-free oriented gradient energy
        ca = torch.sigmoid(self.se2(F.relu(self.se1(e.mean((2, 3), keepdim=True)))))
        e = e * ca
        sa = torch.sigmoid(self.spatial(torch.cat([e.mean(1, keepdim=True), e.amax(1, keepdim=True)], 1)))
        e = e * sa
        return x + self.recon(e)


class GradientDescriptor(nn.Module):
    """Level-0 FGE on the image: Gaussian pre-smoothing, learnable oriented gradient filters
    (8 directions x 3x3 and 5x5, exactly rotated Sobel initialisation), polarity-free magnitude and a
    learnable per-channel gain.  ``(B, 1, H, W)`` -> ``(B, 16, H, W)``."""

    def __init__(self, sigma: float):
        super().__init__()
        self.n_dir = len(ANGLES_DEG)
        self.k3 = nn.Parameter(oriented_kernels(3, ANGLES_DEG) / 8.0)
        self.k5 = nn.Parameter(oriented_kernels(5, ANGLES_DEG) / 96.0)
        self.gain = nn.Parameter(torch.ones(2 * self.n_dir))
        self.register_buffer("g1", gaussian_1d(sigma, int(round(2 * sigma))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = blur(x, self.g1)
        e3 = F.conv2d(xs, self.k3.unsqueeze(1), padding=1)
        e5 = F.conv2d(xs, self.k5.unsqueeze(1), padding=2)
        return torch.cat([e3, e5], 1).abs() * self.gain.view(1, -1, 1, 1)


class Encoder(nn.Module):
    """One modality: raw matching descriptors at strides 1, 2, 4 and 8 (see the module doc)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        ch = config.channels
        self.grad = GradientDescriptor(config.gradient_sigma)
        sigma = config.full_res_sigma
        self.register_buffer("g2", gaussian_1d(sigma, int(round(2 * sigma))))
        self.l1 = nn.Sequential(conv(1, ch[0], 2), conv(ch[0], ch[0]))
        self.l2 = nn.Sequential(conv(ch[0], ch[1], 2), conv(ch[1], ch[1]))
        self.l3 = nn.Sequential(conv(ch[1], ch[2], 2), conv(ch[2], ch[2]))
        self.fge1 = FGE(ch[0], config.fge_groups[0])
        self.fge2 = FGE(ch[1], config.fge_groups[1])
        self.fge3 = FGE(ch[2], config.fge_groups[2])
        self.p2 = nn.Conv2d(ch[0], config.learnt, 1)
        self.p4 = nn.Conv2d(ch[1], config.learnt, 1)
        self.p8 = nn.Conv2d(ch[2], config.learnt, 1)
        for p in (self.p2, self.p4, self.p8):
            nn.init.normal_(p.weight, std=0.02)
            nn.init.zeros_(p.bias)

    def forward(self, x: torch.Tensor, full: bool = True) -> List[torch.Tensor]:
        """``[m1, m2, m4, m8]``, or ``[m8]`` alone when not ``full``."""
        e = self.grad(x)
        f1 = self.fge1(self.l1(x))
        f2 = self.fge2(self.l2(f1))
        f3 = self.fge3(self.l3(f2))
        m8 = torch.cat([cell_pool(e, 8), self.p8(f3)], 1)
        if not full:
            return [m8]
        m1 = blur(e, self.g2)
        m2 = torch.cat([cell_pool(e, 2), self.p2(f1)], 1)
        m4 = torch.cat([cell_pool(e, 4), self.p4(f2)], 1)
        return [m1, m2, m4, m8]
