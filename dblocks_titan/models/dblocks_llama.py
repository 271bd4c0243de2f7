"""Autoregressive DiffusionBlocks decoder (METHOD.md §5–6), built from torchtitan Modules.

The network is a llama3 decoder whose L layers are cut into B blocks of L/B layers. One call
runs ONE block:

1. Embed ``[tokens | labels]`` with the shared table. Context rows stay raw; target rows are
   L2-normalised: ``y_i = E[label_i] / ‖E[label_i]‖``.
2. Noise the targets: ``z = y + σ·ε`` and lay out ``[clean x_1..x_N | noisy slots]`` (length 2N).
   Noisy slot i predicts ``label_i`` (the token at position ``pos_i + 1``), so its RoPE position is
   ``pos_i + 1``: a token has the same position in both halves. What the slot's residual stream
   starts from is :class:`NoisySlot`'s choice: ``c_in·z_i`` (the paper), or the context token's
   embedding ``E[x_i]`` plus ``c_in·z_i`` or a learned projection of it.
3. Attention (:func:`dblocks_mask_mod`): clean→clean causal; noisy slot of token k → clean tokens
   < k and itself; no noisy→noisy, no clean→noisy; never across documents.
4. Run only the chosen block's layers, each with zero-init adaLN on ``c = SiLU(emb(c_noise(σ)))``
   (the clean half at σ or at σ_min: ``clean_cond``).
5. Noisy half → EDM combine ``D = c_skip·z + c_out·norm(h)`` (or ``c_out·h``: ``readout_norm``) →
   final adaLN (norm, shift/scale, zero-init) → head (zero-init) → logits ``[B, N, V]``.

Called without ``sigma`` (``model(tokens)``, as titan's Validator does) it predicts the next
token from pure noise at σ_max through block 0: the honest next-token CE comparable with an AR
baseline (METHOD.md §6).

The sampler (``sampling.dblocks_generate``) runs the same computation on its own z:
:meth:`DBlocksLlama.denoise` on the full layout, or incrementally with one KV cache per noise level
(:meth:`~DBlocksLlama.prefill`, :meth:`~DBlocksLlama.denoise_next`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from torchtitan.models.common import FlexAttention, Linear, ScaledDotProductAttention
from torchtitan.models.common.attention import create_attention_mask
from torchtitan.models.llama3.model import Llama3Model
from torchtitan.protocols.module import Module, ModuleDict

from dblocks_titan import compat
from dblocks_titan.diffusion import EDMConfig, precondition
from dblocks_titan.models.block_denoiser import (
    BlockDenoiser,
    check_num_blocks,  # noqa: F401  (re-exported for callers of this module)
    Conditioning,
    decoder_parts,
    flavor_kwargs,
    KVCache,
    resolve_attn_backend,
)
from dblocks_titan.models.conditioning import ZERO_INIT

NOISY_INPUTS = ("c_in", "token", "token_proj")
NOISY_COEFFS = ("c_in", "c_skip")
NOISY_PROJS = ("shared", "per_block")
READOUT_NORMS = ("twice", "once")
CLEAN_CONDS = ("sigma", "sigma_min")


@dataclass(frozen=True)
class NoisySlot:
    """How the noisy slots enter and leave the residual stream (``[model]`` keys of ``dblocks_llama``).

    - ``noisy_input``: slot i's input row, with ``u = noisy_scale·coeff·z_i``:
      ``c_in`` → u with coeff = c_in (the paper: at σ_max pure noise of norm ≈ √dim);
      ``token`` → E[x_i] + u (x_i: the context token the slot follows, which it attends to anyway);
      ``token_proj`` → E[x_i] + W·u, W a zero-initialised Linear dim → dim, so every slot starts as a
      plain next-token query and learns how much of z to read.
    - ``noisy_coeff`` (``token`` / ``token_proj``): ``c_in`` (unit-variance noise at every σ) or
      ``c_skip`` (= σ_d²/(σ² + σ_d²): the linear denoiser's estimate of y, which vanishes at high σ, so
      the noise of the levels a block rarely trains on, σ_max first, cannot flood the slot).
    - ``noisy_proj`` (``token_proj``): one W for all blocks (``shared``) or each block its own
      (``per_block``: block-local, the other blocks' training never moves it).
    - ``noisy_scale``: the factor on ``coeff·z`` (1: as is).
    - ``readout_norm``: ``twice`` → D = c_skip·z + c_out·norm(h), normed again by the readout;
      ``once`` → D = c_skip·z + c_out·h, normed by the readout only.
    - ``clean_cond``: the clean half's adaLN conditioning: ``sigma`` (the slot's σ, METHOD.md §5) or
      ``sigma_min`` (fixed: the clean rows, hence their keys and values, do not depend on σ).
    """

    noisy_input: str = "token_proj"
    noisy_coeff: str = "c_skip"
    noisy_proj: str = "per_block"
    noisy_scale: float = 1.0
    readout_norm: str = "once"
    clean_cond: str = "sigma"

    def __post_init__(self):
        for key, allowed in (("noisy_input", NOISY_INPUTS), ("noisy_coeff", NOISY_COEFFS),
                             ("noisy_proj", NOISY_PROJS), ("readout_norm", READOUT_NORMS),
                             ("clean_cond", CLEAN_CONDS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"[model] {key} must be one of {allowed}, got {getattr(self, key)!r}")
        scale = self.noisy_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
            raise ValueError(f"[model] noisy_scale must be a number >= 0, got {scale!r}")


# --------------------------------------------------------------------------------------------
# Attention: one mask definition; FlexAttention evaluates it as a BlockMask (GPU), the SDPA path
# (CPU) computes the same attention structurally, without a 2N × 2N mask.
# --------------------------------------------------------------------------------------------


def dblocks_mask_mod(doc_ids: torch.Tensor, n: int):
    """Mask of the ``[clean | noisy]`` layout as a FlexAttention ``mask_mod``.

    ``doc_ids`` [B, N] numbers the documents inside each row; indices ≥ n are noisy slots.
    Allowed: clean_i → clean_j (j ≤ i); noisy_i → clean_j (j ≤ i) and noisy_i itself; all
    within one document. Noisy slot i holds the token after clean slot i, so "j ≤ i" is
    METHOD.md's "noisy_k → clean_{<k}".
    """

    def mask_mod(b, h, q, kv):
        q_tok = torch.where(q < n, q, q - n)
        kv_clean = kv < n
        kv_tok = torch.where(kv_clean, kv, kv - n)
        same_doc = doc_ids[b, q_tok] == doc_ids[b, kv_tok]
        return (kv_clean & (kv_tok <= q_tok) & same_doc) | (q == kv)

    return mask_mod


def document_ids(positions: torch.Tensor) -> torch.Tensor:
    """Document index of every token; titan's positions restart at 0 in each document."""
    return torch.cumsum((positions == 0).int(), dim=1)


@dataclass(frozen=True)
class CleanNoisyMask:
    """The ``[clean | noisy]`` mask for :class:`CleanNoisySDPA`: ``n`` clean slots, then ``n`` noisy
    ones; ``doc_mask`` = None when every row is one document (causal fast paths), else the additive
    document-causal mask [B, 1, N, N] over the clean tokens (0 allowed, −inf not)."""

    n: int
    doc_mask: torch.Tensor | None

    @classmethod
    def from_positions(cls, positions: torch.Tensor) -> "CleanNoisyMask":
        batch, n = positions.shape
        if not (positions[:, 1:] == 0).any():
            return cls(n, None)
        ids = document_ids(positions)
        allowed = (ids[:, :, None] == ids[:, None, :]).tril()
        doc_mask = torch.zeros(batch, 1, n, n, device=positions.device).masked_fill(~allowed[:, None], float("-inf"))
        return cls(n, doc_mask)


class _NoisyAttention(torch.autograd.Function):
    """Noisy query i over clean keys j ≤ i (``mask``: None = causal, else additive) plus its own key.

    Forward: ``(o₁, ℓ₁)`` = flash attention over the clean keys (output and log-sum-exp); self
    score ``s = scale·q·k_self``; ``ℓ = logaddexp(ℓ₁, s)``; ``o = e^{ℓ₁−ℓ}·o₁ + e^{s−ℓ}·v_self``.
    Backward: the flash backward over the clean keys fed the merged ``o`` and ``ℓ`` gives exactly
    the clean keys' share (it recomputes ``P = e^{S−ℓ}`` and uses ``D = rowsum(dO·o)``); the self
    key adds ``p = e^{s−ℓ}``, ``dv_self = p·dO``, ``ds = p·(dO·v_self − D)``, ``dq += scale·ds·k_self``,
    ``dk_self = scale·ds·q``. All [B, H, N, E]; CPU flash kernels (``aten`` ``…_for_cpu``).
    """

    @staticmethod
    def forward(ctx, q, k, v, k_self, v_self, mask, scale: float):
        out1, lse1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale
        )
        s = scale * (q.float() * k_self.float()).sum(-1)
        lse = torch.logaddexp(lse1, s)
        out = torch.exp(lse1 - lse)[..., None] * out1.float() + torch.exp(s - lse)[..., None] * v_self.float()
        out = compat.cast(out, q.dtype)  # not a no-op .to: torch 2.11's compile would drop the gradients
        ctx.save_for_backward(q, k, v, k_self, v_self, mask, out, lse, s)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_self, v_self, mask, out, lse, s = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, mask is None, attn_mask=mask, scale=ctx.scale
        )
        do = dout.float()
        p = torch.exp(s - lse)[..., None]
        ds = ctx.scale * p * ((do * v_self.float()).sum(-1, keepdim=True) - (do * out.float()).sum(-1, keepdim=True))
        dq = dq + (ds * k_self.float()).to(dq.dtype)
        return dq, dk, dv, (ds * q.float()).to(k_self.dtype), (p * do).to(v_self.dtype), None, None


class CleanNoisySDPA(Module):
    """Inner attention of the ``[clean | noisy]`` layout (:func:`dblocks_mask_mod`) for CPU, exact and
    without a 2N × 2N mask: clean queries = SDPA over the clean keys (causal, or the document-causal
    mask); noisy queries = :class:`_NoisyAttention` (clean keys j ≤ i plus the self key merged by
    log-sum-exp). ~N² + N scores instead of (2N)²; nothing of size [2N, 2N] is built or saved."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks: CleanNoisyMask, scale=None, enable_gqa=False,
                **kwargs):
        if q_BLNH.device.type != "cpu":
            raise ValueError("attn_backend 'sdpa' (CleanNoisySDPA) runs on CPU; use 'flex' or 'auto' on a GPU.")
        q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
        if enable_gqa and k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        n, mask = attention_masks.n, attention_masks.doc_mask
        mask = None if mask is None else mask.to(q.dtype)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        kc, vc = k[:, :, :n], v[:, :, :n]
        clean = F.scaled_dot_product_attention(q[:, :, :n], kc, vc, attn_mask=mask, is_causal=mask is None, scale=scale)
        noisy = _NoisyAttention.apply(q[:, :, n:], kc, vc, k[:, :, n:], v[:, :, n:], mask, scale)
        return torch.cat([clean, noisy], dim=2).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class DBlocksLlama(BlockDenoiser):
    """llama3 decoder cut into ``num_blocks`` independently trained denoising blocks."""

    @dataclass(kw_only=True, slots=True)
    class Config(BlockDenoiser.Config):
        edm: EDMConfig = field(default_factory=EDMConfig)
        """Set from ``[dblocks] edm`` by ``update_from_config``."""
        eval_seed: int = 0
        """Seed of the fixed noise used when the model is called without ``sigma``."""
        slot: NoisySlot = field(default_factory=NoisySlot)
        noisy_proj: Linear.Config | None = None
        """The zero-init Linear W of ``noisy_input = "token_proj"`` (one, or one per block)."""

        def update_from_config(self, *, config, **kwargs) -> None:
            BlockDenoiser.Config.update_from_config(self, config=config, **kwargs)
            dblocks = getattr(config, "dblocks", None)
            if dblocks is not None:
                self.edm = dblocks.edm
            training = getattr(config, "training", None)
            if training is not None:  # noisy slot i sits at RoPE position pos_i + 1 ≤ seq_len
                for layer in self.layers:
                    layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=training.seq_len + 1)

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            """The block's layers see 2N positions per N input tokens; the head (and ``noisy_proj``)
            the N noisy ones."""
            nparams, flops = self.block_flops(model, 2, 1, seq_len)
            if model.noisy_proj is not None:
                flops += 6 * next(iter(model.noisy_proj.values())).weight.numel()
            return nparams, flops

    def __init__(self, config: Config):
        super().__init__(config)
        self.edm = config.edm
        self.eval_seed = config.eval_seed
        self.slot = config.slot
        self.noisy_proj = None  # {"0": W} or {"b": W_b of block b} (NoisySlot.noisy_proj)
        if config.noisy_proj is not None:
            count = config.num_blocks if config.slot.noisy_proj == "per_block" else 1
            self.noisy_proj = ModuleDict({str(b): config.noisy_proj.build() for b in range(count)})
        self._mask_cache: tuple | None = None

    def block_module_names(self, block: int) -> list[str]:
        """The block's layers and, with ``noisy_proj = "per_block"``, its own W_b."""
        own = ["noisy_proj." + str(block)] if self.noisy_proj is not None and self.slot.noisy_proj == "per_block" else []
        return super().block_module_names(block) + own

    def get_attention_masks(self, positions: torch.Tensor):
        """Mask for the 2N layout: a BlockMask for FlexAttention, else a :class:`CleanNoisyMask`."""
        cached = self._mask_cache
        if cached is not None and cached[0].shape == positions.shape and torch.equal(cached[0], positions):
            return cached[1]  # the same document layout as the last batch (the common case)
        inner = self.config.first_attention.inner_attention
        if isinstance(inner, FlexAttention.Config):
            batch, n = positions.shape
            mask = create_attention_mask(
                dblocks_mask_mod(document_ids(positions), n), batch, None, 2 * n, 2 * n, device=positions.device,
                BLOCK_SIZE=inner.block_size,
            )
        else:
            mask = CleanNoisyMask.from_positions(positions)
        self._mask_cache = (positions.clone(), mask)
        return mask

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_masks=None,
        *,
        labels: torch.Tensor | None = None,
        sigma: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
        block: int = 0,
        skip_lm_head: bool = False,
    ) -> torch.Tensor:
        """Logits [B, N, V] for the noisy slots, running only ``block``'s layers (``skip_lm_head``:
        the head's input [B, N, D] instead, for a loss that applies the head in chunks).

        tokens [B, N]; sigma [B] (fp32, default σ_max); noise [B, N, D]. The noisy targets z [B, N, D]:
        - training: ``labels`` [B, N] (the next tokens) and ``noise`` → z = y + σ·ε;
        - ``z`` given (a sampler's state, fp32): as is;
        - neither: next-token prediction from pure noise, z = σ·ε (ε = ``noise``, or a fixed-seed
          draw), no label information — block 0 unless told otherwise.
        """
        batch, n = tokens.shape
        if sigma is None:
            sigma = torch.full((batch,), self.edm.sigma_max, device=tokens.device)
        if labels is not None:
            emb_all = self.tok_embeddings(torch.cat([tokens, labels], dim=1))
            emb, target = emb_all[:, :n], emb_all[:, n:]
            z = F.normalize(target.float(), dim=-1) + sigma[:, None, None] * noise.float()
        else:
            emb = self.tok_embeddings(tokens)
            if z is None:
                if noise is None:
                    gen = torch.Generator(device=tokens.device).manual_seed(self.eval_seed)
                    noise = torch.randn(batch, n, self.config.dim, generator=gen, device=tokens.device)
                z = sigma[:, None, None] * noise.float()
        return self.denoise(
            emb, z, sigma, block=block, positions=positions, attention_masks=attention_masks, skip_lm_head=skip_lm_head
        )

    def denoise(
        self,
        emb: torch.Tensor,
        z: torch.Tensor,
        sigma: torch.Tensor,
        *,
        block: int,
        positions: torch.Tensor | None = None,
        attention_masks=None,
        skip_lm_head: bool = False,
    ) -> torch.Tensor:
        """:meth:`forward` on given inputs: context embeddings emb [B, N, D] and noisy targets
        z [B, N, D] (fp32, before c_in) at σ [B] → logits [B, N, V] of the noisy slots."""
        batch, n = emb.shape[:2]
        if positions is None:
            positions = torch.arange(n, device=emb.device).expand(batch, n)
        if attention_masks is None:
            attention_masks = self.get_attention_masks(positions)
        c_skip, c_out, c_in, c = self.noise_conditioning(sigma)
        x = torch.cat([emb, self.noisy_rows(emb, z, c_in, c_skip, block)], dim=1)
        pos2 = torch.cat([positions, positions + 1], dim=1)
        x = self.run_block(x, self.row_conditioning(c), block, attention_masks, pos2)
        return self.denoised_readout(x[:, n:], z, c_skip, c_out, c, skip_lm_head)

    def noise_conditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """σ [B] → ``(c_skip, c_out, c_in)`` [B, 1, 1] (fp32) and the adaLN input c [B, C]."""
        c_skip, c_out, c_in, c_noise = (c[:, None, None] for c in precondition(sigma.float(), self.edm))
        return c_skip, c_out, c_in, self.conditioning(c_noise.flatten())

    def noisy_rows(self, emb: torch.Tensor, z: torch.Tensor, c_in, c_skip, block: int) -> torch.Tensor:
        """The noisy slots' input rows [B, M, D] (:class:`NoisySlot`) from the context embeddings emb
        [B, M, D] of the tokens they follow, z [B, M, D] (fp32) and its coefficients [B, 1, 1]."""
        slot = self.slot
        coeff = c_in if slot.noisy_input == "c_in" or slot.noisy_coeff == "c_in" else c_skip
        u = (slot.noisy_scale * coeff * z).to(emb.dtype)
        if slot.noisy_input == "c_in":
            return u
        if self.noisy_proj is None:
            return emb + u
        return emb + self.noisy_proj[str(block) if slot.noisy_proj == "per_block" else "0"](u)

    def clean_conditioning(self, c: torch.Tensor) -> torch.Tensor:
        """The clean rows' c [B, C]: the slots' own c, or c at σ_min (``clean_cond``)."""
        if self.slot.clean_cond == "sigma":
            return c
        c_noise = precondition(torch.tensor([self.edm.sigma_min], device=c.device), self.edm)[3]
        return self.conditioning(c_noise).expand_as(c)

    def row_conditioning(self, c: torch.Tensor) -> torch.Tensor:
        """c for the ``[clean | noisy]`` rows: c [B, C] for all, or [B, 2, C] (clean half, noisy half)."""
        if self.slot.clean_cond == "sigma":
            return c
        return torch.stack([self.clean_conditioning(c), c], dim=1)

    def denoised_readout(self, x, z, c_skip, c_out, c, skip_lm_head: bool = False) -> torch.Tensor:
        """Noisy-slot outputs x [B, M, D] → ``D = c_skip·z + c_out·h`` (h = norm(x), or x itself with
        ``readout_norm = "once"``) → readout (whose norm is the only one then)."""
        h = self.norm(x) if self.slot.readout_norm == "twice" else x
        denoised = c_skip * z + c_out * h.float()
        return self.readout(denoised.to(h.dtype), c, skip_lm_head)

    # Incremental decoding (the sampler of METHOD.md §6). σ conditions every row, so the clean
    # prefix's keys/values differ per noise level: the caller keeps one list of KVCache (one per
    # layer of the level's block) for each level of its σ grid.

    def prefill(self, tokens: torch.Tensor, sigma: torch.Tensor, *, block: int, caches: list[KVCache]) -> None:
        """Cache the keys/values of the clean tokens [B, P] (positions 0..P−1) in ``block``'s layers
        at σ [B]; ``caches``: one empty :class:`KVCache` per layer of the block."""
        c = self.clean_conditioning(self.noise_conditioning(sigma)[-1])
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        self.run_block_cached(self.tok_embeddings(tokens), c, block, caches, positions, keep=tokens.shape[1])

    def denoise_next(
        self, token: torch.Tensor, z: torch.Tensor, sigma: torch.Tensor, *, block: int, caches: list[KVCache],
        append: bool = True,
    ) -> torch.Tensor:
        """Logits [B, V] of the noisy slot after the cached clean prefix (S tokens) and ``token`` [B]:
        the last row of :meth:`denoise` on prefix + token, for z [B, D] (fp32) at σ [B].

        ``append``: two new rows run through ``block``: clean ``token`` at position S (its keys/values
        join the cache) and the noisy slot at position S + 1, which attends to the S + 1 clean rows and
        itself. ``append=False`` (a later call for the same token, whose keys/values the cache already
        holds): the noisy slot alone.
        """
        c_skip, c_out, c_in, c = self.noise_conditioning(sigma)
        start = caches[0].length
        emb = self.tok_embeddings(token[:, None])
        z = z[:, None]
        noisy = self.noisy_rows(emb, z, c_in, c_skip, block)
        if append:
            x, cond = torch.cat([emb, noisy], dim=1), self.row_conditioning(c)
            positions = torch.arange(start, start + 2, device=token.device)[None]
        else:
            x, cond = noisy, c
            positions = torch.full((1, 1), start, device=token.device)
        x = self.run_block_cached(x, cond, block, caches, positions, keep=int(append))
        return self.denoised_readout(x[:, -1:], z, c_skip, c_out, c)[:, 0]


# --------------------------------------------------------------------------------------------
# Flavors
# --------------------------------------------------------------------------------------------

FLAVORS = {
    # CPU-sized: 8 layers of width 128 train at a few steps per second on 2 cores.
    "debugmodel": dict(dim=128, n_layers=8, n_heads=4, vocab_size=4096, ffn_multiple_of=64),
    # The paper's AR model (GPT-2 small shape): 12 layers, d 768, 12 heads, GPT-2 vocab padded to 64.
    "125M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=50304, ffn_multiple_of=256),
    # Llama-3.2-1B / Llama-3.1-8B shapes.
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_multiple_of=1024, ffn_dim_multiplier=1.5),
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_multiple_of=1024, ffn_dim_multiplier=1.3),
}


def flavor_config(
    flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None, n_layers: int | None = None,
    conditioning: Conditioning | None = None, slot: NoisySlot | None = None,
) -> DBlocksLlama.Config:
    """The AR DiffusionBlocks decoder of a flavor: FlexAttention + BlockMask ("flex", GPU) or
    :class:`CleanNoisySDPA` ("sdpa", CPU); conditioning and noisy-slot options as given."""
    inner = FlexAttention.Config() if resolve_attn_backend(attn_backend) == "flex" else CleanNoisySDPA.Config()
    kwargs = flavor_kwargs(FLAVORS, flavor, vocab_size, n_layers)
    slot = slot or NoisySlot()
    proj = None
    if slot.noisy_input == "token_proj":
        proj = Linear.Config(in_features=kwargs["dim"], out_features=kwargs["dim"], bias=False,
                             param_init={"weight": ZERO_INIT["weight"]})
    return DBlocksLlama.Config(**decoder_parts(adaln=True, inner_attention=inner, conditioning=conditioning, **kwargs),
                               slot=slot, noisy_proj=proj)


def baseline_config(
    flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None, n_layers: int | None = None,
) -> Llama3Model.Config:
    """titan's end-to-end Llama3Model with the flavor's shape (the twin of every AR run): titan's
    FlexAttention with block-causal masks on a GPU, its causal SDPA on CPU."""
    flex = resolve_attn_backend(attn_backend) == "flex"
    inner = FlexAttention.Config() if flex else ScaledDotProductAttention.Config()
    return Llama3Model.Config(
        **decoder_parts(adaln=False, inner_attention=inner, **flavor_kwargs(FLAVORS, flavor, vocab_size, n_layers)))
