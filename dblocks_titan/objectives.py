"""The DiffusionBlocks objectives: corrupt a batch for one block, and score the result.

AR (METHOD.md §4, §6), per micro-batch of block b:
1. ``σ_i`` ~ truncated log-normal inside block b's widened range, one per sample;
2. ``ε ~ N(0, I)`` of shape [B, N, dim] (the model builds ``z = y + σ·ε`` from its own table);
3. the model runs block b and returns logits at the noisy slots;
4. loss ``Σ_i Σ_t w_i·CE_it / global_valid_tokens`` with ``w`` from the weighting option
   (``none`` | ``per_sample`` | ``batch_mean``), so titan's gradient accumulation and
   data-parallel token normalisation stay exact. The unweighted CE is returned for logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from torchtitan.components.loss import IGNORE_INDEX

from dblocks_titan.diffusion import EDMConfig, per_sample_weights, sample_sigma, Weighting


@dataclass
class ARCorruption:
    sigma: torch.Tensor  # [B] fp32
    noise: torch.Tensor  # [B, N, dim]


def ar_corrupt(
    labels: torch.Tensor, *, block: int, num_blocks: int, gamma: float, dim: int, edm: EDMConfig,
    generator: torch.Generator,
) -> ARCorruption:
    """Draw σ per sample for ``block`` and the Gaussian noise for the targets ``labels`` [B, N]."""
    batch, n = labels.shape
    sigma = sample_sigma(block, num_blocks, batch, gamma, edm, generator=generator, device=labels.device)
    noise = torch.randn(batch, n, dim, generator=generator, device=labels.device)
    return ARCorruption(sigma=sigma, noise=noise)


def ar_loss(
    logits: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, *, weighting: Weighting, edm: EDMConfig,
    global_valid_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss to backpropagate, unweighted CE for logging), both summed over tokens and
    divided by ``global_valid_tokens``. logits [B, N, V]; labels [B, N]; sigma [B]."""
    ce = F.cross_entropy(
        logits.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX
    ).view_as(labels)
    weights = per_sample_weights(sigma, weighting, edm)
    loss = (weights[:, None] * ce).sum() / global_valid_tokens
    return loss, ce.detach().sum() / global_valid_tokens
