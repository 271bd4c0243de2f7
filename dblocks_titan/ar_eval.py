"""Evaluation of autoregressive checkpoints beyond the validator's CE (issue 5), used by
:mod:`dblocks_titan.eval`. Every function takes a plain (unsharded, eval-mode) model.

1. CE per σ level of a DiffusionBlocks model (:func:`sigma_ce`): the sampler's grid
   ``inference_sigmas(N)``, each level run by the block that owns it, and CE per block with σ drawn
   inside each block's own range. Only CE at σ_max is comparable with an AR baseline (METHOD.md §6);
   the low-σ levels measure copy-through of a nearly clean target and are easy.
2. Continuations of held-out prompts (:func:`heldout_windows`, :func:`generate_continuations`).
3. Their scores under a reference LM (:func:`reference_scores`): summed NLL for the generative
   perplexity and mean-pooled final hidden states as MAUVE features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from torchtitan.components.loss import IGNORE_INDEX

from dblocks_titan import sampling
from dblocks_titan.diffusion import inference_sigmas, sample_sigma, sigma_to_block


# --------------------------------------------------------------------------------------------
# CE per σ level and per block (DiffusionBlocks AR models)
# --------------------------------------------------------------------------------------------


def _ce_sum(model, tokens, labels, positions, *, sigma, noise, block: int) -> torch.Tensor:
    """Σ over the valid targets of −ln p(label) when ``block`` denoises z = y + σ·ε at σ [B]."""
    logits = model(tokens, positions, labels=labels, sigma=sigma, noise=noise, block=block)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def ce_per_level(model, tokens, labels, positions, *, sigmas: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Summed CE (nats) at each noise level → [len(sigmas)] fp64.

    Level j: every sample at σ = ``sigmas[j]``, run by ``sigma_to_block(σ_j)``, with the same noise
    ε [B, N, dim] at every level (z = y + σ_j·ε), so levels differ only by σ. tokens, labels,
    positions [B, N].
    """
    batch = tokens.shape[0]
    blocks = sigma_to_block(sigmas, model.num_blocks, model.edm).tolist()
    return torch.stack([
        _ce_sum(model, tokens, labels, positions, sigma=torch.full((batch,), float(s), device=tokens.device),
                noise=noise, block=b)
        for s, b in zip(sigmas.tolist(), blocks)
    ]).double()


@torch.no_grad()
def ce_per_block(model, tokens, labels, positions, *, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Summed CE (nats) of each block on its own noise range → [B] fp64.

    Block b: one σ per sample drawn uniformly in q inside b's range without overlap (``sample_sigma``
    with γ = 0: the training density restricted to the block), run by b; noise ε [B, N, dim].
    """
    batch = tokens.shape[0]
    return torch.stack([
        _ce_sum(model, tokens, labels, positions, noise=noise, block=b,
                sigma=sample_sigma(b, model.num_blocks, batch, 0.0, model.edm, generator=generator,
                                   device=tokens.device))
        for b in range(model.num_blocks)
    ]).double()


def sigma_ce(model, batches, *, num_levels: int, seed: int) -> dict:
    """Mean CE per token over held-out ``batches`` ((input_dict, labels) pairs of titan's loaders):

    - ``ce_per_level`` [N] at ``sigma_levels`` = ``inference_sigmas(N)`` (σ_max first), run by
      ``level_blocks``;
    - ``ce_per_block`` [B]: see :func:`ce_per_block`.

    One generator seeded with ``seed`` draws ε per batch (shared by all levels and blocks) and the
    blocks' σ: the numbers are reproducible and comparable across checkpoints.
    """
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sigmas = inference_sigmas(num_levels, model.edm)
    levels = torch.zeros(num_levels, dtype=torch.float64, device=device)
    blocks = torch.zeros(model.num_blocks, dtype=torch.float64, device=device)
    count = 0
    for input_dict, labels in tqdm(batches, desc="CE per σ level"):
        tokens, positions = input_dict["input"].to(device), input_dict["positions"].to(device)
        labels = labels.to(device)
        noise = torch.randn(*tokens.shape, model.config.dim, generator=generator, device=device)
        levels += ce_per_level(model, tokens, labels, positions, sigmas=sigmas, noise=noise)
        blocks += ce_per_block(model, tokens, labels, positions, noise=noise, generator=generator)
        count += int((labels != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("the held-out split gave no tokens to evaluate")
    return {
        "sigma_levels": sigmas.tolist(),
        "level_blocks": sigma_to_block(sigmas, model.num_blocks, model.edm).tolist(),
        "ce_per_level": (levels / count).tolist(),
        "ce_per_block": (blocks / count).tolist(),
    }


# --------------------------------------------------------------------------------------------
# Prompts and continuations
# --------------------------------------------------------------------------------------------


def heldout_windows(batches, *, num: int, length: int) -> torch.Tensor:
    """The first ``num`` consecutive windows of ``length`` tokens of the held-out token stream →
    [num, length]; fewer when the stream is shorter (the caller checks).

    titan's text loaders cut the stream into consecutive pieces of seq_len + 1 tokens and yield
    ``(input, labels) = (piece[:-1], piece[1:])``, so ``cat(input, labels[-1:])`` row by row restores
    the stream. Windows may span document boundaries, as the rows do.
    """
    pieces, have = [], 0
    for input_dict, labels in batches:
        rows = torch.cat([input_dict["input"], labels[:, -1:]], dim=1)
        pieces.append(rows.flatten())
        have += rows.numel()
        if have >= num * length:
            break
    stream = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    usable = min(num, stream.numel() // length) * length
    return stream[:usable].view(-1, length)


@torch.no_grad()
def generate_continuations(
    model, prompts: torch.Tensor, *, continuations: int, new_tokens: int, batch_size: int,
    generator: torch.Generator, **sampler_kwargs,
) -> torch.Tensor:
    """``continuations`` samples of ``new_tokens`` tokens per prompt [n, P] → [n·continuations, T]
    (the continuations of prompt i are rows i·C … i·C + C − 1), from
    :func:`dblocks_titan.sampling.generate` in batches of ``batch_size`` rows."""
    rows = prompts.repeat_interleave(continuations, dim=0)
    out = [
        sampling.generate(model, chunk, max_new_tokens=new_tokens, generator=generator, **sampler_kwargs)[:, chunk.shape[1]:]
        for chunk in tqdm(rows.split(batch_size), desc="generate")
    ]
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# Scores under a reference LM
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceScores:
    nll_sum: float  # Σ −ln p_ref (nats) over the scored continuation tokens
    num_tokens: int
    features: torch.Tensor  # [n, D] fp32: mean-pooled final hidden states (MAUVE features)


def _logits_and_final_hidden(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, L, V], output of the final norm [B, L, D]) of titan's Llama3Model on tokens [B, L]
    (one document per row); the hidden states are caught by a hook on ``model.norm``."""
    hidden = []
    handle = model.norm.register_forward_hook(lambda module, args, out: hidden.append(out))
    try:
        logits = sampling.baseline_logits(model, tokens)
    finally:
        handle.remove()
    return logits, hidden[0]


@torch.no_grad()
def reference_scores(
    reference, prompts: torch.Tensor, continuations: torch.Tensor, *, batch_size: int
) -> ReferenceScores:
    """Score continuations [n, T] of prompts [n, P] (row i continues prompt row i) with the
    reference LM run on ``[prompt | continuation]``:

    - NLL: ``Σ_i Σ_t −ln p_ref(c_it | prompt_i, c_i,<t)`` (logits at positions P−1 … P+T−2);
    - features: the final hidden state (after the final norm) averaged over the T continuation
      positions, so P and Q share the prompt's context but differ in the continuation.
    """
    device = next(reference.parameters()).device
    p = prompts.shape[1]
    nll, features = 0.0, []
    batches = zip(prompts.split(batch_size), continuations.split(batch_size))
    for prompt, cont in tqdm(batches, desc="reference scores", total=-(-len(prompts) // batch_size)):
        seq = torch.cat([prompt, cont], dim=1).to(device)
        logits, hidden = _logits_and_final_hidden(reference, seq)
        predicted = logits[:, p - 1 : -1].flatten(0, 1).float()  # position t predicts token t + 1
        nll += F.cross_entropy(predicted, seq[:, p:].flatten(), reduction="sum").item()
        features.append(hidden[:, p:].float().mean(1).cpu())
    return ReferenceScores(nll_sum=nll, num_tokens=continuations.numel(), features=torch.cat(features))
