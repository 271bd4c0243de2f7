"""Noise-level conditioning shared by every DiffusionBlocks model (METHOD.md §5).

- :class:`TimestepEmbedder`: 256-d sinusoidal features of the noise label → Linear → SiLU →
  Linear (width ``cond_dim``, default :func:`default_cond_dim`). The model feeds ``c = SiLU(emb)``
  to every adaLN.
- :class:`AdaLNTable`: the per-layer learned 6·dim table of adaLN-single (PixArt-α).
- :func:`modulate`: ``x·(1 + scale) + shift``, broadcast over the sequence.
- ``ZERO_INIT``: the param_init that makes an adaLN (or head) start at exactly zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.common import Linear
from torchtitan.protocols.module import Module

ZERO_INIT = {"weight": nn.init.zeros_, "bias": nn.init.zeros_}
TABLE_INIT = {"table": nn.init.zeros_}
_MLP_INIT = {"weight": partial(nn.init.normal_, std=0.02), "bias": nn.init.zeros_}


def default_cond_dim(dim: int) -> int:
    """Width C of the conditioning vector: the authors' ``dim // 6`` rounded up to a multiple of 64
    (64 at d = 128, 128 at d = 768, 384 at d = 2048, 704 at d = 4096). A per-layer adaLN Linear
    C → 6·dim then adds 6·C·dim parameters to a layer instead of 6·dim² (C = dim: 1.5× a llama3 layer)."""
    return -(-(dim // 6) // 64) * 64


def sinusoidal_features(t: torch.Tensor, dim: int, scale: float, max_period: float = 10000.0) -> torch.Tensor:
    """``[cos(scale·t·f_k), sin(scale·t·f_k)]`` with ``f_k = max_period^(−k/(dim/2))``.

    Shapes: t [B] → [B, dim]. Computed in fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1+scale)+shift``. Shapes: x [B, L, D]; shift, scale [B, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(Module):
    """Embeds the noise label (AR: ``c_noise = ¼·ln σ``, METHOD.md §5; masked diffusion: t) as
    sinusoidal features of ``time_scale·label`` → Linear → SiLU → Linear, width ``dim`` (the model's
    ``cond_dim``).

    ``c_noise`` spans only ≈[−1.55, 1.1] on [σ_min, σ_max]: ``time_scale`` 1 feeds it as it is (EDM,
    the authors); 1000 (flux's factor for t ∈ [0, 1], the masked-diffusion models' default) spreads it
    over more of the sinusoid's frequencies.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        dim: int
        """Output width: the conditioning vector's C."""
        frequency_dim: int = 256
        time_scale: float = 1000.0

    def __init__(self, config: Config):
        super().__init__()
        self.frequency_dim = config.frequency_dim
        self.time_scale = config.time_scale
        self.fc1 = Linear.Config(
            in_features=config.frequency_dim, out_features=config.dim, bias=True, param_init=_MLP_INIT
        ).build()
        self.fc2 = Linear.Config(in_features=config.dim, out_features=config.dim, bias=True, param_init=_MLP_INIT).build()

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        """c_noise [B] → embedding [B, dim] (before the SiLU that the adaLNs consume)."""
        feats = sinusoidal_features(c_noise, self.frequency_dim, self.time_scale)
        return self.fc2(F.silu(self.fc1(feats.to(self.fc1.weight.dtype))))


class AdaLNTable(Module):
    """adaLN-single's per-layer part (PixArt-α): a learned table [6, dim] added to the modulation
    ``m = W·c`` [B, 6·dim] that ONE Linear shared by all layers computes, so a layer's shift, scale
    and gate for attention and MLP are ``m + table.flatten()``. Zero-initialised (with the shared
    Linear zero too, every layer starts as the identity)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        dim: int

    def __init__(self, config: Config):
        super().__init__()
        self.table = nn.Parameter(torch.empty(6, config.dim))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        """m [B, (G,) 6·dim] → m + table."""
        return m + self.table.flatten()
