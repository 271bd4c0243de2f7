"""Masked (absorbing-state) diffusion schedule for the MDLM variant, as pure functions.

Linear schedule ``α(t) = 1 − t``: at time t ∈ (0, 1] each token is kept with probability α(t) and
replaced by [MASK] otherwise. B blocks split t into equal-width ranges (equal mass under t ~ U(0,1)):
**block 0 owns the most-masked (highest t) range**, block b owns ``[1 − (b+1)/B, 1 − b/B]``.
Routing uses the same rule as :func:`dblocks_titan.diffusion.edm.sigma_to_block`: a t on an interior
boundary goes to the higher-t range (lower block index); t outside [0, 1] is clamped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .edm import _check_num_blocks, block_range, route

T_MIN = 1e-5
"""Sampled t are clamped to ≥ T_MIN: the NELBO weight 1/t diverges at t = 0."""


def alpha(t: Tensor) -> Tensor:
    """Keep probability ``α(t) = 1 − t`` (linear schedule)."""
    return 1 - t


def nelbo_weight(t: Tensor) -> Tensor:
    """Continuous-time NELBO weight ``−α'(t)/(1 − α(t)) = 1/t``: loss = E_t[(1/t)·Σ_masked −log p]."""
    return 1 / t


def t_boundaries(num_blocks: int) -> Tensor:
    """B+1 ascending fp32 boundaries ``k/B``, k = 0..B."""
    _check_num_blocks(num_blocks)
    return (torch.arange(num_blocks + 1, dtype=torch.float64) / num_blocks).float()


def block_t_range(block: int, num_blocks: int) -> tuple[float, float]:
    """(lo, hi) = ``[1 − (b+1)/B, 1 − b/B]`` owned by block b (block 0 owns the highest t)."""
    return block_range(block, t_boundaries(num_blocks))


def widened_t_range(lo: float, hi: float, gamma: float) -> tuple[float, float]:
    """Overlap-γ range ``[lo − γ·(hi − lo), hi + γ·(hi − lo)]`` clamped to [0, 1]."""
    if gamma < 0:
        raise ValueError(f"gamma (overlap) must be >= 0, got {gamma}.")
    width = hi - lo
    return max(lo - gamma * width, 0.0), min(hi + gamma * width, 1.0)


def t_to_block(t: Tensor | float, num_blocks: int) -> Tensor:
    """THE t → block map (LongTensor of t's shape); tie → lower block index; t outside [0,1] clamped."""
    return route(torch.as_tensor(t, dtype=torch.float32), t_boundaries(num_blocks))


def sample_t(
    block: int,
    num_blocks: int,
    batch_size: int,
    gamma: float,
    generator: torch.Generator | None = None,
    antithetic: bool = True,
    device: torch.device | str | None = None,
) -> Tensor:
    """One t per sample for ``block``: fp32 [batch_size] in the γ-widened range, clamped to ≥ T_MIN.

    ``t = lo' + u·(hi' − lo')`` with ``u ∈ [0, 1)``. ``antithetic=True`` uses MDLM's low-discrepancy
    draw ``u_i = (i + r_i)/n``, r_i ~ U[0, 1): exactly one sample per stratum [i/n, (i+1)/n), which
    lowers the variance of the batch NELBO (u is ordered by batch position). Otherwise u_i ~ U[0, 1).
    """
    lo, hi = widened_t_range(*block_t_range(block, num_blocks), gamma)
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)
    if antithetic:
        u = (torch.arange(batch_size, dtype=torch.float64, device=device) + u) / batch_size
    return (lo + u * (hi - lo)).clamp(lo, hi).clamp_min(T_MIN).float()  # T_MIN wins over lo'
