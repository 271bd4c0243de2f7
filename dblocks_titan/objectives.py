"""The DiffusionBlocks objectives: corrupt a micro-batch for one block, run that block, score it.

Every objective is called as ``objective(model, inputs, labels, extra_kwargs, block=, generator=,
global_valid_tokens=)`` and returns ``(loss to backpropagate, value to log)``, both sums over
tokens divided by ``global_valid_tokens`` so titan's gradient accumulation and data-parallel
normalisation stay exact.

AR (METHOD.md §4, §6), for block b:
1. ``σ_i`` ~ truncated log-normal inside block b's widened range, one per sample;
2. ``ε ~ N(0, I)`` [B, N, dim] (the model builds ``z = y + σ·ε`` from its own embedding table);
3. the head's input at the noisy slots; head + CE in chunks (:func:`ar_loss`); loss
   ``Σ_i Σ_t w_i·CE_it`` with ``w`` from the weighting option (``none`` | ``per_sample`` |
   ``batch_mean``); the unweighted CE is logged.

Masked diffusion (METHOD.md §7), for block b:
1. ``t_i`` uniform (stratified across the batch) inside block b's widened t range;
2. each token replaced by [MASK] with probability ``t_i`` (α(t) = 1 − t);
3. loss = the NELBO integrand ``Σ_i (1/t_i)·Σ_{masked j} −log p(x_ij | x_t)`` (logged as is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.components.loss import BaseLoss, ChunkedLossWrapper, IGNORE_INDEX

from dblocks_titan.diffusion import EDMConfig, nelbo_weight, per_sample_weights, sample_sigma, sample_t, Weighting


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


class WeightedCrossEntropyLoss(BaseLoss):
    """titan loss of one chunk: ``(Σ_t w_t·CE_t / global_valid_tokens, {"ce_mean": Σ_t CE_t / global_valid_tokens})``
    with per-token weights ``w`` [B, L] (``ignore_index`` tokens contribute 0)."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        pass

    def __init__(self, config: Config, *, compile_config=None):
        pass

    def __call__(self, pred, labels, global_valid_tokens=None, *, weights):
        ce = F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return (weights.flatten() * ce).sum() / global_valid_tokens, {"ce_mean": ce.detach().sum() / global_valid_tokens}


def ar_loss(
    pred: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, *, weighting: Weighting, edm: EDMConfig,
    global_valid_tokens: torch.Tensor, lm_head: nn.Module | None = None, num_chunks: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss ``Σ_i v_i·Σ_t CE_it / global_valid_tokens``, unweighted CE ``Σ CE / global_valid_tokens``).

    pred [B, N, D] is the head's input (``lm_head`` given) or the logits [B, N, V] (``lm_head`` None);
    labels [B, N]; sigma [B]; ``v`` = ``per_sample_weights``. titan's ``ChunkedLossWrapper`` applies
    the head and the CE to ``gcd(B·N, num_chunks)`` equal chunks of the B·N positions, running each
    chunk's backward at once (so the head's gradient is accumulated during this call and only one
    chunk's fp32 log-softmax is alive); the returned loss backpropagates the gathered gradient of
    ``pred``.
    """
    weights = per_sample_weights(sigma, weighting, edm)[:, None].expand_as(labels)
    loss_fn = ChunkedLossWrapper.Config(
        num_chunks=math.gcd(labels.numel(), num_chunks), loss_fn=WeightedCrossEntropyLoss.Config()
    ).build()
    loss_fn.set_lm_head(nn.Identity() if lm_head is None else lm_head)
    loss, metrics = loss_fn(pred.flatten(0, 1)[None], labels.reshape(1, -1), global_valid_tokens,
                            weights=weights.reshape(1, -1))
    return loss, metrics["ce_mean"]


@dataclass
class MaskedCorruption:
    x_t: torch.Tensor  # [B, N] with [MASK] where masked
    t: torch.Tensor  # [B] fp32
    masked: torch.Tensor  # [B, N] bool


def absorb(x: torch.Tensor, t: torch.Tensor, *, mask_id: int, generator: torch.Generator) -> MaskedCorruption:
    """x_t: each token of the clean sequence ``x`` [B, N] replaced by [MASK] with probability ``t_i``
    [B] (α(t) = 1 − t)."""
    masked = torch.rand(x.shape, generator=generator, device=x.device) < t[:, None]
    return MaskedCorruption(x_t=torch.where(masked, mask_id, x), t=t, masked=masked)


def masked_corrupt(
    x: torch.Tensor, *, block: int, num_blocks: int, gamma: float, mask_id: int, generator: torch.Generator
) -> MaskedCorruption:
    """Absorbing corruption of the clean sequence ``x`` [B, N] at a t drawn for ``block``."""
    t = sample_t(block, num_blocks, x.shape[0], gamma, generator=generator, antithetic=True, device=x.device)
    return absorb(x, t, mask_id=mask_id, generator=generator)


def masked_nelbo(
    logits: torch.Tensor, x: torch.Tensor, c: MaskedCorruption, *, global_valid_tokens: torch.Tensor
) -> torch.Tensor:
    """``Σ_i (1/t_i)·Σ_{masked j} −log p_θ(x_ij | x_t) / global_valid_tokens``: the continuous-time
    NELBO integrand at t (nats per token). logits [B, N, V] (SUBS); x [B, N]."""
    nll = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)
    nll = torch.where(c.masked, nll, 0.0)  # unmasked positions carry their token: no loss
    return (nelbo_weight(c.t)[:, None] * nll).sum() / global_valid_tokens


class ARObjective:
    def __init__(self, model_config, dblocks):
        self.dim, self.db = model_config.dim, dblocks

    def __call__(self, model, inputs, labels, extra_kwargs, *, block, generator, global_valid_tokens):
        db = self.db
        c = ar_corrupt(labels, block=block, num_blocks=db.num_blocks, gamma=db.gamma, dim=self.dim, edm=db.edm,
                       generator=generator)
        hidden = model(inputs, **extra_kwargs, labels=labels, sigma=c.sigma, noise=c.noise, block=block,
                       skip_lm_head=True)
        return ar_loss(hidden, labels, c.sigma, weighting=db.weighting, edm=db.edm,
                       global_valid_tokens=global_valid_tokens, lm_head=model.lm_head)


class MaskedDiffusionObjective:
    """``labels`` is the clean sequence itself (the masked-diffusion loaders yield labels == input)."""

    def __init__(self, model_config, dblocks):
        self.mask_id, self.db = model_config.mask_id, dblocks

    def __call__(self, model, inputs, labels, extra_kwargs, *, block, generator, global_valid_tokens):
        c = masked_corrupt(labels, block=block, num_blocks=self.db.num_blocks, gamma=self.db.gamma,
                           mask_id=self.mask_id, generator=generator)
        logits = model(c.x_t, **extra_kwargs, t=c.t, block=block)
        loss = masked_nelbo(logits, labels, c, global_valid_tokens=global_valid_tokens)
        return loss, loss.detach()


def build_objective(model_config, dblocks):
    """The objective of a model: masked diffusion for models with a [MASK] id, else AR."""
    cls = MaskedDiffusionObjective if hasattr(model_config, "mask_id") else ARObjective
    return cls(model_config, dblocks)
