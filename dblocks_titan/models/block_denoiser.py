"""What every DiffusionBlocks model shares (METHOD.md §5): a torchtitan ``Decoder`` whose layers
are adaLN-conditioned and cut into ``num_blocks`` blocks, a shared timestep embedder, and a shared
readout (final norm → final adaLN → head). The AR model (``dblocks_llama``) and the masked-diffusion
model (``mdlm``) differ only in what goes in and how the noise level is encoded.

The layout stays titan's (``tok_embeddings``, ``layers``, ``norm``, ``lm_head``), so titan's
activation checkpointing, per-layer compile and per-layer FSDP2 apply unchanged.
"""

from __future__ import annotations

import dataclasses
import math
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
from dblocks_titan.models.conditioning import (
    AdaLNTable,
    default_cond_dim,
    modulate,
    TABLE_INIT,
    TimestepEmbedder,
    ZERO_INIT,
)

ADALN_KINDS = ("per_layer", "single")
DEPTH_INITS = ("global", "per_block")


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
    normalised x and the modulated product. x [B, L, D]; shift, scale [B, D] (every row alike) or
    [B, G, D] (:func:`by_group`). The norm's weight is read directly, so call it only where the norm's
    parameters are materialised (inside the owning layer's forward under FSDP)."""
    eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
    if shift.dim() == 3:
        return _ModulatedRMSNorm.apply(by_group(x, shift), norm.weight, shift.flatten(0, 1), scale.flatten(0, 1),
                                       eps).view_as(x)
    return _ModulatedRMSNorm.apply(x, norm.weight, shift, scale, eps)


def by_group(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] viewed as [B·G, L/G, D] for a per-group vector v [B, G, D]: the L rows are G equal,
    contiguous groups (the AR layout's clean and noisy halves), each conditioned by its own vector."""
    batch, groups = v.shape[:2]
    return x.reshape(batch * groups, x.shape[1] // groups, x.shape[2])


def gated(x: torch.Tensor, gate: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x + gate·out`` with gate [B, D] (every row) or [B, G, D] (per group of rows, :func:`by_group`)."""
    if gate.dim() == 3:
        return (by_group(x, gate) + gate.flatten(0, 1)[:, None] * by_group(out, gate)).view_as(x)
    return x + gate[:, None] * out


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
    attn: nn.Module, x: torch.Tensor, cache: KVCache, positions: torch.Tensor, keep: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """titan's ``GQAttention.forward`` for m new rows that follow the S rows held in ``cache``.

    1. q, k, v = qkv_linear(x) (fused or not; QK-norm if the layer has it), RoPE at ``positions``.
    2. Keys/values = [cached S rows | new m rows]; new row r sees keys s ≤ S + r (all cached rows,
       the new rows causally), so each row sees exactly what it sees in the full sequence when the
       cache holds its visible prefix. ``mask`` [(B, 1,) m, S + m] (bool, True = seen), if given,
       says instead which keys each new row sees.
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
    if mask is None and m > 1:
        mask = torch.arange(start + m, device=x.device) <= start + torch.arange(m, device=x.device)[:, None]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=attn.scaling,
        enable_gqa=attn.enable_gqa,
    )
    return attn.wo(out.transpose(1, 2).flatten(2))


class DBlockLayer(TransformerBlock):
    """llama3 layer with adaLN: ``x += gate·Attn(norm(x)·(1+scale)+shift)``, same for the MLP.

    The six modulation vectors come from the layer's conditioning input ``c``:
    - ``adaln`` (per-layer adaLN): a Linear C → 6·dim of the conditioning vector c [B, C];
    - ``adaln_table`` (adaLN-single): ``c`` is already the shared Linear's output m [B, 6·dim], and the
      layer adds its own table (:class:`AdaLNTable`).
    Both are zero-initialised, so with ``gate_init = 0`` (adaLN-Zero) the layer starts as the identity;
    ``gate_init = g`` offsets both gates by g (g = 1: the layer starts as a plain pre-norm llama3 layer).
    ``c`` [B, ·] conditions every row; [B, G, ·] conditions G equal groups of rows (:func:`by_group`).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(TransformerBlock.Config):
        adaln: Linear.Config | None = None
        adaln_table: AdaLNTable.Config | None = None
        gate_init: float = 0.0

    def __init__(self, config: Config):
        super().__init__()
        if (config.adaln is None) == (config.adaln_table is None):
            raise ValueError("a DBlockLayer has exactly one of adaln (per-layer) and adaln_table (adaLN-single)")
        self.attention = config.attention.build()
        self.feed_forward = config.feed_forward.build()
        self.attention_norm = config.attention_norm.build()
        self.ffn_norm = config.ffn_norm.build()
        self.adaln = None if config.adaln is None else config.adaln.build()
        self.adaln_table = None if config.adaln_table is None else config.adaln_table.build()
        self.gate_init = config.gate_init

    def forward(self, x, c, attention_masks, positions):
        """x [B, L, D]; c [B, (G,) C] (SiLU'd conditioning, or adaLN-single's m); positions [B, L]."""
        return self._modulated(x, c, lambda h: self.attention(h, attention_masks, positions))

    def forward_cached(self, x, c, cache: KVCache, positions, keep: int, mask=None):
        """:meth:`forward` for m new rows after the rows in ``cache`` (:func:`cached_attention`: new
        row r attends to the cached rows and new rows ≤ r, or to the keys ``mask`` says; the first
        ``keep`` rows are cached). x [B, m, D]; c [B, (G,) C]; positions [1 or B, m]."""
        return self._modulated(x, c, lambda h: cached_attention(self.attention, h, cache, positions, keep, mask))

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(shift_a, scale_a, gate_a, shift_m, scale_m, gate_m), each [B, (G,) dim]."""
        m = self.adaln(c) if self.adaln is not None else self.adaln_table(c)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = m.chunk(6, dim=-1)
        return shift_a, scale_a, gate_a + self.gate_init, shift_m, scale_m, gate_m + self.gate_init

    def _modulated(self, x, c, attend):
        """The adaLN layer body around ``attend`` (normed, modulated x → the attention's output)."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(c)
        x = gated(x, gate_a, attend(modulated_norm(self.attention_norm, x, shift_a, scale_a)))
        return gated(x, gate_m, self.feed_forward(modulated_norm(self.ffn_norm, x, shift_m, scale_m)))


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


ADALN_MODULES = ("adaln", "adaln_table")
"""Names of a layer's conditioning parts (per-layer adaLN Linear, adaLN-single table)."""


def layer_params_without_adaln(layer: nn.Module) -> int:
    """Parameters of one layer, its conditioning (:data:`ADALN_MODULES`) excluded (names may carry
    compile / AC wrapper prefixes)."""
    return sum(p.numel() for name, p in layer.named_parameters() if not set(name.split(".")) & set(ADALN_MODULES))


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
        adaln_single: Linear.Config | None = None
        """adaLN-single's shared modulation Linear C → 6·dim (None: every layer has its own adaLN)."""
        num_blocks: int = 1
        """Set from ``[dblocks] num_blocks`` by ``update_from_config``."""
        depth_init: str = "global"
        """Depth-scaled init of each layer's output projections: by its index in the whole stack
        (``global``) or inside its block (``per_block``: every block starts as its own L/B-layer network)."""

        def update_from_config(self, *, config, **kwargs) -> None:
            Decoder.Config.update_from_config(self, config=config, **kwargs)
            dblocks = getattr(config, "dblocks", None)
            if dblocks is not None:
                self.num_blocks = dblocks.num_blocks
            check_num_blocks(len(self.layers), self.num_blocks)
            if self.depth_init == "per_block":
                per_block = len(self.layers) // self.num_blocks
                self.layers = [with_depth_init(layer, i % per_block) for i, layer in enumerate(self.layers)]

        def block_flops(self, model: nn.Module, positions_per_token: int, head_positions_per_token: int, seq_len: int):
            """(nparams, FLOPs per input token of one step with one block active), counting what runs:
            :func:`layer_flops_per_token` + ``6·(h·P_head + P_once/N)`` with h positions per input token
            at the head and P_once the linears run once per sample (the block's adaLNs, the final adaLN,
            the time embedder)."""
            nparams = sum(p.numel() for p in model.parameters())
            layer = next(iter(model.layers.values()))
            adaln_params = sum(p.numel() for name in ADALN_MODULES if getattr(layer, name, None) is not None
                               for p in getattr(layer, name).parameters())
            block_layers = len(self.layers) // self.num_blocks
            shared_conditioning = (model.final_adaln, model.t_embedder) + (
                () if model.adaln_single is None else (model.adaln_single,))
            once = block_layers * adaln_params + sum(p.numel() for m in shared_conditioning for p in m.parameters())
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
        self.adaln_single = None if config.adaln_single is None else config.adaln_single.build()
        self.num_blocks = config.num_blocks
        self.n_layers = len(config.layers)  # block-parallel ranks hold only their block's layers

    def block_layers(self, block: int) -> list[nn.Module]:
        """The L/B layers of ``block`` (block 0 = the first layers = the noisiest range)."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be in [0, {self.num_blocks}), got {block}.")
        per_block = self.n_layers // self.num_blocks
        return [self.layers[str(i)] for i in range(block * per_block, (block + 1) * per_block)]

    def block_module_names(self, block: int) -> list[str]:
        """Names of the modules that belong to ``block`` alone (trained only when it trains): its layers.
        Everything outside every block's modules is shared."""
        per_block = self.n_layers // self.num_blocks
        return [f"layers.{i}" for i in range(block * per_block, (block + 1) * per_block)]

    def is_block_parameter(self, name: str) -> bool:
        """Whether the parameter ``name`` belongs to one block (see :meth:`block_module_names`)."""
        return any(name.startswith(m + ".") for b in range(self.num_blocks) for m in self.block_module_names(b))

    def conditioning(self, noise_label: torch.Tensor) -> torch.Tensor:
        """``c = SiLU(emb(noise_label))`` [B, C] (noise_label [B]), fed to the adaLNs."""
        return F.silu(self.t_embedder(noise_label))

    def layer_conditioning(self, c: torch.Tensor) -> torch.Tensor:
        """What the layers consume: c itself (per-layer adaLN), or adaLN-single's shared m = W·c [.., 6·dim],
        computed once for all the block's layers."""
        return c if self.adaln_single is None else self.adaln_single(c)

    def run_block(self, x, c, block: int, attention_masks, positions) -> torch.Tensor:
        """``block``'s layers on x [B, L, D] conditioned by c [B, (G,) C]."""
        c = self.layer_conditioning(c)
        for layer in self.block_layers(block):
            x = layer(x, c, attention_masks, positions)
        return x

    def run_block_cached(self, x, c, block: int, caches: list[KVCache], positions, keep: int) -> torch.Tensor:
        """:meth:`run_block` for new rows after the cached ones (one :class:`KVCache` per layer of
        ``block``, see :meth:`DBlockLayer.forward_cached`)."""
        c = self.layer_conditioning(c)
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


def with_depth_init(layer: TransformerBlock.Config, layer_id: int) -> TransformerBlock.Config:
    """``layer`` with the depth-scaled init of layer ``layer_id`` on its output projections (attention
    ``wo``, MLP ``w2``/``w3``; std 0.02/√(2·(layer_id + 1)))."""
    init = _depth_init(layer_id)
    attention, ffn = layer.attention, layer.feed_forward
    return dataclasses.replace(
        layer,
        attention=dataclasses.replace(attention, wo=dataclasses.replace(attention.wo, param_init=init)),
        feed_forward=dataclasses.replace(ffn, w2=dataclasses.replace(ffn.w2, param_init=init),
                                         w3=dataclasses.replace(ffn.w3, param_init=init)),
    )


@dataclass(frozen=True)
class Conditioning:
    """How the noise level reaches the layers of every DiffusionBlocks model (``[model]`` keys).

    - ``cond_dim``: width C of the conditioning vector ``c = SiLU(emb(noise label))`` (None: the
      authors' ``dim // 6`` rounded up to a multiple of 64, :func:`default_cond_dim`);
    - ``adaln``: ``per_layer`` (each layer a Linear C → 6·dim: 6·C·dim parameters per layer) or
      ``single`` (adaLN-single, PixArt-α: one shared Linear C → 6·dim for the whole model plus a
      learned 6·dim table per layer);
    - ``gate_init``: the adaLN gates' value at initialisation (0: adaLN-Zero, every layer starts as the
      identity; 1: as a plain pre-norm layer);
    - ``time_scale``: the timestep embedder's factor on the noise label (None: the model's own —
      1 for the AR models' c_noise = ¼·ln σ, as EDM and the authors feed it; 1000 for masked
      diffusion's t ∈ [0, 1], as DiT/flux scale it);
    - ``depth_init``: ``global`` | ``per_block`` depth-scaled init of the output projections.
    """

    cond_dim: int | None = None
    adaln: str = "per_layer"
    gate_init: float = 0.0
    time_scale: float | None = None
    depth_init: str = "global"

    def __post_init__(self):
        if self.cond_dim is not None and (isinstance(self.cond_dim, bool) or not isinstance(self.cond_dim, int)
                                          or self.cond_dim < 8 or self.cond_dim % 8):
            raise ValueError(f"[model] cond_dim must be a positive multiple of 8 (or unset), got {self.cond_dim!r}")
        if self.adaln not in ADALN_KINDS:
            raise ValueError(f"[model] adaln must be one of {ADALN_KINDS}, got {self.adaln!r}")
        if self.depth_init not in DEPTH_INITS:
            raise ValueError(f"[model] depth_init must be one of {DEPTH_INITS}, got {self.depth_init!r}")
        for key in ("gate_init", "time_scale"):
            value = getattr(self, key)
            if value is None and key == "time_scale":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"[model] {key} must be a finite number, got {value!r}")
        if self.time_scale is not None and self.time_scale <= 0:
            raise ValueError(f"[model] time_scale must be > 0, got {self.time_scale}")

    def width(self, dim: int) -> int:
        return default_cond_dim(dim) if self.cond_dim is None else self.cond_dim


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
    conditioning: Conditioning | None = None,
    time_scale: float = 1.0,
) -> dict:
    """Decoder.Config fields of a llama3-shaped stack: adaLN layers with a zero-init head and the
    shared denoiser parts (``adaln=True``, shaped by ``conditioning``; ``time_scale``: the model's
    own factor on its noise label, unless the conditioning sets one), or plain llama3 layers
    (titan's e2e twin)."""
    cond = conditioning or Conditioning()
    cond_dim = cond.width(dim)
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
        if cond.adaln == "single":
            return DBlockLayer.Config(**parts, adaln_table=AdaLNTable.Config(dim=dim, param_init=TABLE_INIT),
                                      gate_init=cond.gate_init)
        return DBlockLayer.Config(
            **parts, adaln=Linear.Config(in_features=cond_dim, out_features=6 * dim, bias=True, param_init=ZERO_INIT),
            gate_init=cond.gate_init,
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
        scale = time_scale if cond.time_scale is None else cond.time_scale
        parts["t_embedder"] = TimestepEmbedder.Config(dim=cond_dim, time_scale=scale)
        parts["final_adaln"] = Linear.Config(in_features=cond_dim, out_features=2 * dim, bias=True, param_init=ZERO_INIT)
        parts["depth_init"] = cond.depth_init
        if cond.adaln == "single":
            parts["adaln_single"] = Linear.Config(in_features=cond_dim, out_features=6 * dim, bias=True,
                                                  param_init=ZERO_INIT)
    return parts


def resolve_attn_backend(attn_backend: str) -> str:
    """"auto" → "flex" when CUDA is available, else "sdpa"."""
    if attn_backend == "auto":
        return "flex" if torch.cuda.is_available() else "sdpa"
    if attn_backend not in ("flex", "sdpa"):
        raise ValueError(f"attn_backend must be 'auto', 'flex' or 'sdpa', got {attn_backend!r}.")
    return attn_backend


def flavor_kwargs(flavors: dict, flavor: str, vocab_size: int | None, n_layers: int | None = None) -> dict:
    """The shape of ``flavor``, with ``[model] vocab_size`` / ``n_layers`` overriding the flavor's."""
    if flavor not in flavors:
        raise ValueError(f"unknown flavor {flavor!r}; choose one of {sorted(flavors)}.")
    kwargs = dict(flavors[flavor])
    for key, value in (("vocab_size", vocab_size), ("n_layers", n_layers)):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"[model] {key} must be an integer >= 1, got {value!r}")
            kwargs[key] = value
    return kwargs
