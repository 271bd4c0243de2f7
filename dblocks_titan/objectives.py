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
3. loss = the NELBO integrand ``Σ_i (1/t_i)·Σ_{masked j} −log p(x_ij | x_t)`` (logged as is), the
   head and CE run only at the masked positions, in chunks (:func:`masked_nelbo`).
"""

from __future__ import annotations

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
    generator: torch.Generator, edge_share: float = 0.0,
) -> ARCorruption:
    """Draw σ per sample for ``block`` and the Gaussian noise for the targets ``labels`` [B, N].
    Block 0 puts each sample at σ_max, block B − 1 at σ_min, with probability ``edge_share`` (the levels
    the sampler starts and ends at); one block (B = 1) owns both ends: ``edge_share``/2 at each."""
    batch, n = labels.shape
    sigma = sample_sigma(block, num_blocks, batch, gamma, edm, generator=generator, device=labels.device)
    if block in (0, num_blocks - 1) and edge_share > 0:
        u = torch.rand(batch, generator=generator, device=labels.device)
        if num_blocks == 1:
            sigma = torch.where(u < edge_share / 2, edm.sigma_max, torch.where(u < edge_share, edm.sigma_min, sigma))
        else:
            sigma = torch.where(u < edge_share, edm.sigma_max if block == 0 else edm.sigma_min, sigma)
    noise = torch.randn(batch, n, dim, generator=generator, device=labels.device)
    return ARCorruption(sigma=sigma, noise=noise)


class WeightedCrossEntropyLoss(BaseLoss):
    """titan loss of one chunk: ``(Σ_t w_t·CE_t / global_valid_tokens, {"ce_mean": Σ_t CE_t / global_valid_tokens})``
    with per-token weights ``w`` [B, L] (``ignore_index`` tokens contribute 0); ``never_predict``: a
    class whose logit is set to the dtype's minimum (SUBS's [MASK])."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        pass

    def __init__(self, config: Config, *, compile_config=None):
        pass

    def __call__(self, pred, labels, global_valid_tokens=None, *, weights, never_predict=None):
        logits = pred.flatten(0, 1).float()
        if never_predict is not None:
            column = torch.tensor([never_predict], device=logits.device)
            logits = logits.index_fill(-1, column, torch.finfo(logits.dtype).min)
        ce = F.cross_entropy(logits, labels.flatten(), reduction="none", ignore_index=IGNORE_INDEX)
        return (weights.flatten() * ce).sum() / global_valid_tokens, {"ce_mean": ce.detach().sum() / global_valid_tokens}


def chunked_head_loss(
    rows: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, *, global_valid_tokens,
    lm_head: nn.Module | None = None, num_chunks: int = 8, never_predict: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``Σ_r w_r·CE_r / global_valid_tokens``, ``Σ_r CE_r / global_valid_tokens``) of the head on M rows.

    rows [M, D] is the head's input (``lm_head`` given) or the logits [M, V] (``lm_head`` None);
    labels, weights [M]. titan's ``ChunkedLossWrapper`` applies the head and the CE to ``num_chunks``
    equal chunks (rows padded with zero rows of ignored label to a multiple of ``num_chunks``, at
    least one row per chunk), running each chunk's backward at once: the head's gradient is
    accumulated during this call, only one chunk's fp32 log-softmax is alive, and the returned loss
    backpropagates the gathered gradient of ``rows``. ``never_predict`` as in
    :class:`WeightedCrossEntropyLoss`.
    """
    pad = max(1, -(-rows.shape[0] // num_chunks)) * num_chunks - rows.shape[0]
    if pad:
        rows = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])])
        labels = torch.cat([labels, labels.new_full((pad,), IGNORE_INDEX)])
        weights = torch.cat([weights, weights.new_zeros(pad)])
    loss_fn = ChunkedLossWrapper.Config(num_chunks=num_chunks, loss_fn=WeightedCrossEntropyLoss.Config()).build()
    loss_fn.set_lm_head(nn.Identity() if lm_head is None else lm_head)
    loss, metrics = loss_fn(rows[None], labels[None], global_valid_tokens, weights=weights[None],
                            never_predict=never_predict)
    return loss, metrics["ce_mean"]


def ar_loss(
    pred: torch.Tensor, labels: torch.Tensor, sigma: torch.Tensor, *, weighting: Weighting, edm: EDMConfig,
    global_valid_tokens: torch.Tensor, lm_head: nn.Module | None = None, num_chunks: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted loss ``Σ_i v_i·Σ_t CE_it / global_valid_tokens``, unweighted CE ``Σ CE / global_valid_tokens``).

    pred [B, N, D] is the head's input (``lm_head`` given) or the logits [B, N, V] (``lm_head`` None);
    labels [B, N]; sigma [B]; ``v`` = ``per_sample_weights``. Head and CE run in chunks
    (:func:`chunked_head_loss`).
    """
    weights = per_sample_weights(sigma, weighting, edm)[:, None].expand_as(labels)
    return chunked_head_loss(pred.flatten(0, 1), labels.flatten(), weights.flatten(),
                             global_valid_tokens=global_valid_tokens, lm_head=lm_head, num_chunks=num_chunks)


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
    hidden: torch.Tensor, x: torch.Tensor, c: MaskedCorruption, *, lm_head: nn.Module, mask_id: int,
    global_valid_tokens,
) -> torch.Tensor:
    """``Σ_i (1/t_i)·Σ_{masked j} −log p_θ(x_ij | x_t) / global_valid_tokens``: the continuous-time
    NELBO integrand at t (nats per token), from the head's input ``hidden`` [B, N, D]; x [B, N].

    SUBS: an unmasked position carries its token (−log p = 0) and [MASK] is never predicted, so the
    head and the CE run only at the masked positions (:func:`chunked_head_loss` in
    :func:`logit_chunks` chunks, [MASK]'s logit at the minimum): on average half the positions, and
    no [B, N, V] logits are ever built.
    """
    weights = nelbo_weight(c.t)[:, None].expand_as(x)
    rows = hidden[c.masked]
    loss, _ = chunked_head_loss(rows, x[c.masked], weights[c.masked], lm_head=lm_head,
                                global_valid_tokens=global_valid_tokens, never_predict=mask_id,
                                num_chunks=logit_chunks(rows.shape[0], lm_head.out_features))
    return loss


LOGIT_CHUNK_BYTES = 32 * 2**20


def logit_chunks(rows: int, vocab_size: int, num_chunks: int = 8) -> int:
    """Chunks for the head + CE of ``rows`` rows: titan's ``num_chunks``, or one when all the fp32
    logits fit in :data:`LOGIT_CHUNK_BYTES`. Each chunk costs a head call and a backward call, which a
    small vocabulary (text8's 28 symbols) does not repay."""
    return 1 if rows * vocab_size * 4 <= LOGIT_CHUNK_BYTES else num_chunks


class ARObjective:
    def __init__(self, model_config, dblocks):
        self.dim, self.db = model_config.dim, dblocks

    def __call__(self, model, inputs, labels, extra_kwargs, *, block, generator, global_valid_tokens):
        db = self.db
        c = ar_corrupt(labels, block=block, num_blocks=db.num_blocks, gamma=db.gamma, dim=self.dim, edm=db.edm,
                       generator=generator, edge_share=db.edge_share)
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
        hidden = model(c.x_t, **extra_kwargs, t=c.t, block=block, skip_lm_head=True)
        loss = masked_nelbo(hidden, labels, c, lm_head=model.lm_head, mask_id=self.mask_id,
                            global_valid_tokens=global_valid_tokens)
        return loss, loss.detach()


def build_objective(model_config, dblocks):
    """The objective of a model: masked diffusion for models with a [MASK] id, else AR."""
    cls = MaskedDiffusionObjective if hasattr(model_config, "mask_id") else ARObjective
    return cls(model_config, dblocks)
