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

import torch
import torch.nn.functional as F

from torchtitan.models.common import FlexAttention, ScaledDotProductAttention
from torchtitan.models.common.attention import create_attention_mask
from torchtitan.models.llama3.model import Llama3Model

from dblocks_titan.diffusion import EDMConfig, precondition
from dblocks_titan.models.block_denoiser import (
    BlockDenoiser,
    check_num_blocks,  # noqa: F401  (re-exported for callers of this module)
    decoder_parts,
    flavor_kwargs,
    MaskedSDPA,
    resolve_attn_backend,
)


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
            """The block's layers see 2N positions per N input tokens; the head sees the N noisy ones."""
            return self.block_flops(model, 2, 1, seq_len)

    def __init__(self, config: Config):
        super().__init__(config)
        self.edm = config.edm
        self.eval_seed = config.eval_seed
        self._mask_cache: tuple | None = None

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
        c = self.conditioning(c_noise.flatten())
        x = self.run_block(x, c, block, attention_masks, pos2)

        h = self.norm(x[:, n:])
        denoised = c_skip * z + c_out * h.float()
        return self.readout(denoised.to(h.dtype), c)


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


def flavor_config(flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None) -> DBlocksLlama.Config:
    """The AR DiffusionBlocks decoder of a flavor: FlexAttention + BlockMask ("flex", GPU) or
    SDPA with the dense bool mask ("sdpa", CPU)."""
    inner = FlexAttention.Config() if resolve_attn_backend(attn_backend) == "flex" else MaskedSDPA.Config()
    return DBlocksLlama.Config(**decoder_parts(adaln=True, inner_attention=inner, **flavor_kwargs(FLAVORS, flavor, vocab_size)))


def baseline_config(flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None) -> Llama3Model.Config:
    """titan's end-to-end Llama3Model with the flavor's shape (the twin of every AR run): titan's
    FlexAttention with block-causal masks on a GPU, its causal SDPA on CPU."""
    flex = resolve_attn_backend(attn_backend) == "flex"
    inner = FlexAttention.Config() if flex else ScaledDotProductAttention.Config()
    return Llama3Model.Config(**decoder_parts(adaln=False, inner_attention=inner, **flavor_kwargs(FLAVORS, flavor, vocab_size)))
