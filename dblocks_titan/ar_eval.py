"""Evaluation of autoregressive checkpoints beyond the validator's CE (issue 5), used by
:mod:`dblocks_titan.eval`. Every function takes a plain (unsharded, eval-mode) model.

1. CE per σ level of a DiffusionBlocks model (:func:`sigma_ce`): the sampler's grid
   ``inference_sigmas(N)``, each level run by the block that owns it, and CE per block with σ drawn
   inside each block's own range. Only CE at σ_max is comparable with an AR baseline (METHOD.md §6);
   the low-σ levels measure copy-through of a nearly clean target and are easy.
   The sampler CE (:func:`sampler_log_probs`, :func:`mixture_ce`): the likelihood of what the sampler
   draws, teacher-forced, the DB number that compares one-for-one with a baseline's CE (both AR
   DiffusionBlocks models; for ``dblocks_huginn`` the chain's levels are its K core iterations). For
   the ancestral chain, :func:`kept_draw_ce` bounds the CE of its law without counting hits.
   :class:`ARValidator` logs CE at σ_max and (``dblocks_llama``) the sampler CE during training.
2. Continuations of held-out prompts (:func:`heldout_windows`, :func:`generate_continuations`).
3. Their scores under a reference LM (:func:`reference_scores`): summed NLL for the generative
   perplexity and mean-pooled final hidden states as MAUVE features.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.validate import Validator
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger

from dblocks_titan import sampling
from dblocks_titan.data.datasets import dataset_files_key, dataset_texts
from dblocks_titan.diffusion import inference_sigmas, sample_sigma, sigma_to_block
from dblocks_titan.models.block_denoiser import KVCache
from dblocks_titan.models.dblocks_llama import DBlocksLlama
from dblocks_titan.models.huginn import branch_masks, DBlocksHuginn
from dblocks_titan.text_metrics import unigram_log_probs


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
# Sampler CE: the likelihood of what the sampler draws
# --------------------------------------------------------------------------------------------


def teacher_forced_recurrent(model: DBlocksHuginn, tokens, labels, positions, sigmas: list[float],
                             generator: torch.Generator):
    """``denoise(z, j)`` of :func:`~dblocks_titan.sampling.run_chain` for one chain per position of a
    :class:`DBlocksHuginn` at once: the chains' states z [B, N, D] → the logits [B, N, V] that
    :func:`~dblocks_titan.sampling.recurrent_generate` computes at level j (σ_j of ``sigmas``) for
    position i after the true tokens ≤ i.

    1. ``e = prelude(tokens)``, once.
    2. A level's first call: the context rows, row i holding its true next token noised at σ_j,
       ``y_i + σ_j·ε_i`` (ε fresh per level from ``generator``, as the sampler draws one per row and
       level), run causally through the core and coda; their keys/values are kept for the level (one
       level at a time: Heun's second call at a level reuses them).
    3. Chain row i (state z_i) attends to the context rows j < i and itself
       (:func:`~dblocks_titan.models.huginn.branch_masks`): row i of ``model.denoise`` on
       (context rows < i, z_i), every i in one pass (:meth:`DBlocksHuginn.denoise_cached`).
    """
    batch, n = tokens.shape
    positions = model.default_positions(tokens, positions)
    e = model.prelude(tokens, positions, model.default_masks(positions))
    y = model.target(labels)
    context_mask, chain_mask = branch_masks(positions, documents=model.flex)
    kept: dict[int, tuple[list[KVCache], list[KVCache]]] = {}

    def denoise(z, j):
        sigma = torch.full((batch,), sigmas[j], device=tokens.device)
        if j not in kept:
            kept.clear()
            kept[j] = [KVCache() for _ in model.core_layers()], [KVCache() for _ in model.coda_layers()]
            z_context = y + sigmas[j] * torch.randn(y.shape, generator=generator, device=y.device)
            model.denoise_cached(e, z_context, sigma, core=kept[j][0], coda=kept[j][1], keep=n, positions=positions,
                                 mask=context_mask, skip_lm_head=True)
        core, coda = kept[j]
        return model.denoise_cached(e, z, sigma, core=core, coda=coda, keep=0, positions=positions, mask=chain_mask)

    return denoise


def label_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` [B, N] (fp32) of logits [B, N, V]; ignored labels read token 0."""
    return logits.float().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]


def level_denoiser(model: DBlocksLlama, tokens, positions, sigmas: list[float], blocks: list[int]):
    """``denoise(z, j)``: the logits of level j (σ_j, by block ``blocks[j]``) for the noisy slots z [B, N, D]
    over the true clean prefix; through the model's forward, so an FSDP-wrapped model gathers its shared
    modules."""
    batch, device = tokens.shape[0], tokens.device

    def denoise(z, j):
        return model(tokens, positions, z=z, sigma=torch.full((batch,), sigmas[j], device=device), block=blocks[j])

    return denoise


@torch.no_grad()
def sampler_log_probs(
    model: DBlocksLlama | DBlocksHuginn, tokens, labels, positions, *, samples: int, generator: torch.Generator,
    chain: sampling.Chain = sampling.Chain(), every_level: bool = False,
) -> torch.Tensor:
    """``log p_s(label)`` [S, B, N] (fp32) of S independent sampler chains, teacher-forced
    (``every_level``: [N_levels, S, B, N], the softmax of every level's logits, the last one last).

    Every position runs the full chain at once, from ``z ~ N(0, (1 + σ_max²)I)`` [B, N, D],
    :func:`~dblocks_titan.sampling.run_chain` over the chain's levels; p_s is the softmax of the last
    level's logits — the distribution the sampler draws the token from at temperature 1. A
    :class:`DBlocksLlama` level is one block pass over the ``[clean | noisy]`` layout (noisy slot i sees
    only the true clean prefix ≤ i and itself), plain or FSDP-wrapped (every rank calls it then); a
    :class:`DBlocksHuginn` level is one core iteration (its K ``sampler_levels`` by default) with the
    context rows noised afresh for each chain (:func:`teacher_forced_recurrent`), plain models only
    (its cached layers run outside FSDP's hooks).
    """
    table = sampling.target_table(model)
    sigmas, blocks = chain.levels(model)
    device = tokens.device
    block_denoise = level_denoiser(model, tokens, positions, sigmas, blocks)
    out = []
    for _ in range(samples):
        z = sampling.initial_noise((*tokens.shape, model.config.dim), model.edm.sigma_max, generator, device)
        denoise = (teacher_forced_recurrent(model, tokens, labels, positions, sigmas, generator)
                   if isinstance(model, DBlocksHuginn) else block_denoise)
        levels = []
        logits = sampling.run_chain(denoise, z, sigmas, table=table, chain=chain, generator=generator,
                                    observe=(lambda j, lg: levels.append(label_log_probs(lg, labels))) if every_level else None)
        out.append(torch.stack(levels) if every_level else label_log_probs(logits, labels))
    return torch.stack(out, dim=1 if every_level else 0)


def mixture_ce(log_probs: torch.Tensor, valid: torch.Tensor, samples: int) -> torch.Tensor:
    """``Σ_tokens −log((1/S)·Σ_{s<S} p_s(x))`` (fp64) of the first S = ``samples`` chains of
    ``log_probs`` [S', B, N]; ``valid`` [B, N] masks ignored labels. An upper bound of the sampler's CE
    in expectation, tightening as S grows (Jensen)."""
    mixed = torch.logsumexp(log_probs[:samples].double(), dim=0) - math.log(samples)
    return -(mixed * valid).sum()


def _batch_tensors(batch, device):
    input_dict, labels = batch
    return input_dict["input"].to(device), input_dict["positions"].to(device), labels.to(device)


def _spread(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "each": values}


@torch.no_grad()
def sigma_max_ce(model: DBlocksLlama, batches: list, *, draws: int, seed: int) -> dict:
    """CE at σ_max (block 0, pure noise z = σ_max·ε, no label information) over ``batches``, for
    ``draws`` independent ε (a fresh ε per batch within a draw): ``{"mean", "std", "each"}`` over the draws."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    values = []
    for _ in range(draws):
        total, count = 0.0, 0
        for batch in batches:
            tokens, positions, labels = _batch_tensors(batch, device)
            noise = torch.randn(*tokens.shape, model.config.dim, generator=generator, device=device)
            logits = model(tokens, positions, noise=noise)
            total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
        values.append(total / count)
    return _spread(values)


@torch.no_grad()
def baseline_ce(model, batches: list) -> float:
    """Next-token CE of a titan llama3 model (the e2e twin) over ``batches``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batches:
        tokens, _, labels = _batch_tensors(batch, device)
        logits = sampling.baseline_logits(model, tokens)
        total += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


SURE = math.log(0.5)
"""A chain *ends on* token x when its final distribution gives x more than half the mass."""


@torch.no_grad()
def sampler_ce(model: DBlocksLlama | DBlocksHuginn, batches: list, *, samples=(1, 4, 16), seeds=(0, 1),
               chain: sampling.Chain = sampling.Chain()) -> dict:
    """Sampler CE over ``batches`` for each S of ``samples`` (nested: CE_S uses the first S of
    max(samples) chains), once per seed: ``{"S=k": {"mean", "std", "each"}}`` over the seeds, and
    ``"chain_ce"``: the spread of single-chain CE over all max(samples)·len(seeds) chains.

    What bounds CE_S when each chain ends sure of one token (over all seeds): ``"hit_rate"`` {S=k: the
    share of positions where at least one of k chains ends on the true token (p_s(x) > ½)},
    ``"end_on_truth"``: the share of chains that do, and of the chains that do not (the floor under
    −log mean_s p_s(x) when no chain hits, see :func:`sharp_end_ce`) ``"miss_mass"``, the mean p_s(x),
    and ``"miss_log_mass"``, the mean log p_s(x)."""
    device = next(model.parameters()).device
    top = max(samples)
    per_seed = {k: [] for k in samples}
    single = []
    hits = torch.zeros(len(samples), dtype=torch.float64)
    ends = misses = miss_mass = miss_log_mass = positions_seen = 0.0
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(seed)
        sums = torch.zeros(len(samples), dtype=torch.float64)
        chains = torch.zeros(top, dtype=torch.float64)
        count = 0
        for batch in batches:
            tokens, positions, labels = _batch_tensors(batch, device)
            valid = labels != IGNORE_INDEX
            log_probs = sampler_log_probs(model, tokens, labels, positions, samples=top, generator=generator,
                                          chain=chain).double()
            on_truth = (log_probs > SURE) & valid
            for i, k in enumerate(samples):
                sums[i] += mixture_ce(log_probs, valid, k).cpu()
                hits[i] += float(on_truth[:k].any(0).sum())
            missed = ~on_truth & valid
            ends += float(on_truth.sum())
            misses += float(missed.sum())
            miss_mass += float((log_probs.exp() * missed).sum())
            miss_log_mass += float((log_probs * missed).sum())
            chains += -(log_probs * valid).sum((1, 2)).cpu()
            count += int(valid.sum())
        for i, k in enumerate(samples):
            per_seed[k].append(float(sums[i]) / count)
        single += (chains / count).tolist()
        positions_seen += count
    return {**{f"S={k}": _spread(v) for k, v in per_seed.items()}, "chain_ce": _spread(single),
            "hit_rate": {f"S={k}": float(hits[i]) / positions_seen for i, k in enumerate(samples)},
            "end_on_truth": ends / (positions_seen * top), "miss_mass": miss_mass / max(misses, 1.0),
            "miss_log_mass": miss_log_mass / max(misses, 1.0)}


ANCESTRAL = sampling.Chain(bridge="sample", solver="ancestral")


def draws_tokens(chain: sampling.Chain) -> bool:
    """Whether the chain draws a token at every level from the level's own distribution and restarts the
    next level from it alone (bridge ``sample`` at temperature 1, solver ``ancestral``): the chains
    :func:`kept_draw_ce` bounds."""
    return (chain.bridge, chain.solver, chain.bridge_temperature) == ("sample", "ancestral", 1.0)


@torch.no_grad()
def kept_draw_ce(model: DBlocksLlama, batches: list, *, samples: int = 16, seeds=(0, 1),
                 chain: sampling.Chain = ANCESTRAL) -> list[dict]:
    """An upper bound on the CE of the ancestral chain's law that counts no hits, for every level k < N − 1.

    The ancestral chain (bridge ``sample``, solver ``ancestral``, temperature 1) draws x_{j+1} ~ p_j(·|z_j) at
    level j and restarts level j + 1 from z_{j+1} = ê_{x_{j+1}} + σ_{j+1}·ε (ε fresh); the token is drawn
    from the last level's p_{N−1}. Its law is q(x) = E[p_{N−1}(x)], and what follows the draw at level k
    depends on that draw alone, so for every k

        q(x) = E[Σ_y p_k(y|z_k)·R_{k+1}(x|y)] ≥ E[p_k(x|z_k)] · R_{k+1}(x|x),

    R_{k+1}(x|y) = E[p_{N−1}(x) | x_{k+1} = y]: the chain restarted at level k + 1 from the token y. Both
    factors are estimated by means over S independent chains (S run as usual to level k; S restarted from
    the true token at level k + 1), so the product is unbiased for the right-hand side and
    ``bound`` = −log of it is, in expectation, an upper bound on −log q(x) (Jensen) — the sampler's
    likelihood of the truth through the paths whose level-k draw is the truth. It is tight when the levels
    below k keep what level k drew (R ≈ 1) and level k's p_k is still uncertain; k = N − 1 would be CE_S
    itself, the hit count. Per k, the spread over ``seeds``: ``{"level", "sigma", "block", "next_sigma",
    "through"`` (−log of the first factor, = CE_S of level k), ``"kept"`` (−log R), ``"bound"}``."""
    if isinstance(model, DBlocksHuginn) or not draws_tokens(chain):
        raise ValueError("kept_draw_ce needs an AR DiffusionBlocks model and the ancestral chain (bridge sample, "
                         f"solver ancestral, temperature 1), got {type(model).__name__} with {chain}.")
    device = next(model.parameters()).device
    table = sampling.target_table(model)
    sigmas, blocks = chain.levels(model)
    last = len(sigmas) - 1
    per_seed = []
    for seed in seeds:
        generator = torch.Generator(device=device).manual_seed(seed)
        sums = torch.zeros(last, 2, dtype=torch.float64)
        count = 0
        for batch in batches:
            tokens, positions, labels = _batch_tensors(batch, device)
            valid = labels != IGNORE_INDEX
            levels = sampler_log_probs(model, tokens, labels, positions, samples=samples, generator=generator,
                                       chain=chain, every_level=True)
            denoise, truth = level_denoiser(model, tokens, positions, sigmas, blocks), table[labels.clamp_min(0)]
            for k in range(last):
                restarted = []
                for _ in range(samples):
                    z = truth + sigmas[k + 1] * torch.randn(truth.shape, generator=generator, device=device)
                    logits = sampling.run_chain(lambda z, j: denoise(z, k + 1 + j), z, sigmas[k + 1:], table=table,
                                                chain=chain, generator=generator)
                    restarted.append(label_log_probs(logits, labels))
                sums[k, 0] += mixture_ce(levels[k].double(), valid, samples).cpu()
                sums[k, 1] += mixture_ce(torch.stack(restarted).double(), valid, samples).cpu()
            count += int(valid.sum())
        per_seed.append((sums / count).tolist())
    return [{"level": k, "sigma": sigmas[k], "block": blocks[k], "next_sigma": sigmas[k + 1],
             "through": _spread([s[k][0] for s in per_seed]), "kept": _spread([s[k][1] for s in per_seed]),
             "bound": _spread([s[k][0] + s[k][1] for s in per_seed])} for k in range(last)]


def sharp_end_ce(log_q: torch.Tensor, valid: torch.Tensor, samples: int, miss_mass: float) -> torch.Tensor:
    """``Σ_tokens E_k[−log(k/S + (1 − k/S)·f)]``, k ~ Binomial(S, q(x)) (fp64): the expected CE_S of a
    sampler whose draws follow q *exactly* and whose every chain ends sure of its draw — p_s(x) = 1 when
    chain s drew x, else the floor f = ``miss_mass``. ``log_q`` [B, N]: log q(label) of a reference LM,
    ``valid`` [B, N]. With q a baseline's next-token distribution it is the CE_S that baseline's own
    distribution would score through a DiffusionBlocks chain as sharp at its end: the part of CE_S
    that is the estimator's (S finite, ends sharp), not the model's. Hit rate: 1 − (1 − q)^S."""
    log_q = log_q.double().clamp(max=0.0)
    log_1mq = torch.log1p(-log_q.exp().clamp(max=1 - 1e-12))
    k = torch.arange(samples + 1, dtype=torch.float64, device=log_q.device)
    log_pmf = (math.lgamma(samples + 1) - torch.lgamma(k + 1) - torch.lgamma(samples - k + 1)
               + k * log_q[..., None] + (samples - k) * log_1mq[..., None])
    nll = -torch.log(k / samples + (1 - k / samples) * miss_mass)
    return ((log_pmf.exp() * nll).sum(-1) * valid).sum()


@torch.no_grad()
def sharp_end_reference(reference, batches: list, *, samples, miss_mass: float, miss_log_mass: float) -> dict:
    """The hit rate 1 − (1 − q)^S and :func:`sharp_end_ce` of a titan ``llama3`` ``reference`` on
    ``batches``, for each S of ``samples``: ``{"S=k": {"hit_rate", "ce_low", "ce_high"}}``. The misses of a
    real chain have floors f_j of their own; −log((1/S)·Σ_j f_j) lies between −log of their mean
    (``miss_mass``: ``ce_low``) and their mean −log (``miss_log_mass``: ``ce_high``), so the CE_S of a
    sampler drawing exactly from q with the chain's floors lies between the two (up to the hits' own p < 1)."""
    device = next(reference.parameters()).device
    sums = torch.zeros(len(samples), 3, dtype=torch.float64)
    count = 0
    for batch in batches:
        tokens, _, labels = _batch_tensors(batch, device)
        valid = labels != IGNORE_INDEX
        log_q = label_log_probs(sampling.baseline_logits(reference, tokens), labels)
        q = log_q.double().exp()
        for i, k in enumerate(samples):
            sums[i, 0] += float(((1 - (1 - q) ** k) * valid).sum())
            sums[i, 1] += sharp_end_ce(log_q, valid, k, miss_mass).cpu()
            sums[i, 2] += sharp_end_ce(log_q, valid, k, math.exp(miss_log_mass)).cpu()
        count += int(valid.sum())
    return {f"S={k}": dict(zip(("hit_rate", "ce_low", "ce_high"), (sums[i] / count).tolist()))
            for i, k in enumerate(samples)}


@torch.no_grad()
def sampler_ce_per_level(model: DBlocksLlama | DBlocksHuginn, batches: list, *, samples=(1, 4, 16), seed: int = 0,
                         chain: sampling.Chain = sampling.Chain()) -> list[dict]:
    """CE_S of each level's distribution along the chain (one seed): ``[{"sigma", "block", "S=k": CE}]``,
    σ_max first. Where the chain's distribution stops carrying the uncertainty shows as CE_S that
    falls steeply with S (each chain ends sure of one token)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sigmas, blocks = chain.levels(model)
    sums = torch.zeros(len(sigmas), len(samples), dtype=torch.float64)
    count = 0
    for batch in batches:
        tokens, positions, labels = _batch_tensors(batch, device)
        valid = labels != IGNORE_INDEX
        log_probs = sampler_log_probs(model, tokens, labels, positions, samples=max(samples), generator=generator,
                                      chain=chain, every_level=True)
        for j in range(len(sigmas)):
            for i, k in enumerate(samples):
                sums[j, i] += mixture_ce(log_probs[j], valid, k).cpu()
        count += int(valid.sum())
    return [{"sigma": sigmas[j], "block": blocks[j], **{f"S={k}": float(sums[j, i]) / count for i, k in enumerate(samples)}}
            for j in range(len(sigmas))]


@torch.no_grad()
def block_sigma_ce(model: DBlocksLlama, batches: list, *, sigmas: list[float], seed: int) -> list[list[float]]:
    """CE [B][len(sigmas)] of every block at every σ (all samples at that σ, z = y + σ·ε, the same ε
    per batch for every block and σ): where each block is good, also outside its own range."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(model.num_blocks, len(sigmas), dtype=torch.float64)
    count = 0
    for batch in batches:
        tokens, positions, labels = _batch_tensors(batch, device)
        noise = torch.randn(*tokens.shape, model.config.dim, generator=generator, device=device)
        for b in range(model.num_blocks):
            for j, s in enumerate(sigmas):
                sigma = torch.full((tokens.shape[0],), s, device=device)
                sums[b, j] += _ce_sum(model, tokens, labels, positions, sigma=sigma, noise=noise, block=b).cpu()
        count += int((labels != IGNORE_INDEX).sum())
    return (sums / count).tolist()


def unigram_model(dataset: str, path: str | None, tokenizer, max_tokens: int) -> torch.Tensor:
    """log p [V] of the add-one unigram model (:func:`unigram_log_probs`) of the first ``max_tokens``
    labels of ``dataset`` (a registered training split), encoded as titan's loaders encode it.

    Tokenising a corpus takes a while (a minute for the embedded 6M characters on 2 cores), so the
    model is cached in ``$DBLOCKS_CACHE`` (default ``~/.cache/dblocks_titan``), keyed by the data files
    (path, size/mtime), the tokenizer (vocabulary size and the ids of a probe text) and ``max_tokens``."""
    texts = dataset_texts(dataset, path)
    first = next(texts, "")
    key = json.dumps([dataset, dataset_files_key(dataset, path), tokenizer.get_vocab_size(),
                      tokenizer.encode(first[:20_000]), max_tokens])
    cache = Path(os.environ.get("DBLOCKS_CACHE", Path.home() / ".cache/dblocks_titan"))
    file = cache / f"unigram-{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"
    if file.is_file():
        return torch.load(file)
    documents, have = [], 0
    for text in itertools.chain([first], texts):
        documents.append(tokenizer.encode(text, add_bos=True, add_eos=True))
        have += len(documents[-1]) - 1
        if have >= max_tokens:
            break
    log_probs = unigram_log_probs(documents, tokenizer.get_vocab_size())
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    torch.save(log_probs, tmp)
    os.replace(tmp, file)  # atomic: concurrent runs never read half a file
    return log_probs


def unigram_ce(log_probs: torch.Tensor, batches: list) -> float:
    """CE of the unigram model ``log_probs`` [V] on the labels of ``batches``."""
    total, count = 0.0, 0
    for _, labels in batches:
        valid = labels != IGNORE_INDEX
        total -= float(log_probs[labels.clamp_min(0)][valid].sum())
        count += int(valid.sum())
    return total / count


# --------------------------------------------------------------------------------------------
# Validation during training
# --------------------------------------------------------------------------------------------


class ARValidator(Validator):
    """titan Validator for the AR pair, on the first ``steps`` held-out batches (the same ones at every
    validation). Logged (``validation_metrics/*``) and printed beside each other:

    - ``loss``: for a DiffusionBlocks model the CE at σ_max — block 0 predicting the next token from
      pure noise z = σ_max·ε, with a fresh ε per batch from a generator seeded by ``seed`` (+ the data
      rank) at every validation, so validations are comparable and no batch reuses another's draw; for
      titan's baseline its plain next-token CE (titan's own computation);
    - ``sampler_ce``: ``dblocks_llama`` only, ``sampler_samples`` = S > 0: CE_S of the default sampler
      (:func:`sampler_log_probs`, :func:`mixture_ce`; N = B levels, q grid, soft bridge, Euler).
      ``dblocks_huginn``'s chains run its cached layers, which FSDP's hooks do not gather: the eval
      command reports its sampler CE;
    - ``unigram_ce``: an add-one unigram model of the training split (``unigram_dataset``, default the
      validation dataset's name without ``_validation``; its first ``unigram_tokens`` labels) scored on
      the same batches: the trivial baseline every CE stands beside.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Validator.Config):
        seed: int = 1234
        """Seed of the noise (CE at σ_max, sampler chains)."""
        sampler_samples: int = 4
        """S chains per position for the sampler CE (0: off)."""
        unigram_tokens: int = 5_000_000
        """Training-split labels counted for the unigram CE (0: no unigram CE)."""
        unigram_dataset: str = ""
        """Training split of the unigram model ("": the validation dataset's name without _validation, at the
        validator's path; for ``text_validation``, a held-out corpus with no training split of its own, the
        run's training dataset, filled in by :func:`dblocks_titan.inputs.check_inputs`)."""
        unigram_dataset_path: str = ""
        """Path of ``unigram_dataset`` ("": that dataset's default path)."""

    def __init__(self, config: Config, **kwargs):
        super().__init__(config, **kwargs)
        self._unigram: torch.Tensor | None = None

    def unigram_source(self) -> tuple[str, str | None]:
        """(training split, its path or None for the default) the unigram model counts."""
        cfg, loader = self.config, self.config.dataloader
        if cfg.unigram_dataset:
            return cfg.unigram_dataset, cfg.unigram_dataset_path or None
        return loader.dataset.removesuffix("_validation"), loader.dataset_path or None

    def unigram(self) -> torch.Tensor | None:
        """log p [V] of the unigram model (built once), or None when ``unigram_tokens`` is 0."""
        cfg = self.config
        if cfg.unigram_tokens and self._unigram is None:
            self._unigram = unigram_model(*self.unigram_source(), self.tokenizer, cfg.unigram_tokens)
        return self._unigram

    @torch.no_grad()
    def validate(self, model_parts, step: int) -> None:
        model = model_parts[0]
        dblocks = isinstance(model, DBlocksLlama)
        if not dblocks:  # titan's baseline: titan's own CE, then the unigram line
            super().validate(model_parts, step)
        model.eval()
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.config.seed + self.dp_rank)
        loader = self.dl_config.build(dp_world_size=self.dp_world_size, dp_rank=self.dp_rank,
                                      tokenizer=self.tokenizer, seq_len=self.seq_len,
                                      local_batch_size=self.local_batch_size)
        unigram = self.unigram()
        samples = self.config.sampler_samples if dblocks else 0
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # CE at σ_max, sampler CE, unigram CE, tokens
        with self.validation_context():
            for i, (input_dict, labels) in enumerate(loader):
                if i == self.config.steps:
                    break
                tokens, positions, labels = input_dict["input"].to(device), input_dict["positions"].to(device), labels.to(device)
                valid = labels != IGNORE_INDEX
                if dblocks:
                    noise = torch.randn(*tokens.shape, model.config.dim, generator=generator, device=device)
                    logits = model(tokens, positions, noise=noise)
                    sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                                               ignore_index=IGNORE_INDEX, reduction="sum").double()
                if samples:
                    log_probs = sampler_log_probs(model, tokens, labels, positions, samples=samples, generator=generator)
                    sums[1] += mixture_ce(log_probs, valid, samples)
                if unigram is not None:
                    sums[2] += -unigram.to(device)[labels.clamp_min(0)][valid].sum()
                sums[3] += valid.sum()
        if self.parallel_dims.dp_enabled:
            sums = dist_utils.dist_sum_tensor(sums, self.parallel_dims.get_mesh("batch"))
        ce, sampler_ce, unigram_ce = (sums[:3] / sums[3]).tolist()
        extra = {}
        if unigram is not None:
            extra["validation_metrics/unigram_ce"] = unigram_ce
        if samples:
            extra["validation_metrics/sampler_ce"] = sampler_ce
        if dblocks:
            extra["validation_metrics/ce_sigma_max"] = ce
            self.metrics_processor.log_validation(loss=ce, step=step, extra_metrics=extra)
        elif extra:
            self.metrics_processor.logger.log(extra, step)
        words = [f"CE at σ_max {ce:.4f}" if dblocks else "CE: the loss above"]
        if samples:
            words.append(f"sampler CE (S={samples}) {sampler_ce:.4f}")
        if unigram is not None:
            words.append(f"unigram CE {unigram_ce:.4f}")
        logger.info(f"validate step: {step:2}  " + "  ".join(words) + f"  ({int(sums[3])} held-out tokens)")
        model.train()


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
