"""Samplers that chain the blocks: the AR DiffusionBlocks sampler (METHOD.md §6), the recurrent-depth
DiffusionBlocks sampler (§8), next-token sampling of the end-to-end baselines, and ancestral unmasking
for masked diffusion (§7)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from torchtitan.models.common import ScaledDotProductAttention

from dblocks_titan.diffusion import GRIDS, Grid, inference_sigmas, sigma_to_block, t_to_block
from dblocks_titan.models.block_denoiser import KVCache
from dblocks_titan.models.dblocks_llama import DBlocksLlama
from dblocks_titan.models.huginn import DBlocksHuginn

Bridge = Literal["soft", "hard", "sample"]
BRIDGES: tuple[str, ...] = get_args(Bridge)
Solver = Literal["euler", "heun", "ancestral"]
SOLVERS: tuple[str, ...] = get_args(Solver)


@dataclass(frozen=True)
class Chain:
    """How the AR sampler walks down the σ grid for one noisy slot (METHOD.md §6, §8).

    ``num_levels`` N (None: the model's B, or for a :class:`DBlocksHuginn` its ``sampler_levels`` K, the
    core iterations) levels of the ``grid`` (``q`` | ``karras`` with ``rho``,
    :func:`~dblocks_titan.diffusion.inference_sigmas`), each run by the block owning its σ; the
    ``bridge`` (``soft`` softmax(logits/``bridge_temperature``)·Ê, ``hard`` Ê[argmax], ``sample`` Ê[x] with
    x drawn from softmax(logits/``bridge_temperature``)) gives x̂0; ``solver``: ``euler``, ``heun`` (EDM's
    second-order step, twice the block calls) or ``ancestral`` (z ← x̂0 + σ_next·ε with fresh ε: every
    level sees a clean embedding noised at its own σ, the states the blocks were trained on).
    ``stop_level`` j (None: the last, N − 1): the chain stops at level j of the N-level grid and level j's
    logits give the token; the levels below σ^(j) (and their blocks) are not run. j = 0 draws the token
    from block 0's next-token distribution at σ_max.
    """

    num_levels: int | None = None
    grid: Grid = "q"
    rho: float = 7.0
    bridge: Bridge = "soft"
    bridge_temperature: float = 1.0
    solver: Solver = "euler"
    stop_level: int | None = None

    def __post_init__(self):
        for key, allowed in (("grid", GRIDS), ("bridge", BRIDGES), ("solver", SOLVERS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}.")
        if self.num_levels is not None and self.num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {self.num_levels}.")
        if not self.bridge_temperature > 0:
            raise ValueError(f"bridge_temperature must be > 0, got {self.bridge_temperature}.")
        if self.stop_level is not None and self.stop_level < 0:
            raise ValueError(f"stop_level must be >= 0, got {self.stop_level}.")

    def levels(self, model: DBlocksLlama | DBlocksHuginn) -> tuple[list[float], list[int]]:
        """(σ of each level that runs, descending; the block that runs it)."""
        default = model.config.sampler_levels if isinstance(model, DBlocksHuginn) else model.num_blocks
        num_levels = self.num_levels or default
        if self.stop_level is not None and self.stop_level >= num_levels:
            raise ValueError(f"stop_level must be < the chain's {num_levels} levels, got {self.stop_level}.")
        last = num_levels - 1 if self.stop_level is None else self.stop_level
        sigmas = inference_sigmas(num_levels, model.edm, self.grid, self.rho)[: last + 1]
        return sigmas.tolist(), sigma_to_block(sigmas, model.num_blocks, model.edm).tolist()


def target_table(model: DBlocksLlama | DBlocksHuginn) -> torch.Tensor:
    """``Ê`` [V, D] (fp32): the L2-normalised rows of the token embedding table, the denoising
    target y of training (METHOD.md §6). The whole table also from an FSDP-sharded model (all ranks
    must call it then)."""
    weight = model.tok_embeddings.weight
    return F.normalize((weight.full_tensor() if isinstance(weight, DTensor) else weight).float(), dim=-1)


def bridge_x0(logits: torch.Tensor, table: torch.Tensor, kind: Bridge, temperature: float = 1.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Denoised estimate ``x̂0`` [..., D] from logits [..., V]: ``soft`` = softmax(logits/T)·Ê (the
    authors' choice at T = 1), ``hard`` = Ê[argmax logits], ``sample`` = Ê[x], x ~ softmax(logits/T)
    (``generator`` on the logits' device)."""
    if kind == "soft":
        return (logits.float() / temperature).softmax(-1) @ table
    if kind == "hard":
        return table[logits.argmax(-1)]
    if kind == "sample":
        probs = (logits.float() / temperature).softmax(-1)
        drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return table[drawn.view(probs.shape[:-1])]
    raise ValueError(f"bridge must be one of {BRIDGES}, got {kind!r}.")


def euler_step(z: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE ``dz/dσ = (z − x̂0)/σ`` from σ to σ_next < σ:
    ``z + (σ_next − σ)·(z − x̂0)/σ = x̂0 + (σ_next/σ)·(z − x̂0)``, i.e. z moves toward x̂0."""
    return z + (sigma_next - sigma) * (z - x0) / sigma


def run_chain(denoise: Callable[[torch.Tensor, int], torch.Tensor], z: torch.Tensor, sigmas: list[float], *,
              table: torch.Tensor, chain: Chain, generator: torch.Generator | None = None,
              observe: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Walk the noisy state z [..., D] down the levels σ_0 > … > σ_{N−1} → the logits [..., V] of the last
    level, which give the token. ``denoise(z, j)``: the logits at level j (σ_j, by its block);
    ``observe(j, logits)``, if given, sees every level's logits.

    Euler: ``z ← euler_step(z, x̂0(z, σ_j), σ_j, σ_{j+1})``, i.e. ``z + (σ_{j+1} − σ_j)·d`` with
    ``d = (z − x̂0)/σ_j``. Heun (EDM Alg. 1): ``z' =`` the Euler step, ``d' = (z' − x̂0(z', σ_{j+1}))/σ_{j+1}``,
    ``z ← z + (σ_{j+1} − σ_j)·(d + d')/2``. Ancestral: ``z ← x̂0 + σ_{j+1}·ε``, ε ~ N(0, I) fresh. x̂0 is
    the chain's bridge of the logits. ``generator`` (the ``sample`` bridge's draws, the ancestral ε) lives
    on z's device.
    """
    def x0(logits):
        return bridge_x0(logits, table, chain.bridge, chain.bridge_temperature, generator)

    for j in range(len(sigmas) - 1):
        s, s_next = sigmas[j], sigmas[j + 1]
        logits = denoise(z, j)
        if observe is not None:
            observe(j, logits)
        x0_j = x0(logits)
        if chain.solver == "ancestral":
            z = x0_j + s_next * torch.randn(z.shape, generator=generator, device=z.device)
            continue
        z_next = euler_step(z, x0_j, s, s_next)
        if chain.solver == "heun":
            z_next = z + (s_next - s) * ((z - x0_j) / s + (z_next - x0(denoise(z_next, j + 1))) / s_next) / 2
        z = z_next
    logits = denoise(z, len(sigmas) - 1)
    if observe is not None:
        observe(len(sigmas) - 1, logits)
    return logits


def initial_noise(shape, sigma_max: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """The sampler's start ``z ~ N(0, (1 + σ_max²)·I)`` (fp32)."""
    return (1 + sigma_max**2) ** 0.5 * torch.randn(*shape, generator=generator, device=device)


def sample_token(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from logits [B, V] → [B]. ``temperature`` 0 = argmax; otherwise
    softmax(logits/temperature) restricted to the top-p nucleus (the most likely tokens whose mass
    before them is < top_p; the top token always stays), renormalised, then one multinomial draw."""
    if temperature == 0:
        return logits.argmax(-1)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    probs = (logits.float() / temperature).softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice)[:, 0]


@torch.no_grad()
def dblocks_generate(
    model: DBlocksLlama,
    prompts: torch.Tensor,
    *,
    max_new_tokens: int,
    chain: Chain = Chain(),
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    return_blocks: bool = False,
):
    """Continue prompts [B, P] (P ≥ 1) by ``max_new_tokens`` tokens → [B, P + max_new_tokens].

    Per new token (METHOD.md §6):
    1. ``z ~ N(0, (1 + σ_max²)·I)`` in the embedding dim D (:func:`initial_noise`).
    2. :func:`run_chain` over the ``chain``'s levels ``σ^(0) = σ_max > … > σ^(N−1) = σ_min``, level j
       run by the block that owns σ^(j) (:func:`sigma_to_block`) on the prefix and z.
    3. The logits of the last level give the token (:func:`sample_token`).

    ``use_cache``: each level keeps the clean prefix's keys/values of its block (σ conditions every
    row, so they differ per level): the prompt but its last token is prefilled once, then each
    level runs only two rows per new token (:meth:`DBlocksLlama.denoise_next`; a level's second call
    for the same token, Heun's, does not append again). Without it every level recomputes the whole
    prefix with :meth:`DBlocksLlama.denoise`. ``return_blocks``: also return the blocks run by the
    levels of one new token (the same for every token).
    ``generator`` (for z and the token draws) must live on the prompts' device.
    """
    batch, prompt_len = prompts.shape
    if prompt_len < 1:
        raise ValueError("dblocks_generate needs prompts of length >= 1 (a BOS token at least).")
    edm, device = model.edm, prompts.device
    sigmas, blocks = chain.levels(model)
    table = target_table(model)

    def sigma_vec(sigma: float) -> torch.Tensor:
        return torch.full((batch,), sigma, device=device)

    caches = [[KVCache() for _ in model.block_layers(b)] for b in blocks] if use_cache else []  # [level][layer]
    if use_cache and prompt_len > 1:
        for sigma, block, cache in zip(sigmas, blocks, caches):
            model.prefill(prompts[:, :-1], sigma_vec(sigma), block=block, caches=cache)

    def level_logits(tokens: torch.Tensor, z: torch.Tensor, j: int, append: bool) -> torch.Tensor:
        """Logits [B, V] of the noisy slot after ``tokens`` at level j (``append``: the last token's
        keys/values join level j's cache)."""
        if use_cache:
            return model.denoise_next(tokens[:, -1], z, sigma_vec(sigmas[j]), block=blocks[j], caches=caches[j],
                                      append=append)
        z_all = F.pad(z[:, None], (0, 0, tokens.shape[1] - 1, 0))  # earlier noisy slots: unseen by the last
        return model.denoise(model.tok_embeddings(tokens), z_all, sigma_vec(sigmas[j]), block=blocks[j])[:, -1]

    tokens = prompts
    for _ in range(max_new_tokens):
        appended: set[int] = set()

        def denoise(z: torch.Tensor, j: int) -> torch.Tensor:
            append = j not in appended
            appended.add(j)
            return level_logits(tokens, z, j, append)

        logits = run_chain(denoise, initial_noise((batch, model.config.dim), edm.sigma_max, generator, device),
                           sigmas, table=table, chain=chain, generator=generator)
        next_token = sample_token(logits, temperature=temperature, top_p=top_p, generator=generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return (tokens, blocks) if return_blocks else tokens


@torch.no_grad()
def recurrent_generate(
    model: DBlocksHuginn,
    prompts: torch.Tensor,
    *,
    max_new_tokens: int,
    chain: Chain = Chain(),
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Continue prompts [B, P] (P ≥ 1) by ``max_new_tokens`` tokens with the recurrent-depth
    DiffusionBlocks model → [B, P + max_new_tokens]: the K core iterations of Huginn's loop are the
    levels of the σ grid (METHOD.md §8).

    Per new token at position p (the model's layout: row j holds the prelude output of clean token j
    and the noisy embedding of token j + 1, see ``models.huginn``):
    1. ``z ~ N(0, (1 + σ_max²)·I)`` (:func:`initial_noise`).
    2. :func:`run_chain` over the ``chain``'s levels (default K = the model's ``sampler_levels``, q grid,
       soft bridge, Euler; every option as for :func:`dblocks_generate`). Level k is one pass prelude →
       core → coda at σ^(k) on the rows 0..p, where the context rows j < p hold their known next token
       noised at that level, ``y_j + σ^(k)·ε_j^(k)`` (ε fixed once per row and level, as training
       noises every row at the row's σ), and row p holds the chain's state z.
    3. The last level's logits give the token (:func:`sample_token`).

    ``use_cache``: the prelude's keys/values are cached once (σ-independent), the core's and coda's
    per level; the prompt's context rows are prefilled at every level, then each level runs two rows
    per new token (the context row that the previous token completed, whose keys/values join the
    level's cache, and row p; a level's second call for the same token, Heun's, runs row p alone).
    Without it every level recomputes every row. Both draw the same noise in the same order and give
    the same tokens (tested). ``generator`` (for z, ε, the chain's draws and the token draws) must live
    on the prompts' device.
    """
    batch, prompt_len = prompts.shape
    if prompt_len < 1:
        raise ValueError("recurrent_generate needs prompts of length >= 1 (a BOS token at least).")
    edm, device, dim = model.edm, prompts.device, model.config.dim
    sigmas, _ = chain.levels(model)
    levels = len(sigmas)
    table = target_table(model)

    def sigma_vec(sigma: float) -> torch.Tensor:
        return torch.full((batch,), sigma, device=device)

    def noise(rows: int) -> torch.Tensor:  # ε of ``rows`` context rows at every level [K, B, rows, D]
        return torch.randn(levels, batch, rows, dim, generator=generator, device=device)

    context_noise = noise(prompt_len - 1)  # rows 0..P−2, whose next tokens the prompt holds
    if use_cache:
        prelude = [KVCache() for _ in model.prelude_layers()]
        core = [[KVCache() for _ in model.core_layers()] for _ in sigmas]
        coda = [[KVCache() for _ in model.coda_layers()] for _ in sigmas]
        e = model.prelude_cached(prompts, prelude)  # [B, P, D]
        if prompt_len > 1:
            for k, sigma in enumerate(sigmas):
                z_ctx = table[prompts[:, 1:]] + sigma * context_noise[k]
                model.denoise_cached(e[:, :-1], z_ctx, sigma_vec(sigma), core=core[k], coda=coda[k],
                                     keep=prompt_len - 1, skip_lm_head=True)

    tokens = prompts
    for step in range(max_new_tokens):
        pending = noise(1) if step else None  # the row the previous token completed
        if step:
            context_noise = torch.cat([context_noise, pending], dim=2)
        if not use_cache:
            e = model.prelude(tokens, model.default_positions(tokens, None), None)
        appended: set[int] = set()

        def denoise(z: torch.Tensor, k: int) -> torch.Tensor:
            """Logits [B, V] of row p at level k with row p holding z [B, D]."""
            sigma = sigmas[k]
            if not use_cache:
                z_all = torch.cat([table[tokens[:, 1:]] + sigma * context_noise[k], z[:, None]], dim=1)
                return model.denoise(e, z_all, sigma_vec(sigma), positions=model.default_positions(tokens, None))[:, -1]
            rows, z_rows = e[:, -1:], z[:, None]
            if step and k not in appended:
                rows = e[:, -2:]
                z_rows = torch.cat([table[tokens[:, -1:]] + sigma * pending[k], z_rows], dim=1)
            appended.add(k)
            return model.denoise_cached(rows, z_rows, sigma_vec(sigma), core=core[k], coda=coda[k],
                                        keep=rows.shape[1] - 1)[:, -1]

        logits = run_chain(denoise, initial_noise((batch, dim), edm.sigma_max, generator, device), sigmas,
                           table=table, chain=chain, generator=generator)
        next_token = sample_token(logits, temperature=temperature, top_p=top_p, generator=generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if use_cache and step + 1 < max_new_tokens:
            e = torch.cat([e, model.prelude_cached(next_token[:, None], prelude)], dim=1)
    return tokens


def baseline_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """titan's Llama3Model on tokens [B, P] → logits [B, P, V]; FlexAttention needs its causal
    BlockMask, the SDPA backend is causal by itself."""
    if isinstance(model.config.first_attention.inner_attention, ScaledDotProductAttention.Config):
        return model(tokens)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, model.get_attention_masks(positions))


@torch.no_grad()
def baseline_generate(
    model,
    prompts: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-token sampling from the end-to-end baseline (titan's Llama3Model): prompts [B, P] →
    [B, P + max_new_tokens]. Each step recomputes the whole prefix and draws from the last
    position's logits with :func:`sample_token`."""
    tokens = prompts
    for _ in range(max_new_tokens):
        logits = baseline_logits(model, tokens)[:, -1]
        next_token = sample_token(logits, temperature=temperature, top_p=top_p, generator=generator)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    return tokens


def generate(model, prompts: torch.Tensor, **kwargs):
    """:func:`dblocks_generate` for a :class:`DBlocksLlama`, :func:`recurrent_generate` for a
    :class:`DBlocksHuginn`, else :func:`baseline_generate` (titan's llama3, the ``huginn`` baseline at
    its inference depth)."""
    if isinstance(model, DBlocksLlama):
        return dblocks_generate(model, prompts, **kwargs)
    if isinstance(model, DBlocksHuginn):
        return recurrent_generate(model, prompts, **kwargs)
    return baseline_generate(model, prompts, **kwargs)


@torch.no_grad()
def mdlm_sample(
    model, *, batch: int, seq_len: int, steps: int, generator: torch.Generator, device=None,
    return_blocks: bool = False,
):
    """Ancestral unmasking from t = 1 to 0 in ``steps`` uniform steps, each run by the block that
    owns it: the step from t to s is routed by its midpoint (t + s)/2 (``t_to_block``), so with
    ``steps`` a multiple of B every step lies inside its block's t range (step i of B steps is block
    i), and otherwise a step that straddles a boundary goes to the block holding most of it.

    From t to s < t (α = 1 − t), a masked token is revealed with probability (t − s)/t, drawn from
    the model's SUBS distribution, else stays masked; revealed tokens never change. At s = 0 every
    token is revealed. Returns tokens [batch, seq_len] (and the block of each step if asked).
    """
    mask_id, num_blocks = model.mask_id, model.num_blocks
    x = torch.full((batch, seq_len), mask_id, dtype=torch.long, device=device)
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    blocks = []
    for i in range(steps):
        t, s = float(times[i]), float(times[i + 1])
        block = int(t_to_block((t + s) / 2, num_blocks))
        blocks.append(block)
        probs = model(x, t=torch.full((batch,), t, device=device), block=block).softmax(-1)
        draw = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(batch, seq_len)
        reveal = (torch.rand(x.shape, generator=generator, device=device) < (t - s) / t) & (x == mask_id)
        x = torch.where(reveal, draw, x)
    return (x, blocks) if return_blocks else x
