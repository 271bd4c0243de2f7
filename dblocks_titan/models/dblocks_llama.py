"""Autoregressive DiffusionBlocks decoder (METHOD.md §5–6), built from torchtitan Modules.

The network is a llama3 decoder whose L layers are cut into B blocks of L/B layers. One call
runs ONE block:

1. Embed ``[tokens | labels]`` with the shared table. Context rows stay raw; target rows are
   L2-normalised: ``y_i = E[label_i] / ‖E[label_i]‖``.
2. Noise the targets: ``z = y + σ·ε`` and lay out ``[clean x_1..x_N | noisy c_in·z_1..c_in·z_N]``
   (length 2N). Noisy slot i predicts ``label_i`` (the token at position ``pos_i + 1``), so its
   RoPE position is ``pos_i + 1``: a token has the same position in both halves.
3. Attention (:func:`dblocks_mask_mod`): clean→clean causal; noisy slot of token k → clean tokens
   < k and itself; no noisy→noisy, no clean→noisy; never across documents.
4. Run only the chosen block's layers, each with zero-init adaLN on ``c = SiLU(emb(c_noise(σ)))``.
5. Shared final norm on the noisy half → EDM combine ``D = c_skip·z + c_out·h`` → final adaLN
   (norm, shift/scale, zero-init) → head (zero-init) → logits ``[B, N, V]``.

Called without ``sigma`` (``model(tokens)``, as titan's Validator does) it predicts the next
token from pure noise at σ_max through block 0: the honest next-token CE comparable with an AR
baseline (METHOD.md §6).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.common import (
    ComplexRoPE,
    compute_ffn_hidden_dim,
    Decoder,
    Embedding,
    FlexAttention,
    Linear,
    RMSNorm,
    ScaledDotProductAttention,
    TransformerBlock,
)
from torchtitan.models.common.attention import create_attention_mask
from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
from torchtitan.models.common.param_init import depth_scaled_std
from torchtitan.models.llama3.model import Llama3Model, Llama3TransformerBlock
from torchtitan.protocols.module import Module

from dblocks_titan.diffusion import EDMConfig, precondition
from dblocks_titan.models.conditioning import modulate, TimestepEmbedder, ZERO_INIT


# --------------------------------------------------------------------------------------------
# Attention: one mask definition, evaluated densely for SDPA (CPU) or as a FlexAttention mask.
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


def dense_mask(mask_mod, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Evaluate ``mask_mod`` on the full grid → bool [B, 1, L, L] for SDPA's ``attn_mask``."""
    idx = torch.arange(length, device=device)
    b = torch.arange(batch, device=device)[:, None, None]
    return mask_mod(b, None, idx[None, :, None], idx[None, None, :])[:, None]


class MaskedSDPA(Module):
    """Inner attention: ``F.scaled_dot_product_attention`` with an explicit boolean mask.

    titan's ``ScaledDotProductAttention`` accepts only ``is_causal``; FlexAttention has no
    backward on CPU. This is the CPU path of the DiffusionBlocks mask.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks, scale=None, enable_gqa=False, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_masks, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class DBlockLayer(TransformerBlock):
    """llama3 layer with adaLN: ``x += gate·Attn(norm(x)·(1+scale)+shift)``, same for the MLP.

    The adaLN Linear (c → 6·dim) is zero-initialised, so the layer starts as the identity.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TransformerBlock.Config):
        adaln: Linear.Config

    def __init__(self, config: Config):
        super().__init__()
        self.attention = config.attention.build()
        self.feed_forward = config.feed_forward.build()
        self.attention_norm = config.attention_norm.build()
        self.ffn_norm = config.ffn_norm.build()
        self.adaln = config.adaln.build()

    def forward(self, x, c, attention_masks, positions):
        """x [B, 2N, D]; c [B, D] (already SiLU'd); positions [B, 2N]."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(c).chunk(6, dim=-1)
        h = modulate(self.attention_norm(x), shift_a, scale_a)
        x = x + gate_a[:, None] * self.attention(h, attention_masks, positions)
        h = modulate(self.ffn_norm(x), shift_m, scale_m)
        return x + gate_m[:, None] * self.feed_forward(h)


class DBlocksLlama(Decoder):
    """llama3 decoder cut into ``num_blocks`` independently trained denoising blocks."""

    @dataclass(kw_only=True, slots=True)
    class Config(Decoder.Config):
        t_embedder: TimestepEmbedder.Config
        final_adaln: Linear.Config
        num_blocks: int = 1
        """Set from ``[dblocks] num_blocks`` by ``update_from_config``."""
        edm: EDMConfig = field(default_factory=EDMConfig)
        """Set from ``[dblocks] edm`` by ``update_from_config``."""
        eval_seed: int = 0
        """Seed of the fixed noise used when the model is called without ``sigma``."""

        def update_from_config(self, *, config, **kwargs) -> None:
            Decoder.Config.update_from_config(self, config=config, **kwargs)
            dblocks = getattr(config, "dblocks", None)
            if dblocks is not None:
                self.num_blocks = dblocks.num_blocks
                self.edm = dblocks.edm
            check_num_blocks(len(self.layers), self.num_blocks)
            training = getattr(config, "training", None)
            if training is not None:  # noisy slot i sits at RoPE position pos_i + 1 ≤ seq_len
                for layer in self.layers:
                    layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=training.seq_len + 1)

        def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
            """FLOPs per input token of one DiffusionBlocks step (one block active).

            ``6·(2·P_block + P_head) + 12·(L/B)·heads·2·head_dim·2N``: the block's layers
            and attention see 2N positions per N input tokens; the head sees the N noisy ones.
            """
            nparams = sum(p.numel() for p in model.parameters())
            layer_params = sum(p.numel() for p in model.layers["0"].parameters())
            block_layers = len(self.layers) // self.num_blocks
            attn = self.layers[0].attention
            head_dims = 2 * (self.dim // attn.n_heads)
            head_params = self.dim * self.vocab_size
            flops = 6 * (2 * block_layers * layer_params + head_params)
            flops += 12 * block_layers * attn.n_heads * head_dims * 2 * seq_len
            return nparams, flops

    def __init__(self, config: Config):
        super().__init__(config)
        self.t_embedder = config.t_embedder.build()
        self.final_adaln = config.final_adaln.build()
        self.num_blocks = config.num_blocks
        self.edm = config.edm
        self.eval_seed = config.eval_seed
        self._mask_cache: tuple | None = None

    def block_layers(self, block: int) -> list[nn.Module]:
        """The L/B layers of ``block`` (block 0 = the first layers = the highest σ range)."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in [0, {self.num_blocks}), got {block}.")
        per_block = len(self.layers) // self.num_blocks
        return list(self.layers.values())[block * per_block : (block + 1) * per_block]

    def get_attention_masks(self, positions: torch.Tensor):
        """Mask for the 2N layout: a BlockMask for FlexAttention, else a dense bool tensor."""
        batch, n = positions.shape
        cached = self._mask_cache
        if cached is not None and cached[0].shape == positions.shape and torch.equal(cached[0], positions):
            return cached[1]  # the same document layout as the last batch (the common case)
        mask_mod = dblocks_mask_mod(document_ids(positions), n)
        inner = self.config.first_attention.inner_attention
        if isinstance(inner, FlexAttention.Config):
            mask = create_attention_mask(
                mask_mod, batch, None, 2 * n, 2 * n, device=positions.device, BLOCK_SIZE=inner.block_size
            )
        else:
            mask = dense_mask(mask_mod, batch, 2 * n, positions.device)
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
        block: int = 0,
    ) -> torch.Tensor:
        """Logits [B, N, V] for the noisy slots, running only ``block``'s layers.

        tokens, labels [B, N] (labels = next tokens); sigma [B] (fp32); noise [B, N, D].
        Without ``sigma``: σ = σ_max, z = σ_max·ε with a fixed-seed ε (no label information),
        block 0 — next-token prediction.
        """
        batch, n = tokens.shape
        if positions is None:
            positions = torch.arange(n, device=tokens.device).expand(batch, n)
        if attention_masks is None:
            attention_masks = self.get_attention_masks(positions)

        if sigma is None:
            sigma = torch.full((batch,), self.edm.sigma_max, device=tokens.device)
            gen = torch.Generator(device=tokens.device).manual_seed(self.eval_seed)
            noise = torch.randn(batch, n, self.config.dim, generator=gen, device=tokens.device)
            emb = self.tok_embeddings(tokens)
            z = sigma[:, None, None] * noise
        else:
            emb_all = self.tok_embeddings(torch.cat([tokens, labels], dim=1))
            emb, target = emb_all[:, :n], emb_all[:, n:]
            y = F.normalize(target.float(), dim=-1)
            z = y + sigma[:, None, None] * noise.float()

        c_skip, c_out, c_in, c_noise = (c[:, None, None] for c in precondition(sigma.float(), self.edm))
        x = torch.cat([emb, (c_in * z).to(emb.dtype)], dim=1)
        pos2 = torch.cat([positions, positions + 1], dim=1)
        c = F.silu(self.t_embedder(c_noise.flatten()))

        for layer in self.block_layers(block):
            x = layer(x, c, attention_masks, pos2)

        h = self.norm(x[:, n:])
        denoised = c_skip * z + c_out * h.float()
        shift, scale = self.final_adaln(c).chunk(2, dim=-1)
        out = modulate(self.norm(denoised.to(h.dtype)), shift, scale)
        return self.lm_head(out)


def check_num_blocks(n_layers: int, num_blocks: int) -> None:
    if num_blocks < 1 or n_layers % num_blocks != 0:
        raise ValueError(
            f"dblocks.num_blocks={num_blocks} must divide the model's n_layers={n_layers} "
            f"(choose one of {[b for b in range(1, n_layers + 1) if n_layers % b == 0]})."
        )


# --------------------------------------------------------------------------------------------
# Flavors
# --------------------------------------------------------------------------------------------

_LINEAR_INIT = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}
_NORM_INIT = {"weight": nn.init.ones_}
_EMBEDDING_INIT = {"weight": partial(nn.init.normal_, std=1.0)}


def _output_init(dim: int) -> dict:
    s = dim**-0.5
    return {"weight": partial(nn.init.trunc_normal_, std=s, a=-3 * s, b=3 * s)}


def _depth_init(layer_id: int) -> dict:
    return {"weight": partial(nn.init.trunc_normal_, std=depth_scaled_std(0.02, layer_id)), "bias": nn.init.zeros_}


def inner_attention_config(attn_backend: str, *, dblocks: bool) -> Module.Config:
    """"flex" (FlexAttention + mask; needs a GPU to train), "sdpa", or "auto" = flex iff CUDA.

    With "sdpa" a DiffusionBlocks model uses :class:`MaskedSDPA` (explicit bool mask); the
    titan baseline uses titan's causal ``ScaledDotProductAttention`` (no document masking).
    """
    if attn_backend == "auto":
        attn_backend = "flex" if torch.cuda.is_available() else "sdpa"
    if attn_backend == "flex":
        return FlexAttention.Config()
    if attn_backend == "sdpa":
        return MaskedSDPA.Config() if dblocks else ScaledDotProductAttention.Config()
    raise ValueError(f"attn_backend must be 'auto', 'flex' or 'sdpa', got {attn_backend!r}.")


def _build(
    *,
    dblocks: bool,
    dim: int,
    n_layers: int,
    n_heads: int,
    vocab_size: int,
    n_kv_heads: int | None = None,
    ffn_multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    rope_theta: float = 500000,
    attn_backend: str = "auto",
) -> Decoder.Config:
    """One shape, two models: the DiffusionBlocks decoder or titan's Llama3Model twin."""
    rope = ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=131072, theta=rope_theta, scaling="none")
    hidden = compute_ffn_hidden_dim(dim, multiple_of=ffn_multiple_of, ffn_dim_multiplier=ffn_dim_multiplier)
    inner = inner_attention_config(attn_backend, dblocks=dblocks)

    def layer(i: int) -> TransformerBlock.Config:
        parts = dict(
            attention_norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
            ffn_norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
            attention=make_gqa_config(
                dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, wqkv_param_init=_LINEAR_INIT,
                wo_param_init=_depth_init(i), inner_attention=inner, fuse_qkv=True, rope=rope,
            ),
            feed_forward=make_ffn_config(
                dim=dim, hidden_dim=hidden, w1_param_init=_LINEAR_INIT, w2w3_param_init=_depth_init(i)
            ),
        )
        if not dblocks:
            return Llama3TransformerBlock.Config(**parts)
        adaln = Linear.Config(in_features=dim, out_features=6 * dim, bias=True, param_init=ZERO_INIT)
        return DBlockLayer.Config(**parts, adaln=adaln)

    head_init = {"weight": nn.init.zeros_} if dblocks else _output_init(dim)
    common = dict(
        dim=dim,
        vocab_size=vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=head_init),
        layers=[layer(i) for i in range(n_layers)],
    )
    if not dblocks:
        return Llama3Model.Config(**common)
    return DBlocksLlama.Config(
        **common,
        t_embedder=TimestepEmbedder.Config(dim=dim),
        final_adaln=Linear.Config(in_features=dim, out_features=2 * dim, bias=True, param_init=ZERO_INIT),
    )


FLAVORS = {
    # CPU-sized: 8 layers of width 128 train at a few steps per second on 2 cores.
    "debugmodel": dict(dim=128, n_layers=8, n_heads=4, vocab_size=4096, ffn_multiple_of=64),
    # The paper's AR model (GPT-2 small shape): 12 layers, d 768, 12 heads, GPT-2 vocab padded to 64.
    "125M": dict(dim=768, n_layers=12, n_heads=12, vocab_size=50304, ffn_multiple_of=256),
    # Llama-3.2-1B / Llama-3.1-8B shapes.
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_multiple_of=1024, ffn_dim_multiplier=1.5),
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_multiple_of=1024, ffn_dim_multiplier=1.3),
}


def _flavor(flavor: str, dblocks: bool, attn_backend: str, vocab_size: int | None) -> Decoder.Config:
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; choose one of {sorted(FLAVORS)}.")
    kwargs = dict(FLAVORS[flavor], attn_backend=attn_backend)
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    return _build(dblocks=dblocks, **kwargs)


def flavor_config(flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None) -> DBlocksLlama.Config:
    """The DiffusionBlocks decoder of a flavor."""
    return _flavor(flavor, True, attn_backend, vocab_size)


def baseline_config(flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None) -> Llama3Model.Config:
    """titan's end-to-end Llama3Model with the same shape as the flavor (the twin of every run)."""
    return _flavor(flavor, False, attn_backend, vocab_size)
