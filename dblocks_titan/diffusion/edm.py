"""EDM (variance-exploding) noise math for DiffusionBlocks, as pure functions.

Noise: ``z = y + σ·ε`` with ``ε ~ N(0, I)``. Training density ``ln σ ~ N(P_mean, P_std²)``
truncated to ``[σ_min, σ_max]``. Its CDF is ``q(σ) = Φ((ln σ − P_mean)/P_std)``; the L layers are
cut into B blocks that each own 1/B of the mass in q.

Conventions used throughout:
- **Block 0 (the first layers) owns the HIGHEST σ range, block B−1 the lowest.** With ascending
  boundaries ``σ_0 < … < σ_B``, block b owns ``[σ_{B−b−1}, σ_{B−b}]``.
- One routing function, :func:`sigma_to_block`, maps σ → block for training, eval and sampling. A σ
  exactly on an interior boundary goes to the upper-σ range (the lower block index).
- Returned σ and coefficients are fp32. Inverting Φ near q_max = Φ(4.65) ≈ 1 − 1.7e-6 loses
  digits in fp32, so q ↔ σ conversions run in float64 internally (see :func:`q_to_sigma`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Weighting = Literal["none", "per_sample", "batch_mean"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)


@dataclass(frozen=True)
class EDMConfig:
    p_mean: float = -1.2
    """Mean of ln σ under the training density."""
    p_std: float = 1.2
    """Standard deviation of ln σ under the training density."""
    sigma_min: float = 0.002
    """Lowest noise level (truncation of the log-normal)."""
    sigma_max: float = 80.0
    """Highest noise level; at σ_max the noisy input carries (almost) no information."""
    sigma_data: float = 0.5
    """Standard deviation of the clean data, used by the preconditioning."""

    def __post_init__(self):
        if not math.isfinite(self.p_mean):
            raise ValueError(f"EDMConfig.p_mean must be finite, got {self.p_mean}.")
        if not (math.isfinite(self.p_std) and self.p_std > 0):
            raise ValueError(f"EDMConfig.p_std must be finite and > 0, got {self.p_std}.")
        if not (0 < self.sigma_min < self.sigma_max < math.inf):
            raise ValueError(
                f"EDMConfig.sigma_min/sigma_max need 0 < sigma_min < sigma_max < inf, "
                f"got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}."
            )
        if not (math.isfinite(self.sigma_data) and self.sigma_data > 0):
            raise ValueError(f"EDMConfig.sigma_data must be finite and > 0, got {self.sigma_data}.")


# ---------------------------------------------------------------------------------------------
# Partition helpers, shared with masking.py: one routing rule, one range lookup.
# ---------------------------------------------------------------------------------------------


def route(value: Tensor, boundaries: Tensor) -> Tensor:
    """Block index of each value, for B+1 ascending ``boundaries`` (block 0 = top segment).

    ``block = B − 1 − #{k ∈ 1..B−1 : boundaries[k] ≤ value}``. So a value on an interior
    boundary goes to the higher segment (lower block index), and values outside
    ``[boundaries[0], boundaries[B]]`` are clamped (above → block 0, below → block B−1).
    Shapes: value [*] → LongTensor [*].
    """
    interior = boundaries[1:-1].to(device=value.device, dtype=value.dtype)
    segment = torch.searchsorted(interior, value.contiguous(), right=True)  # 0 = lowest segment
    return (boundaries.numel() - 2) - segment


def block_range(block: int, boundaries: Tensor) -> tuple[float, float]:
    """(lo, hi) owned by ``block`` given B+1 ascending ``boundaries``: block b ↦ segment B−b−1."""
    num_blocks = boundaries.numel() - 1
    if not 0 <= block < num_blocks:
        raise ValueError(f"block must be in [0, {num_blocks}), got {block}.")
    segment = num_blocks - 1 - block
    return boundaries[segment].item(), boundaries[segment + 1].item()


def _check_num_blocks(num_blocks: int) -> None:
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")


# ---------------------------------------------------------------------------------------------
# q ↔ σ and the equi-probability partition
# ---------------------------------------------------------------------------------------------


def sigma_to_q(sigma: Tensor | float, cfg: EDMConfig) -> Tensor:
    """``q(σ) = Φ((ln σ − P_mean)/P_std)``, computed in float64; returns sigma's float dtype."""
    sigma = torch.as_tensor(sigma)
    out_dtype = sigma.dtype if sigma.is_floating_point() else torch.get_default_dtype()
    q = torch.special.ndtr((sigma.double().log() - cfg.p_mean) / cfg.p_std)
    return q.to(out_dtype)


def q_to_sigma(q: Tensor | float, cfg: EDMConfig) -> Tensor:
    """``σ(q) = exp(P_mean + P_std·Φ⁻¹(q))``, computed in float64; returns q's float dtype.

    Pass float64 q to keep full precision (Φ⁻¹ near q ≈ 1 is ill-conditioned in fp32).
    """
    q = torch.as_tensor(q)
    out_dtype = q.dtype if q.is_floating_point() else torch.get_default_dtype()
    return torch.exp(cfg.p_mean + cfg.p_std * torch.special.ndtri(q.double())).to(out_dtype)


def _sigma_at_mass(frac: Tensor, cfg: EDMConfig) -> Tensor:
    """σ at a fraction ``f`` ∈ [0, 1] of the truncated mass, fp32:
    ``σ(f) = exp(P_mean + P_std·Φ⁻¹(q_min + f·(q_max − q_min)))``, with σ(0) = σ_min and
    σ(1) = σ_max set exactly. Shapes: frac [N] (float64) → [N].
    """
    q_min, q_max = sigma_to_q(torch.tensor([cfg.sigma_min, cfg.sigma_max], dtype=torch.float64), cfg)
    sigma = q_to_sigma(q_min + frac * (q_max - q_min), cfg)
    sigma = torch.where(frac <= 0, cfg.sigma_min, torch.where(frac >= 1, cfg.sigma_max, sigma))
    return sigma.float()


def block_boundaries(num_blocks: int, cfg: EDMConfig) -> Tensor:
    """B+1 ascending fp32 boundaries ``σ_k = exp(P_mean + P_std·Φ⁻¹(q_min + (k/B)(q_max − q_min)))``.

    ``σ_0 = σ_min`` and ``σ_B = σ_max`` exactly; each of the B segments holds 1/B of the mass.
    Defaults, B=4: 0.002, 0.1341, 0.3012, 0.6766, 80.
    """
    _check_num_blocks(num_blocks)
    return _sigma_at_mass(torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks, cfg)


def block_sigma_range(block: int, num_blocks: int, cfg: EDMConfig) -> tuple[float, float]:
    """(lo, hi) = ``[σ_{B−b−1}, σ_{B−b}]`` owned by block b (block 0 owns the highest σ)."""
    _check_num_blocks(num_blocks)
    return block_range(block, block_boundaries(num_blocks, cfg))


def widened_range(lo: float, hi: float, gamma: float, cfg: EDMConfig) -> tuple[float, float]:
    """Overlap-γ training range ``[lo/a, hi·a]`` with ``a = (hi/lo)^γ``, clamped to [σ_min, σ_max]."""
    if gamma < 0:
        raise ValueError(f"gamma (overlap) must be >= 0, got {gamma}.")
    if not 0 < lo <= hi:
        raise ValueError(f"need 0 < lo <= hi, got lo={lo}, hi={hi}.")
    a = (hi / lo) ** gamma
    return max(lo / a, cfg.sigma_min), min(hi * a, cfg.sigma_max)


def sample_sigma(
    block: int,
    num_blocks: int,
    batch_size: int,
    gamma: float,
    cfg: EDMConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One σ per sample for ``block``: fp32 [batch_size], inside the γ-widened range.

    Uniform in q over the widened range ``[lo', hi']`` (= the truncated log-normal restricted to it):
    ``σ = σ(q), q = q(lo') + u·(q(hi') − q(lo')), u ~ U[0, 1)``. With γ = 0 the samples lie in
    ``[lo, hi)`` and route back to ``block``. ``generator`` must live on ``device``.
    """
    lo, hi = widened_range(*block_sigma_range(block, num_blocks, cfg), gamma, cfg)
    q_lo, q_hi = sigma_to_q(torch.tensor([lo, hi], dtype=torch.float64), cfg).tolist()
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)
    sigma = q_to_sigma(q_lo + u * (q_hi - q_lo), cfg)
    return sigma.clamp(lo, hi).float()  # clamp absorbs float64 round-trip error; fp32 cast is monotone


def sigma_to_block(sigma: Tensor | float, num_blocks: int, cfg: EDMConfig) -> Tensor:
    """THE σ → block map (training, eval and sampling all use it). LongTensor of sigma's shape.

    Monotone non-increasing in σ: block 0 owns the highest σ. A σ exactly on an interior boundary
    goes to the upper-σ range (the lower block index), so block b owns ``[σ_{B−b−1}, σ_{B−b})`` and
    block 0 also owns σ_max. σ outside [σ_min, σ_max] is clamped: σ > σ_max → 0, σ < σ_min → B−1.
    σ is compared in fp32 against the fp32 boundaries of :func:`block_boundaries`.
    """
    _check_num_blocks(num_blocks)
    return route(torch.as_tensor(sigma, dtype=torch.float32), block_boundaries(num_blocks, cfg))


Grid = Literal["q", "karras"]
GRIDS: tuple[str, ...] = get_args(Grid)


def inference_sigmas(num_levels: int, cfg: EDMConfig, grid: Grid = "q", rho: float = 7.0) -> Tensor:
    """Sampler grid, fp32 [N], descending from σ_max to σ_min. N = 1 gives [σ_max].

    - ``q`` (METHOD.md §6): uniform in q, ``σ^(j) = exp(P_mean + P_std·Φ⁻¹(linspace(q_max, q_min, N)_j))``;
      with N = B, routing the grid with :func:`sigma_to_block` visits blocks 0, 1, …, B−1 once each.
    - ``karras`` (EDM, Eq. 5): ``σ^(j) = (σ_max^(1/ρ) + j/(N−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ``, denser
      at low σ as ρ grows (ρ = 7: 80, 9.69, 0.467, 0.002 at N = 4).
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}.")
    if grid == "q":
        return _sigma_at_mass(torch.linspace(1.0, 0.0, num_levels, dtype=torch.float64), cfg)
    if grid != "karras":
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}.")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}.")
    hi, lo = cfg.sigma_max ** (1 / rho), cfg.sigma_min ** (1 / rho)
    frac = torch.linspace(0.0, 1.0, num_levels, dtype=torch.float64)
    sigma = (hi + frac * (lo - hi)) ** rho
    sigma[0], sigma[-1] = cfg.sigma_max, (cfg.sigma_min if num_levels > 1 else cfg.sigma_max)
    return sigma.float()


# ---------------------------------------------------------------------------------------------
# Preconditioning and loss weighting (fp32)
# ---------------------------------------------------------------------------------------------


def precondition(sigma: Tensor | float, cfg: EDMConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM coefficients ``(c_skip, c_out, c_in, c_noise)``, fp32, each of sigma's shape:

    ``c_skip = σd²/(σ²+σd²)``, ``c_out = σ·σd/√(σ²+σd²)``, ``c_in = 1/√(σ²+σd²)``,
    ``c_noise = ¼·ln σ``. The denoiser is ``D(z) = c_skip·z + c_out·F(c_in·z, c_noise)``.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sd = cfg.sigma_data
    total = sigma.square() + sd**2  # σ² + σd²
    c_in = total.rsqrt()
    return sd**2 / total, sigma * sd * c_in, c_in, 0.25 * sigma.log()


def loss_weight(sigma: Tensor | float, cfg: EDMConfig) -> Tensor:
    """``w(σ) = (σ²+σd²)/(σ·σd)² = 1/c_out²``, fp32. Default config: w(σ_max) ≈ 4, w(σ_min) ≈ 2.5e5."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return (sigma.square() + cfg.sigma_data**2) / (sigma * cfg.sigma_data).square()


def per_sample_weights(sigma: Tensor, weighting: Weighting, cfg: EDMConfig) -> Tensor:
    """Weights ``v_i`` [batch] (fp32) so that the weighted loss is ``mean_i(v_i·CE_i)``:

    - ``none``:       v_i = 1                    → mean(CE)
    - ``per_sample``: v_i = w(σ_i)               → mean(w(σ_i)·CE_i)       (paper, Eq. 6)
    - ``batch_mean``: v_i = mean_j w(σ_j)        → mean(CE)·mean(w)        (authors' code)

    For a sum with a global normaliser, use ``sum(v_i·CE_i) / N_global``. For ``batch_mean`` the
    mean of w is over this ``sigma`` only (the local batch).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; choose one of {WEIGHTINGS}.")
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if weighting == "none":
        return torch.ones_like(sigma)
    w = loss_weight(sigma, cfg)
    return w if weighting == "per_sample" else w.mean().expand_as(w)


def weighted_loss(ce_per_sample: Tensor, sigma: Tensor, weighting: Weighting, cfg: EDMConfig) -> Tensor:
    """Scalar ``mean_i(v_i·CE_i)`` with ``v`` from :func:`per_sample_weights`. Shapes: [batch] ×2 → []."""
    return (per_sample_weights(sigma, weighting, cfg) * ce_per_sample.float()).mean()
