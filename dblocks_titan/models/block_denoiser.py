"""What every DiffusionBlocks model shares (METHOD.md §5): a torchtitan ``Decoder`` whose layers
are adaLN-conditioned and cut into ``num_blocks`` blocks, a shared timestep embedder, and a shared
readout (final norm → final adaLN → head). The AR model (``dblocks_llama``) and the masked-diffusion
model (``mdlm``) differ only in what goes in and how the noise level is encoded.

The layout stays titan's (``tok_embeddings``, ``layers``, ``norm``, ``lm_head``), so titan's
activation checkpointing, per-layer compile and per-layer FSDP2 apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan.models.common import (
    ComplexRoPE,
    compute_ffn_hidden_dim,
    Decoder,
    Embedding,
    Linear,
    RMSNorm,
    TransformerBlock,
)
from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
from torchtitan.models.common.param_init import depth_scaled_std
from torchtitan.models.llama3.model import Llama3TransformerBlock
from torchtitan.protocols.module import Module

from dblocks_titan import compat
from dblocks_titan.models.conditioning import modulate, TimestepEmbedder, ZERO_INIT


class MaskedSDPA(Module):
    """Inner attention: ``F.scaled_dot_product_attention`` with an optional explicit mask (``None`` =
    bidirectional, what the masked-diffusion models use). titan's ``ScaledDotProductAttention`` is
    causal unless its caller passes ``is_causal=False``, which titan's attention module does not."""

    @dataclass(kw_only=True, slots=True)
    class Config(Module.Config):
        pass

    def __init__(self, config: Config):
        super().__init__()

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks, scale=None, enable_gqa=False, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (q_BLNH, k_BLNH, v_BLNH))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_masks, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)


class _ModulatedRMSNorm(torch.autograd.Function):
    """``y = x·r·w·(1 + scale) + shift`` with ``r = 1/√(mean(x²) + eps)`` over the last dim, saving
    only x and r (x·r is recomputed in backward). Backward, with ``u = x·r·w`` and
    ``g = dy·(1 + scale)·w``: dshift = Σ_L dy; dscale = Σ_L dy·u; dw = Σ_{B,L} dy·(1 + scale)·x·r;
    dx = r·(g − x·r·mean(g·x·r)). Computed in fp32, returned in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, shift, scale, eps):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        y = (xf * r) * weight.float() * (1 + scale.float()[:, None]) + shift.float()[:, None]
        ctx.save_for_backward(x, r, weight, scale)
        ctx.shift_dtype = shift.dtype
        return compat.cast(y, x.dtype)  # not a no-op .to: torch 2.11's compile would drop the gradients

    @staticmethod
    def backward(ctx, dy):
        x, r, weight, scale = ctx.saved_tensors
        dy, w, s1 = dy.float(), weight.float(), 1 + scale.float()[:, None]
        x_hat = x.float() * r
        dy_s = dy * s1
        g = dy_s * w
        dx = r * (g - x_hat * (g * x_hat).mean(-1, keepdim=True))
        dw = (dy_s * x_hat).sum((0, 1))
        dscale = (dy * x_hat * w).sum(1)
        dshift = dy.sum(1)
        return dx.to(x.dtype), dw.to(weight.dtype), dshift.to(ctx.shift_dtype), dscale.to(scale.dtype), None


def modulated_norm(norm: nn.RMSNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``modulate(norm(x), shift, scale)`` as one op: autograd keeps x and 1/rms instead of x, the
    normalised x and the modulated product (x [B, L, D]; shift, scale [B, D]). The norm's weight is
    read directly, so call it only where the norm's parameters are materialised (inside the owning
    layer's forward under FSDP)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    return _ModulatedRMSNorm.apply(x, norm.weight, shift, scale, eps)


@dataclass
class KVCache:
    """One layer's cached rows at one noise level: rotated keys and values [B, S, N_kv, H] (``None``
    while empty). :meth:`DBlockLayer.forward_cached` appends to it."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[1]


def cached_attention(
    attn: nn.Module, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, keep: int
) -> torch.Tensor:
    """titan's ``GQAttention.forward`` for m new rows that follow the S rows held in ``cache``.

    1. q, k, v = qkv_linear(x) (fused or not; QK-norm if the layer has it), RoPE at ``positions``.
    2. Keys/values = [cached S rows | new m rows]; new row r sees keys s ≤ S + r (all cached rows,
       the new rows causally), so each row sees exactly what it sees in the full sequence when the
       cache holds its visible prefix.
    3. The first ``keep`` new rows' keys/values are appended to the cache; ``wo`` of the output.

    x [B, m, D]; positions [1 or B, m] → [B, m, D].
    """
    q, k, v = attn.qkv_linear(x)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = attn.rope(q, k, positions)
    start, m = cache.length, x.shape[1]
    if start:
        k, v = torch.cat([cache.k, k], dim=1), torch.cat([cache.v, v], dim=1)
    cache.k, cache.v = k[:, : start + keep], v[:, : start + keep]
    mask = None
    if m > 1:
        mask = torch.arange(start + m, device=x.device) <= start + torch.arange(m, device=x.device)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=attn.scaling,
        enable_gqa=attn.enable_gqa,
    )
    return attn.wo(out.transpose(1, 2).flatten(2))


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
        """x [B, L, D]; c [B, D] (already SiLU'd); positions [B, L]."""
        return self._modulated(x, c, lambda h: self.attention(h, attention_masks, positions))

    def forward_cached(self, x, c, cache: KVCache, positions, keep: int):
        """:meth:`forward` for m new rows after the rows in ``cache`` (:func:`cached_attention`: new
        row r attends to the cached rows and new rows ≤ r; the first ``keep`` rows are cached).
        x [B, m, D]; c [B, D]; positions [1 or B, m]."""
        return self._modulated(x, c, lambda h: cached_attention(self.attention, h, cache, positions, keep))

    def _modulated(self, x, c, attend):
        """The adaLN layer body around ``attend`` (normed, modulated x → the attention's output)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * attend(modulated_norm(self.attention_norm, x, shift_a, scale_a))
        h = modulated_norm(self.ffn_norm, x, shift_m, scale_m)
        return x + gate_m[:, None] * self.feed_forward(h)


def layer_flops_per_token(
    *, n_layers: int, num_blocks: int, positions_per_token: int, layer_params: int, n_heads: int, head_dim: int,
    seq_len: int,
) -> int:
    """Forward + backward FLOPs of the transformer layers that run for one input token in one step:

        (L/B) · p · (6·P_layer + 12·H·d·p·N)

    L layers cut into B blocks (B = 1 end to end), of which one block runs; p positions per input token
    in the layers (2 for the AR DiffusionBlocks layout [clean | noisy], else 1); P_layer one layer's
    parameters without its adaLN (that Linear runs once per sample, not per position: 6·P_adaLN per
    sample, under 1% of a layer at N ≥ 128); H heads of d dims; N = seq_len. The attention term is
    titan's convention (``get_dense_model_nparams_and_flops``):
    each of the p·N queries against p·N keys, no causal sparsity.
    """
    p = positions_per_token
    return n_layers // num_blocks * p * (6 * layer_params + 12 * n_heads * head_dim * p * seq_len)


def layer_params_without_adaln(layer: nn.Module) -> int:
    """Parameters of one layer, its ``adaln`` Linear excluded (names may carry compile / AC wrapper prefixes)."""
    return sum(p.numel() for name, p in layer.named_parameters() if "adaln" not in name.split("."))


def check_num_blocks(n_layers: int, num_blocks: int) -> None:
    if num_blocks < 1 or n_layers % num_blocks != 0:
        raise ValueError(
            f"dblocks.num_blocks={num_blocks} must divide the model's n_layers={n_layers} "
            f"(choose one of {[b for b in range(1, n_layers + 1) if n_layers % b == 0]})."
        )


class BlockDenoiser(Decoder):
    """A Decoder cut into ``num_blocks`` blocks of adaLN layers, with a shared conditioning path."""

    @dataclass(kw_only=True, slots=True)
    class Config(Decoder.Config):
        t_embedder: TimestepEmbedder.Config
        final_adaln: Linear.Config
        num_blocks: int = 1
        """Set from ``[dblocks] num_blocks`` by ``update_from_config``."""

        def update_from_config(self, *, config, **kwargs) -> None:
            Decoder.Config.update_from_config(self, config=config, **kwargs)
            dblocks = getattr(config, "dblocks", None)
            if dblocks is not None:
                self.num_blocks = dblocks.num_blocks
            check_num_blocks(len(self.layers), self.num_blocks)

        def block_flops(self, model: nn.Module, positions_per_token: int, head_positions_per_token: int, seq_len: int):
            """(nparams, FLOPs per input token of one step with one block active), counting what runs:
            :func:`layer_flops_per_token` + ``6·(h·P_head + P_once/N)`` with h positions per input token
            at the head and P_once the linears run once per sample (the block's adaLNs, the final adaLN,
            the time embedder)."""
            nparams = sum(p.numel() for p in model.parameters())
            layer = next(iter(model.layers.values()))
            adaln_params = sum(p.numel() for p in layer.adaln.parameters())
            block_layers = len(self.layers) // self.num_blocks
            once = block_layers * adaln_params + sum(
                p.numel() for m in (model.final_adaln, model.t_embedder) for p in m.parameters()
            )
            n_heads = layer.attention.n_heads
            flops = layer_flops_per_token(
                n_layers=len(self.layers), num_blocks=self.num_blocks, positions_per_token=positions_per_token,
                layer_params=layer_params_without_adaln(layer), n_heads=n_heads, head_dim=self.dim // n_heads,
                seq_len=seq_len,
            )
            flops += 6 * head_positions_per_token * self.dim * self.vocab_size + 6 * once / seq_len
            return nparams, int(flops)

    def __init__(self, config: Config):
        super().__init__(config)
        self.t_embedder = config.t_embedder.build()
        self.final_adaln = config.final_adaln.build()
        self.num_blocks = config.num_blocks
        self.n_layers = len(config.layers)  # block-parallel ranks hold only their block's layers

    def block_layers(self, block: int) -> list[nn.Module]:
        """The L/B layers of ``block`` (block 0 = the first layers = the noisiest range)."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in [0, {self.num_blocks}), got {block}.")
        per_block = self.n_layers // self.num_blocks
        return [self.layers[str(i)] for i in range(block * per_block, (block + 1) * per_block)]

    def conditioning(self, noise_label: torch.Tensor) -> torch.Tensor:
        """``c = SiLU(emb(noise_label))`` [B, D], fed to every adaLN."""
        return F.silu(self.t_embedder(noise_label))

    def run_block(self, x, c, block: int, attention_masks, positions) -> torch.Tensor:
        for layer in self.block_layers(block):
            x = layer(x, c, attention_masks, positions)
        return x

    def run_block_cached(self, x, c, block: int, caches: list[KVCache], positions, keep: int) -> torch.Tensor:
        """:meth:`run_block` for new rows after the cached ones (one :class:`KVCache` per layer of
        ``block``, see :meth:`DBlockLayer.forward_cached`)."""
        for layer, cache in zip(self.block_layers(block), caches, strict=True):
            x = layer.forward_cached(x, c, cache, positions, keep)
        return x

    def readout(self, x: torch.Tensor, c: torch.Tensor, skip_lm_head: bool = False) -> torch.Tensor:
        """Shared final norm → final adaLN (shift/scale, zero-init) → head (zero-init) → logits.
        ``skip_lm_head``: return the head's input (for a loss that applies the head in chunks)."""
        shift, scale = self.final_adaln(c).chunk(2, dim=-1)
        h = modulate(self.norm(x), shift, scale)
        return h if skip_lm_head else self.lm_head(h)


# --------------------------------------------------------------------------------------------
# Shapes: one builder for every model of this package and for titan's llama3 twin
# --------------------------------------------------------------------------------------------

_LINEAR_INIT = {"weight": partial(nn.init.trunc_normal_, std=0.02), "bias": nn.init.zeros_}
_NORM_INIT = {"weight": nn.init.ones_}
_EMBEDDING_INIT = {"weight": partial(nn.init.normal_, std=1.0)}


def _output_init(dim: int) -> dict:
    s = dim**-0.5
    return {"weight": partial(nn.init.trunc_normal_, std=s, a=-3 * s, b=3 * s)}


def _depth_init(layer_id: int) -> dict:
    return {"weight": partial(nn.init.trunc_normal_, std=depth_scaled_std(0.02, layer_id)), "bias": nn.init.zeros_}


def decoder_parts(
    *,
    adaln: bool,
    inner_attention: Module.Config,
    dim: int,
    n_layers: int,
    n_heads: int,
    vocab_size: int,
    n_kv_heads: int | None = None,
    ffn_multiple_of: int = 256,
    ffn_dim_multiplier: float | None = None,
    rope_theta: float = 500000,
) -> dict:
    """Decoder.Config fields of a llama3-shaped stack: adaLN layers with a zero-init head and the
    shared denoiser parts (``adaln=True``), or plain llama3 layers (titan's e2e twin)."""
    rope = ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=131072, theta=rope_theta, scaling="none")
    hidden = compute_ffn_hidden_dim(dim, multiple_of=ffn_multiple_of, ffn_dim_multiplier=ffn_dim_multiplier)

    def layer(i: int) -> TransformerBlock.Config:
        parts = dict(
            attention_norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
            ffn_norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
            attention=make_gqa_config(
                dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, wqkv_param_init=_LINEAR_INIT,
                wo_param_init=_depth_init(i), inner_attention=inner_attention, fuse_qkv=True, rope=rope,
            ),
            feed_forward=make_ffn_config(
                dim=dim, hidden_dim=hidden, w1_param_init=_LINEAR_INIT, w2w3_param_init=_depth_init(i)
            ),
        )
        if not adaln:
            return Llama3TransformerBlock.Config(**parts)
        return DBlockLayer.Config(
            **parts, adaln=Linear.Config(in_features=dim, out_features=6 * dim, bias=True, param_init=ZERO_INIT)
        )

    parts = dict(
        dim=dim,
        vocab_size=vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(
            in_features=dim, out_features=vocab_size,
            param_init={"weight": nn.init.zeros_} if adaln else _output_init(dim),
        ),
        layers=[layer(i) for i in range(n_layers)],
    )
    if adaln:
        parts["t_embedder"] = TimestepEmbedder.Config(dim=dim)
        parts["final_adaln"] = Linear.Config(in_features=dim, out_features=2 * dim, bias=True, param_init=ZERO_INIT)
    return parts


def resolve_attn_backend(attn_backend: str) -> str:
    """"auto" → "flex" when CUDA is available, else "sdpa"."""
    if attn_backend == "auto":
        return "flex" if torch.cuda.is_available() else "sdpa"
    if attn_backend not in ("flex", "sdpa"):
        raise ValueError(f"attn_backend must be 'auto', 'flex' or 'sdpa', got {attn_backend!r}.")
    return attn_backend


def flavor_kwargs(flavors: dict, flavor: str, vocab_size: int | None) -> dict:
    if flavor not in flavors:
        raise ValueError(f"unknown flavor {flavor!r}; choose one of {sorted(flavors)}.")
    kwargs = dict(flavors[flavor])
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    return kwargs
