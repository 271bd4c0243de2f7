"""Masked-diffusion LM (MDLM / MD4, METHOD.md §7) as a DiffusionBlocks model.

A bidirectional transformer with DiT-style adaLN conditioning on the masking level t. Absorbing
diffusion with the linear schedule α(t) = 1 − t: each token of the clean sequence is replaced by
[MASK] with probability t. One call runs ONE block on the corrupted sequence x_t:

1. ``x = E[x_t]``; ``c = SiLU(emb(t))``;
2. the block's L/B adaLN layers, full (bidirectional) attention;
3. shared readout (final norm → final adaLN → head) → logits ``[B, N, V]``;
4. SUBS parameterisation: [MASK] is never predicted (its logit is −∞) and unmasked positions
   carry their token (log-prob 0 on it, −∞ elsewhere). Training and the NELBO stop before the head
   (``skip_lm_head``) and run it only at the masked positions (``objectives.masked_nelbo``).

With ``num_blocks = 1`` this is exactly the end-to-end MDLM baseline (model name ``mdlm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dblocks_titan.models.block_denoiser import BlockDenoiser, Conditioning, decoder_parts, flavor_kwargs, MaskedSDPA


HEAD_POSITIONS_PER_TOKEN = 0.5
"""The training loss runs the head only at masked positions: a fraction t of them, ½ on average
(E[t] = ½ for t ~ U(0, 1), and the mean of the B blocks' symmetric widened ranges is ½ too)."""


class MDLM(BlockDenoiser):
    @dataclass(kw_only=True, slots=True)
    class Config(BlockDenoiser.Config):
        mask_id: int
        """Id of the absorbing [MASK] token (the tokenizer's extra symbol)."""
        end_to_end: bool = False
        """The ``mdlm`` baseline: one block of all layers, whatever ``[dblocks] num_blocks`` says."""

        def update_from_config(self, *, config, **kwargs) -> None:
            dblocks = getattr(config, "dblocks", None)
            if self.end_to_end and dblocks is not None and dblocks.num_blocks != 1:
                raise ValueError(
                    f"model 'mdlm' is the end-to-end baseline (num_blocks = 1), got dblocks.num_blocks="
                    f"{dblocks.num_blocks}; use model 'dblocks_mdlm' to cut it into blocks."
                )
            BlockDenoiser.Config.update_from_config(self, config=config, **kwargs)

        def get_nparams_and_flops(self, model, seq_len: int) -> tuple[int, int]:
            return self.block_flops(model, 1, HEAD_POSITIONS_PER_TOKEN, seq_len)

    def __init__(self, config: Config):
        super().__init__(config)
        self.mask_id = config.mask_id

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        attention_masks=None,
        *,
        t: torch.Tensor,
        block: int = 0,
        skip_lm_head: bool = False,
    ) -> torch.Tensor:
        """SUBS log-probabilities' logits [B, N, V] for the corrupted ``tokens`` x_t [B, N] at
        masking level ``t`` [B], running only ``block``'s layers (``skip_lm_head``: the head's input
        [B, N, D], for :func:`dblocks_titan.objectives.masked_nelbo`)."""
        batch, n = tokens.shape
        if positions is None:
            positions = torch.arange(n, device=tokens.device).expand(batch, n)
        c = self.conditioning(t.float())
        x = self.run_block(self.tok_embeddings(tokens), c, block, attention_masks, positions)
        if skip_lm_head:
            return self.readout(x, c, skip_lm_head=True)
        logits = self.readout(x, c).float()
        return subs(logits, tokens, self.mask_id)


def subs(logits: torch.Tensor, x_t: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS parameterisation: −∞ on [MASK]; an unmasked position becomes one-hot on its token."""
    neg_inf = torch.finfo(logits.dtype).min
    logits = logits.clone()
    logits[..., mask_id] = neg_inf
    unmasked = x_t != mask_id
    carry = torch.full_like(logits, neg_inf).scatter_(-1, x_t.unsqueeze(-1), 0.0)
    return torch.where(unmasked.unsqueeze(-1), carry, logits)


FLAVORS = {
    # CPU-sized: 6 layers of width 128 (B ∈ {1, 2, 3, 6}); 27 characters + [MASK].
    "debugmodel": dict(dim=128, n_layers=6, n_heads=4, vocab_size=28, ffn_multiple_of=64),
    # The paper's text8 model (MD4): 12 layers, d 768, 12 heads, seq 256.
    "text8": dict(dim=768, n_layers=12, n_heads=12, vocab_size=28, ffn_multiple_of=256),
    # OpenWebText: GPT-2 BPE (50257 tokens) + [MASK] = 50257, padded to 50304; seq 1024.
    "owt": dict(dim=768, n_layers=12, n_heads=12, vocab_size=50304, ffn_multiple_of=256),
}
MASK_IDS = {"debugmodel": 27, "text8": 27, "owt": 50257}


def mdlm_config(
    flavor: str, *, end_to_end: bool, vocab_size: int | None = None, n_layers: int | None = None,
    mask_id: int | None = None, conditioning: Conditioning | None = None,
) -> MDLM.Config:
    """The masked-diffusion model of a flavor; bidirectional SDPA (flash on GPU), no mask."""
    parts = decoder_parts(adaln=True, inner_attention=MaskedSDPA.Config(), conditioning=conditioning, time_scale=1000.0,
                          **flavor_kwargs(FLAVORS, flavor, vocab_size, n_layers))
    return MDLM.Config(**parts, mask_id=MASK_IDS[flavor] if mask_id is None else mask_id, end_to_end=end_to_end)
