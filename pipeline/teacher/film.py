"""Time-conditioned convolution blocks of the rectified teacher (docs/design.md §14).

``FiLMResBlock`` is a two-convolution residual block whose affine-free GroupNorms are modulated by
scales and shifts computed from t (FiLM, Perez et al. 2018); it starts as the identity (its last
convolution and last MLP layer are zero). ``Adapter`` is a spectral-norm 3×3 convolution, a stack of
FiLM blocks and a second spectral-norm 3×3 convolution: what maps the teacher's features into the
latent and back. ``Readout`` is the head that reads an image-shaped output (v or x0) from a latent.
"""
import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

GAMMA_SCALE = 0.1  # FiLM scales start small so that a block's normalisation dominates early training


def time_features(t: torch.Tensor, T: int, dim: int) -> torch.Tensor:
    """[B, dim] sinusoids of t / (T - 1) in [0, 1] (times 2π): dim/2 sines then dim/2 cosines, with
    frequencies exp(-ln(1e4) · i / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half - 1, 1))
    angle = (t.float() / max(T - 1, 1)).unsqueeze(1) * (2 * math.pi) * freqs.unsqueeze(0)
    features = torch.cat([angle.sin(), angle.cos()], dim=1)
    return nn.functional.pad(features, (0, dim - features.shape[1]))


class FiLMResBlock(nn.Module):
    """x + conv2(SiLU(FiLM2(GN(conv1(SiLU(FiLM1(GN(x)))))))), FiLM(h) = h · (1 + 0.1 γ) + β."""

    def __init__(self, channels: int, T: int, groups: int):
        super().__init__()
        self.channels, self.T = channels, T
        self.norm1 = nn.GroupNorm(groups, channels, affine=False)
        self.norm2 = nn.GroupNorm(groups, channels, affine=False)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.Linear(channels, 4 * channels), nn.SiLU(),
                                      nn.Linear(4 * channels, 4 * channels))
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv1.bias)
        nn.init.xavier_uniform_(self.time_mlp[0].weight)
        nn.init.zeros_(self.time_mlp[0].bias)
        for zero in (self.conv2, self.time_mlp[2]):  # the block starts as the identity
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)

    def forward(self, x, t):
        gamma1, beta1, gamma2, beta2 = (p[:, :, None, None] for p in
                                        self.time_mlp(time_features(t, self.T, self.channels)).chunk(4, dim=1))
        h = self.conv1(nn.functional.silu(self.norm1(x) * (1 + GAMMA_SCALE * gamma1) + beta1))
        h = self.conv2(nn.functional.silu(self.norm2(h) * (1 + GAMMA_SCALE * gamma2) + beta2))
        return x + h


class Adapter(nn.Module):
    """Spectral-norm conv 3×3 (in → mid), ``blocks`` FiLM blocks at mid, SiLU, spectral-norm conv 3×3
    (mid → out). Spectral norm bounds each convolution's gain, so stacked recurrent steps cannot blow up
    through the adapters."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, T: int, groups: int, blocks: int):
        super().__init__()
        self.conv_in = spectral_norm(nn.Conv2d(in_channels, mid_channels, 3, padding=1))
        self.blocks = nn.ModuleList(FiLMResBlock(mid_channels, T, groups) for _ in range(blocks))
        self.conv_out = spectral_norm(nn.Conv2d(mid_channels, out_channels, 3, padding=1))

    def forward(self, x, t):
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, t)
        return self.conv_out(nn.functional.silu(h))


class Readout(nn.Module):
    """An image-shaped output (v or x0) from a latent at time t: conv 3×3, ``blocks`` FiLM blocks, plus a
    1×1 projection of the latent (zero at start), SiLU, conv 3×3 to the image channels (near zero at
    start, so a fresh head outputs almost nothing)."""

    def __init__(self, latent_channels: int, width: int, image_channels: int, T: int, groups: int, blocks: int):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(FiLMResBlock(width, T, groups) for _ in range(blocks))
        self.skip = nn.Conv2d(latent_channels, width, 1, bias=False)
        self.conv_out = nn.Conv2d(width, image_channels, 3, padding=1)
        nn.init.kaiming_normal_(self.conv_in.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.conv_in.bias)
        nn.init.zeros_(self.skip.weight)
        nn.init.xavier_uniform_(self.conv_out.weight, gain=1e-5)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, z, t):
        h = self.conv_in(z)
        for block in self.blocks:
            h = block(h, t)
        return self.conv_out(nn.functional.silu(h + self.skip(z)))
