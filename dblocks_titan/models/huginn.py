"""Recurrent-depth language models (Huginn, Geiping et al. 2025; METHOD.md §8) as titan Modules.

Both models are a prelude, a weight-tied core and a coda, all in ``model.layers`` (prelude first,
then the core, then the coda), so titan's per-layer activation checkpointing, compile and FSDP2
apply unchanged. The authors' public code (``seal-rg/recurrent-pretraining``,
``recpre/raven_modeling_minimal.py``) was read for the architecture; nothing is copied from it.

``huginn`` — the end-to-end baseline, trained by titan's own Trainer (:mod:`dblocks_titan.huginn_trainer`):

1. ``e = prelude(E[x])`` over the clean tokens (causal attention);
2. the state starts as noise: ``s_0 ~ TruncNormal(0, std², ±3·std)`` [B, N, D] (``state_std``, default
   the embeddings' init std, as Huginn matches its state to its embedding scale);
3. ``s_{t+1} = core(adapter([s_t | e]))`` for t < r: input injection concatenates the state and the
   prelude's output and projects 2D → D (Huginn's ``adapter``);
4. ``logits = head(norm(coda(core_norm(s_r))))``.

Every layer is a sandwich block (:class:`SandwichLayer`: a norm before and after each residual
branch), which keeps the state bounded over many iterations. Training depth r is drawn per optimizer
step (:func:`draw_depth`: Huginn's log-normal Poisson, mean ``mean_depth``), the first r − k
iterations under ``no_grad`` (truncated backpropagation through the last ``k = backprop_depth``).
The draw is a function of (seed, step) alone, so it is the same on every rank and micro-batch and a
resumed run repeats it without saved state. In eval mode the depth is ``inference_depth``.

``dblocks_huginn`` — DiffusionBlocks with B = 1 (one denoiser for every σ): the recurrent state is
the noisy next-token embedding ``z = y + σ·ε`` (``y = E[label]/‖E[label]‖``), the prelude's output of
the clean tokens is the injected input, σ conditions the core by adaLN (``DBlockLayer`` and the
shared conditioning of :class:`~dblocks_titan.models.block_denoiser.BlockDenoiser`), and the coda reads
the EDM estimate out:

1. ``e = prelude(E[x])``;
2. ``u = adapter([c_in·z | e])`` (:meth:`DBlocksHuginn.inject`: where the noisy slot enters the stream);
3. ``h = core(u; c)``, ``c = SiLU(emb(c_noise(σ)))``;
4. ``D = c_skip·z + c_out·core_norm(h)``;
5. ``logits = readout(coda(D), c)`` (final norm → final adaLN → zero-init head).

One training step is ONE pass prelude → core → coda (σ drawn from the whole range by the AR objective,
``objectives.ARObjective``: the forward signature is ``dblocks_llama``'s). The sampler
(``sampling.recurrent_generate``) keeps the K-iteration loop, each iteration one level of the sampler's
chain down the σ grid (``sampling.Chain``: an Euler step by default).

**Sequence layout (decision): Huginn's own input injection, one row per position**, not the
``[clean | noisy]`` layout of ``dblocks_llama``. Row i holds ``adapter([c_in·z_i | e_i])`` where e_i is
the prelude's causal output at clean token i and z_i the noisy embedding of the token after it; every
layer attends causally over the rows. So row i sees clean tokens ≤ i, its own noisy target z_i, and the
noisy targets z_j of rows j < i, which are tokens ≤ i (context it also sees clean): no row sees its own
token except through its noisy slot, or any later token (tested by perturbation in
``tests/test_huginn.py``). Why: (a) it is the recurrent model's own structure (state and injected input
per position) and the baseline's prelude/core/coda run unchanged; (b) the core and coda run N positions,
not 2N, which the training-FLOPs target (DB / baseline ≤ 0.15) needs: with 2N positions in the core the
layer FLOPs ratio of the paper shape would be ≈ 0.17; (c) plain causal attention (titan's SDPA / Flex
block-causal masks), no special mask. The price: the context rows carry noised copies of their tokens at
the row's σ, so the sampler noises the known context at each level (with fresh fixed noise per level) to
match training; their keys/values are cached per level. The sampler CE (``ar_eval.teacher_forced_recurrent``)
runs every position's chain at once on 2N rows: the N context rows (true next tokens noised at the
level) and then N chain rows at the same positions, chain row i seeing context rows j < i and itself
(:func:`branch_masks`), which is row i of the sampler's pass after the true tokens ≤ i.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.common import Decoder, FlexAttention, Linear, RMSNorm, ScaledDotProductAttention, TransformerBlock
from torchtitan.protocols.module import Module

from dblocks_titan.diffusion import EDMConfig, precondition
from dblocks_titan.models.block_denoiser import (
    BlockDenoiser,
    cached_attention,
    Conditioning,
    decoder_parts,
    flavor_kwargs,
    KVCache,
    resolve_attn_backend,
)
from dblocks_titan.models.dblocks_llama import document_ids

# --------------------------------------------------------------------------------------------
# Depth: Huginn's log-normal Poisson, truncated backpropagation
# --------------------------------------------------------------------------------------------

DEPTH_LOG_STD = 0.5
"""σ of the log-normal rate (Huginn's sampler)."""


@dataclass(frozen=True)
class Depth:
    """Core iterations of one forward: ``no_grad`` first (under ``torch.no_grad``), then ``with_grad``."""

    no_grad: int
    with_grad: int

    @property
    def total(self) -> int:
        return self.no_grad + self.with_grad


def check_depths(mean_depth: float, backprop_depth: int, inference_depth: int) -> None:
    if not (isinstance(mean_depth, (int, float)) and math.isfinite(mean_depth) and mean_depth >= 1):
        raise ValueError(f"[model] mean_depth must be a number >= 1 (core iterations per step), got {mean_depth!r}.")
    if not (isinstance(backprop_depth, int) and 1 <= backprop_depth <= mean_depth):
        raise ValueError(
            f"[model] backprop_depth (k) must be an integer in [1, mean_depth = {mean_depth}], got {backprop_depth!r}."
        )
    if not (isinstance(inference_depth, int) and inference_depth >= 1):
        raise ValueError(f"[model] inference_depth must be an integer >= 1, got {inference_depth!r}.")


def draw_depth(mean_depth: float, backprop_depth: int, *, seed: int, step: int) -> Depth:
    """Huginn's training depth for optimizer step ``step``, a pure function of (seed, step):

        λ ~ LogNormal(ln(m − 1) − s²/2, s),  r = 1 + Poisson(λ),  s = 0.5

    so E[λ] = m − 1 and E[r] = m (Huginn draws Poisson(λ) + 1 with E[λ] = m, i.e. E[r] = m + 1; we
    shift by one so that ``mean_depth`` is the mean). m = 1 gives r = 1. The last k = min(backprop_depth, r)
    iterations carry gradients, the first r − k run under ``no_grad``. The generator is seeded from
    hash((seed, step)), so every rank and micro-batch of a step, and a resumed run, draw the same r.
    """
    if mean_depth <= 1:
        r = 1
    else:
        gen = torch.Generator().manual_seed(hash((seed, step)) % (2**63))
        mu = math.log(mean_depth - 1) - DEPTH_LOG_STD**2 / 2
        rate = torch.empty(1).log_normal_(mu, DEPTH_LOG_STD, generator=gen)
        r = 1 + int(torch.poisson(rate, generator=gen).item())
    k = min(backprop_depth, r)
    return Depth(no_grad=r - k, with_grad=k)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class SandwichLayer(TransformerBlock):
    """Huginn's sandwich block: ``x = n₂(x + Attn(n₁(x)))``, ``x = n₄(x + MLP(n₃(x)))`` (titan's
    attention and SwiGLU MLP; ``attention_norm`` = n₁, ``attention_out_norm`` = n₂, ``ffn_norm`` = n₃,
    ``ffn_out_norm`` = n₄)."""

    @dataclass(kw_only=True, slots=True)
    class Config(TransformerBlock.Config):
        attention_out_norm: RMSNorm.Config
        ffn_out_norm: RMSNorm.Config

    def __init__(self, config: Config):
        super().__init__()
        self.attention = config.attention.build()
        self.feed_forward = config.feed_forward.build()
        self.attention_norm = config.attention_norm.build()
        self.attention_out_norm = config.attention_out_norm.build()
        self.ffn_norm = config.ffn_norm.build()
        self.ffn_out_norm = config.ffn_out_norm.build()

    def forward(self, x, attention_masks, positions=None):
        return self._sandwich(x, lambda h: self.attention(h, attention_masks, positions))

    def forward_cached(self, x, cache: KVCache, positions, keep: int, mask=None):
        """:meth:`forward` for m new rows after the rows in ``cache`` (``block_denoiser.cached_attention``)."""
        return self._sandwich(x, lambda h: cached_attention(self.attention, h, cache, positions, keep, mask))

    def _sandwich(self, x, attend):
        x = self.attention_out_norm(x + attend(self.attention_norm(x)))
        return self.ffn_out_norm(x + self.feed_forward(self.ffn_norm(x)))


def sandwich_config(layer: TransformerBlock.Config) -> SandwichLayer.Config:
    """A llama3 layer config (``decoder_parts(adaln=False)``) as a sandwich layer with the same parts."""
    norm = layer.attention_norm
    return SandwichLayer.Config(
        attention=layer.attention, feed_forward=layer.feed_forward, attention_norm=norm, ffn_norm=layer.ffn_norm,
        attention_out_norm=dataclasses.replace(norm), ffn_out_norm=dataclasses.replace(norm),
    )


def run_layers(layers, x, attention_masks, positions, *args):
    for layer in layers:
        x = layer(x, *args, attention_masks, positions) if args else layer(x, attention_masks, positions)
    return x


def run_layers_cached(layers, x, caches: list[KVCache], positions, keep: int, *args, mask=None):
    """Rows after the cached ones through ``layers`` (one :class:`KVCache` each); ``args``: the adaLN
    conditioning of ``DBlockLayer.forward_cached``, nothing for sandwich layers; ``mask``: the keys each
    new row sees (``block_denoiser.cached_attention``; default causal)."""
    for layer, cache in zip(layers, caches, strict=True):
        x = layer.forward_cached(x, *args, cache, positions, keep, mask=mask)
    return x


def branch_masks(positions: torch.Tensor, *, documents: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The masks of teacher-forced chains (:meth:`DBlocksHuginn.denoise_cached`), N context rows and then
    N chain rows at the same positions [B, N]: (context [(B, 1,) N, N], chains [(B, 1,) N, 2N]), bool:

        context row i sees context rows j ≤ i;  chain row i sees context rows j < i and itself

    (with ``documents``, only rows of its own document: titan's positions restart at 0 in each)."""
    n = positions.shape[1]
    index = torch.arange(n, device=positions.device)
    causal = index[None, :] <= index[:, None]
    if documents:
        ids = document_ids(positions)
        causal = (causal & (ids[:, :, None] == ids[:, None, :]))[:, None]
    itself = torch.eye(n, dtype=torch.bool, device=positions.device).expand_as(causal)
    return causal, torch.cat([causal & ~itself, itself], dim=-1)


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def forward_flops(params: int, n_heads: int, head_dim: int, seq_len: int) -> int:
    """Forward FLOPs per position of a layer: ``2·P + 4·H·d·N`` (titan's attention convention: the
    backward costs twice the forward, 12·H·d·N in all)."""
    return 2 * params + 4 * n_heads * head_dim * seq_len


def dense_params(module: nn.Module) -> int:
    """Weights of the matmuls that run at every position (adaLN Linears, which run once per sample, excluded)."""
    return sum(p.numel() for name, p in module.named_parameters() if p.dim() == 2 and "adaln" not in name.split("."))


@dataclass(frozen=True)
class RecurrentShape:
    n_prelude: int
    n_core: int
    n_coda: int

    def split(self, layers: list) -> tuple[list, list, list]:
        a, b = self.n_prelude, self.n_prelude + self.n_core
        return layers[:a], layers[a:b], layers[b:]


class _Recurrent:
    """What both models share: the prelude/core/coda split of ``layers``, the adapter, the core norm,
    and the layer-FLOPs count."""

    def _init_recurrent(self, config) -> None:
        self.shape = RecurrentShape(config.n_prelude, config.n_core, config.n_coda)
        self.adapter = config.adapter.build()
        self.core_norm = config.core_norm.build()

    def prelude_layers(self) -> list[nn.Module]:
        return self.shape.split(list(self.layers.values()))[0]

    def core_layers(self) -> list[nn.Module]:
        return self.shape.split(list(self.layers.values()))[1]

    def coda_layers(self) -> list[nn.Module]:
        return self.shape.split(list(self.layers.values()))[2]

    def default_positions(self, tokens: torch.Tensor, positions):
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return positions

    def layer_flops_per_token(self, seq_len: int, *, forward_iters: float, backward_iters: float) -> int:
        """Layer FLOPs (fwd + bwd) per input token of one step, the head excluded:

            (n_prelude + n_coda)·3·F + n_core·F·(f + 2·b) + A·(f + 2·b)

        F = :func:`forward_flops` of one layer, f / b the core iterations run forward / backward,
        A = 2·P_adapter the adapter's forward per position. Every layer runs at the N positions.
        """
        heads = self.config.first_attention.n_heads
        head_dim = self.config.dim // heads
        prelude, core, coda = self.prelude_layers(), self.core_layers(), self.coda_layers()
        outer = sum(3 * forward_flops(dense_params(m), heads, head_dim, seq_len) for m in prelude + coda)
        per_iter = sum(forward_flops(dense_params(m), heads, head_dim, seq_len) for m in core)
        per_iter += 2 * dense_params(self.adapter)
        return int(outer + per_iter * (forward_iters + 2 * backward_iters))

    def _nparams_and_flops(self, seq_len: int, *, forward_iters: float, backward_iters: float, once: int = 0):
        """(nparams, FLOPs per token): the layers (:meth:`layer_flops_per_token`), the head at N
        positions (6·P_head) and ``once`` parameters run once per sample (6·once/N)."""
        nparams = sum(p.numel() for p in self.parameters())
        flops = self.layer_flops_per_token(seq_len, forward_iters=forward_iters, backward_iters=backward_iters)
        return nparams, int(flops + 6 * self.lm_head.weight.numel() + 6 * once / seq_len)


# --------------------------------------------------------------------------------------------
# The end-to-end baseline
# --------------------------------------------------------------------------------------------


class Huginn(_Recurrent, Decoder):
    @dataclass(kw_only=True, slots=True)
    class Config(Decoder.Config):
        n_prelude: int
        n_core: int
        n_coda: int
        adapter: Linear.Config
        core_norm: RMSNorm.Config
        mean_depth: float = 32
        """Mean training depth m (core iterations) of the log-normal Poisson draw."""
        backprop_depth: int = 8
        """k: the last k iterations of a training step carry gradients."""
        inference_depth: int = 32
        """Core iterations in eval mode (validation, eval, generation)."""
        state_std: float = 1.0
        """Std of the truncated-normal initial state (the embeddings' init std)."""
        seed: int = 0
        """Seed of the depth draw (set from ``debug.seed``); the eval state noise uses it too."""

        def __post_init__(self):
            check_depths(self.mean_depth, self.backprop_depth, self.inference_depth)

        def update_from_config(self, *, config, **kwargs) -> None:
            Decoder.Config.update_from_config(self, config=config, **kwargs)
            debug = getattr(config, "debug", None)
            if debug is not None and debug.seed is not None:
                self.seed = debug.seed

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            """At the mean depth: m iterations forward, min(k, m) backward."""
            return model._nparams_and_flops(seq_len, forward_iters=self.mean_depth,
                                            backward_iters=min(self.backprop_depth, self.mean_depth))

    def __init__(self, config: Config):
        super().__init__(config)
        self._init_recurrent(config)
        self.step = 0
        """The optimizer step the depth is drawn for (set by ``HuginnTrainer`` before each step)."""

    def set_step(self, step: int) -> None:
        self.step = step

    def depth(self) -> Depth:
        """Training: :func:`draw_depth` for ``self.step``; eval: ``inference_depth`` iterations (no gradient)."""
        c = self.config
        if self.training:
            return draw_depth(c.mean_depth, c.backprop_depth, seed=c.seed, step=self.step)
        return Depth(no_grad=c.inference_depth, with_grad=0)

    def layer_flops_per_token(self, seq_len: int, *, forward_iters=None, backward_iters=None) -> int:
        c = self.config
        return super().layer_flops_per_token(
            seq_len, forward_iters=c.mean_depth if forward_iters is None else forward_iters,
            backward_iters=min(c.backprop_depth, c.mean_depth) if backward_iters is None else backward_iters,
        )

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        """s_0 ~ TruncNormal(0, std², ±3·std) like e [B, N, D]; eval mode draws it from a fixed seed."""
        std = self.config.state_std
        gen = None if self.training else torch.Generator(device=e.device).manual_seed(self.config.seed)
        return nn.init.trunc_normal_(torch.empty_like(e), std=std, a=-3 * std, b=3 * std, generator=gen)

    def iterate(self, s, e, attention_masks, positions) -> torch.Tensor:
        """One core iteration: ``core(adapter([s | e]))``."""
        x = self.adapter(torch.cat([s, e], dim=-1))
        return run_layers(self.core_layers(), x, attention_masks, positions)

    def forward(self, tokens, positions=None, attention_masks=None, *, depth: Depth | None = None):
        """Logits [B, N, V] of tokens [B, N] (the head's input when titan's chunked loss set
        ``_skip_lm_head``). ``depth``: the iterations to run (default :meth:`depth`)."""
        depth = self.depth() if depth is None else depth
        e = run_layers(self.prelude_layers(), self.tok_embeddings(tokens), attention_masks, positions)
        s = self.initial_state(e)
        with torch.no_grad():
            for _ in range(depth.no_grad):
                s = self.iterate(s, e, attention_masks, positions)
        for _ in range(depth.with_grad):
            s = self.iterate(s, e, attention_masks, positions)
        h = self.norm(run_layers(self.coda_layers(), self.core_norm(s), attention_masks, positions))
        return h if self._skip_lm_head else self.lm_head(h)


# --------------------------------------------------------------------------------------------
# DiffusionBlocks (B = 1)
# --------------------------------------------------------------------------------------------


class DBlocksHuginn(_Recurrent, BlockDenoiser):
    @dataclass(kw_only=True, slots=True)
    class Config(BlockDenoiser.Config):
        n_prelude: int
        n_core: int
        n_coda: int
        adapter: Linear.Config
        core_norm: RMSNorm.Config
        edm: EDMConfig = field(default_factory=EDMConfig)
        """Set from ``[dblocks] edm`` by ``update_from_config``."""
        eval_seed: int = 0
        """Seed of the fixed noise used when the model is called without ``sigma``."""
        sampler_levels: int = 32
        """K: σ levels (core iterations) of the sampler and of the eval's CE-per-level grid."""

        def check_dblocks(self, dblocks) -> None:
            """One denoiser for every σ: B = 1 (called by ``DBlocksTrainer.Config.validate_dblocks``)."""
            if dblocks.num_blocks != 1:
                raise ValueError(
                    f"model 'dblocks_huginn' is one weight-tied denoiser for every noise level (B = 1), got "
                    f"dblocks.num_blocks={dblocks.num_blocks}: set [dblocks] num_blocks = 1."
                )

        def update_from_config(self, *, config, **kwargs) -> None:
            dblocks = getattr(config, "dblocks", None)
            if dblocks is not None:
                self.check_dblocks(dblocks)
                self.edm = dblocks.edm
            BlockDenoiser.Config.update_from_config(self, config=config, **kwargs)

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            """One pass of every layer at N positions, the head at N; adaLNs, final adaLN and time
            embedder once per sample."""
            once = sum(p.numel() for name, p in model.named_parameters()
                       if "adaln" in name.split(".") or name.startswith(("final_adaln", "t_embedder")))
            return model._nparams_and_flops(seq_len, forward_iters=1, backward_iters=1, once=once)

    def __init__(self, config: Config):
        super().__init__(config)
        self._init_recurrent(config)
        self.edm = config.edm
        self.eval_seed = config.eval_seed

    def layer_flops_per_token(self, seq_len: int, *, forward_iters=1, backward_iters=1) -> int:
        return super().layer_flops_per_token(seq_len, forward_iters=forward_iters, backward_iters=backward_iters)

    @property
    def flex(self) -> bool:
        """FlexAttention (causal inside each document, titan's BlockMask) rather than titan's causal SDPA
        (causal over the whole row, no masks)."""
        return isinstance(self.config.first_attention.inner_attention, FlexAttention.Config)

    def default_masks(self, positions: torch.Tensor):
        """The attention masks of a call that brings none: titan's document-causal BlockMask of
        ``positions`` [B, N] for FlexAttention, None for SDPA."""
        return self.get_attention_masks(positions) if self.flex else None

    def prelude(self, tokens, positions, attention_masks) -> torch.Tensor:
        """e = prelude(E[x]) [B, N, D] (σ-independent)."""
        return run_layers(self.prelude_layers(), self.tok_embeddings(tokens), attention_masks, positions)

    def target(self, labels: torch.Tensor) -> torch.Tensor:
        """y = E[label]/‖E[label]‖ (fp32) [B, N, D]."""
        return F.normalize(self.tok_embeddings(labels).float(), dim=-1)

    def forward(
        self, tokens, positions=None, attention_masks=None, *, labels=None, sigma=None, noise=None, block: int = 0,
        skip_lm_head: bool = False,
    ) -> torch.Tensor:
        """Logits [B, N, V] of the next tokens (``skip_lm_head``: the head's input [B, N, D]).

        tokens, labels [B, N]; sigma [B] (fp32); noise [B, N, D]: ``z = y + σ·ε``. Without ``sigma``:
        σ = σ_max and z = σ_max·ε with a fixed-seed ε (no label information) — next-token prediction,
        the honest CE (what titan's Validator measures).
        """
        if block != 0:
            raise ValueError(f"dblocks_huginn has one block (B = 1), got block={block}.")
        batch, n = tokens.shape
        positions = self.default_positions(tokens, positions)
        attention_masks = self.default_masks(positions) if attention_masks is None else attention_masks
        if sigma is None:
            sigma = torch.full((batch,), self.edm.sigma_max, device=tokens.device)
            gen = torch.Generator(device=tokens.device).manual_seed(self.eval_seed)
            z = sigma[:, None, None] * torch.randn(batch, n, self.config.dim, generator=gen, device=tokens.device)
        else:
            z = self.target(labels) + sigma[:, None, None] * noise.float()
        e = self.prelude(tokens, positions, attention_masks)
        return self.denoise(e, z, sigma, positions=positions, attention_masks=attention_masks,
                            skip_lm_head=skip_lm_head)

    def noise_conditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """σ [B] → ``(c_skip, c_out, c_in)`` [B, 1, 1] (fp32) and the adaLN input c [B, D]."""
        c_skip, c_out, c_in, c_noise = (c[:, None, None] for c in precondition(sigma.float(), self.edm))
        return c_skip, c_out, c_in, self.conditioning(c_noise.flatten())

    def inject(self, z: torch.Tensor, e: torch.Tensor, c_in: torch.Tensor) -> torch.Tensor:
        """Where the noisy slot enters the residual stream: ``adapter([c_in·z | e])`` [B, M, D]."""
        return self.adapter(torch.cat([(c_in * z).to(e.dtype), e], dim=-1))

    def readout_denoised(self, h, z, c_skip, c_out, c, coda, skip_lm_head: bool):
        """Core output h → ``D = c_skip·z + c_out·core_norm(h)`` → ``coda(D)`` → shared readout."""
        d = c_skip * z + c_out * self.core_norm(h).float()
        return self.readout(coda(d.to(h.dtype)), c, skip_lm_head)

    def denoise(self, e, z, sigma, *, positions, attention_masks=None, skip_lm_head: bool = False) -> torch.Tensor:
        """:meth:`forward` on given inputs: prelude output e [B, M, D] and noisy targets z [B, M, D]
        (fp32, before c_in) at σ [B] → logits [B, M, V]."""
        c_skip, c_out, c_in, c = self.noise_conditioning(sigma)
        h = run_layers(self.core_layers(), self.inject(z, e, c_in), attention_masks, positions, c)
        coda = lambda d: run_layers(self.coda_layers(), d, attention_masks, positions)  # noqa: E731
        return self.readout_denoised(h, z, c_skip, c_out, c, coda, skip_lm_head)

    # Incremental decoding (sampling.recurrent_generate). The prelude's keys/values do not depend on
    # σ (one cache); the core's and coda's do (one cache per σ level, one KVCache per layer).

    def prelude_cached(self, tokens, caches: list[KVCache]) -> torch.Tensor:
        """Prelude output [B, m, D] of tokens [B, m] that follow the cached ones; all are cached."""
        start = caches[0].length
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        return run_layers_cached(self.prelude_layers(), self.tok_embeddings(tokens), caches, positions, tokens.shape[1])

    def denoise_cached(
        self, e, z, sigma, *, core: list[KVCache], coda: list[KVCache], keep: int, positions=None, mask=None,
        skip_lm_head: bool = False,
    ) -> torch.Tensor:
        """:meth:`denoise` for m rows after the cached rows of one σ level; the first ``keep`` rows join
        the caches. e, z [B, m, D]; σ [B] → logits [B, m, V] (``skip_lm_head``: the head's input).

        ``positions`` [1 or B, m] (default: the m positions after the cached rows) and ``mask`` (the keys
        each row sees, default causal) serve the teacher-forced chains of the sampler CE: N context rows
        cached with their :func:`branch_masks`, then N chain rows at the same positions, row i seeing the
        context rows j < i and itself — row i of :meth:`denoise` on (context rows < i, chain state i).
        """
        c_skip, c_out, c_in, c = self.noise_conditioning(sigma)
        if positions is None:
            start = core[0].length
            positions = torch.arange(start, start + e.shape[1], device=e.device)[None]
        h = run_layers_cached(self.core_layers(), self.inject(z, e, c_in), core, positions, keep, c, mask=mask)
        run_coda = lambda d: run_layers_cached(self.coda_layers(), d, coda, positions, keep, mask=mask)  # noqa: E731
        return self.readout_denoised(h, z, c_skip, c_out, c, run_coda, skip_lm_head)


# --------------------------------------------------------------------------------------------
# Flavors
# --------------------------------------------------------------------------------------------

ADAPTER_INIT = {"weight": partial(nn.init.trunc_normal_, std=0.02)}

FLAVORS = {
    # CPU-sized: 1 prelude, 2 core, 1 coda layers of width 128; the embedded 4096-token BPE.
    "debugmodel": dict(dim=128, n_heads=4, vocab_size=4096, ffn_multiple_of=64, n_prelude=1, n_core=2, n_coda=1),
    # The paper's Pythia-70M-like shape: 2 prelude / 4 core / 2 coda layers, hidden 512, 8 heads;
    # the GPT-2 BPE padded to a multiple of 64.
    "paper": dict(dim=512, n_heads=8, vocab_size=50304, ffn_multiple_of=256, n_prelude=2, n_core=4, n_coda=2),
    # 1B class: Huginn's 2/4/2 at width 3072 (24 heads, 8 KV heads, SwiGLU 8192): 1.1B parameters.
    "1B": dict(dim=3072, n_heads=24, n_kv_heads=8, vocab_size=50304, ffn_multiple_of=1024, n_prelude=2, n_core=4,
               n_coda=2),
}


def _parts(flavor: str, vocab_size: int | None, *, adaln: bool, inner,
           conditioning: Conditioning | None = None) -> tuple[dict, dict]:
    """(Decoder.Config fields with prelude/coda as sandwich layers and the core as llama3 (baseline) or
    adaLN (``adaln``) layers, the recurrent fields)."""
    kwargs = flavor_kwargs(FLAVORS, flavor, vocab_size)
    shape = {k: kwargs.pop(k) for k in ("n_prelude", "n_core", "n_coda")}
    n_layers = sum(shape.values())
    plain = decoder_parts(adaln=False, inner_attention=inner, n_layers=n_layers, **kwargs)
    parts = (decoder_parts(adaln=True, inner_attention=inner, n_layers=n_layers, conditioning=conditioning, **kwargs)
             if adaln else plain)
    split = RecurrentShape(**shape).split
    prelude, core, coda = split(plain["layers"])
    core = split(parts["layers"])[1] if adaln else [sandwich_config(layer) for layer in core]
    parts["layers"] = [sandwich_config(layer) for layer in prelude] + core + [sandwich_config(layer) for layer in coda]
    dim = kwargs["dim"]
    recurrent = dict(
        **shape,
        adapter=Linear.Config(in_features=2 * dim, out_features=dim, bias=False, param_init=ADAPTER_INIT),
        core_norm=dataclasses.replace(plain["norm"]),
    )
    return parts, recurrent


def _inner_attention(attn_backend: str) -> Module.Config:
    return FlexAttention.Config() if resolve_attn_backend(attn_backend) == "flex" else ScaledDotProductAttention.Config()


def huginn_config(
    flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None, mean_depth: float = 32,
    backprop_depth: int = 8, inference_depth: int = 32,
) -> Huginn.Config:
    """The end-to-end recurrent-depth baseline of a flavor (causal attention: titan's FlexAttention with
    block-causal masks on a GPU, its causal SDPA on CPU)."""
    check_depths(mean_depth, backprop_depth, inference_depth)
    parts, recurrent = _parts(flavor, vocab_size, adaln=False, inner=_inner_attention(attn_backend))
    return Huginn.Config(**parts, **recurrent, mean_depth=mean_depth, backprop_depth=backprop_depth,
                         inference_depth=inference_depth)


def dblocks_huginn_config(
    flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None, sampler_levels: int = 32,
    conditioning: Conditioning | None = None,
) -> DBlocksHuginn.Config:
    """The DiffusionBlocks recurrent-depth model of a flavor (B = 1; the same causal attention)."""
    if not (isinstance(sampler_levels, int) and sampler_levels >= 1):
        raise ValueError(f"[model] inference_depth (the sampler's σ levels K) must be an integer >= 1, got "
                         f"{sampler_levels!r}.")
    parts, recurrent = _parts(flavor, vocab_size, adaln=True, inner=_inner_attention(attn_backend),
                              conditioning=conditioning)
    return DBlocksHuginn.Config(**parts, **recurrent, num_blocks=1, sampler_levels=sampler_levels)
