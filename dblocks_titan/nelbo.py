"""Exact masked-diffusion evaluation: the NELBO, split by block (METHOD.md §7).

For α(t) = 1 − t the continuous-time bound is
``NELBO(x) = ∫_0^1 (1/t)·E_{x_t}[Σ_{masked i} −log p_θ(x_i | x_t)] dt``.
The integral splits exactly over the blocks' t ranges [1−(b+1)/B, 1−b/B]; each piece is estimated
with ``t_samples`` stratified t per sequence, every t evaluated by the block that owns it. Divided
by the number of tokens it is nats per token; per character / ln 2 it is BPC.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torchtitan.components.validate import Validator
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger

from dblocks_titan.diffusion import block_t_range, T_MIN, t_to_block
from dblocks_titan.objectives import absorb, masked_nelbo


@torch.no_grad()
def nelbo_per_range(
    model, x: torch.Tensor, *, num_ranges: int, mask_id: int, t_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Σ over the sequences of ``x`` [B, N] of the NELBO (nats) over each of ``num_ranges`` equal t
    ranges → [num_ranges]; range r is block r's range of a B = ``num_ranges`` cut (r = 0: t near 1).

    Range r = [lo, hi]: ``∫_lo^hi f(t) dt ≈ (hi−lo)/K·Σ_k f(t_k)``, ``t_k = lo + (hi−lo)·(k + u_k)/K``
    (one uniform u_k per sequence: stratified), ``f(t) = (1/t)·Σ_masked −log p``; each t is run by
    the block of the model that owns it (``num_ranges`` must be a multiple of the model's B, so a
    range never straddles two blocks).
    """
    if num_ranges % model.num_blocks:
        raise ValueError(f"the NELBO's t ranges ({num_ranges}) must be a multiple of the model's blocks ({model.num_blocks})")
    batch = x.shape[0]
    out = torch.zeros(num_ranges, dtype=torch.float64, device=x.device)
    for r in range(num_ranges):
        lo, hi = block_t_range(r, num_ranges)
        block = r * model.num_blocks // num_ranges
        for k in range(t_samples):
            u = torch.rand(batch, generator=generator, device=x.device)
            t = (lo + (hi - lo) * (k + u) / t_samples).clamp_min(T_MIN)
            assert bool((t_to_block(t, model.num_blocks) == block).all()), "t must be evaluated by its owning block"
            c = absorb(x, t, mask_id=mask_id, generator=generator)
            hidden = model(c.x_t, t=t, block=block, skip_lm_head=True)
            integrand = masked_nelbo(hidden, x, c, lm_head=model.lm_head, mask_id=mask_id, global_valid_tokens=1)
            out[r] += (hi - lo) / t_samples * integrand.double()
    return out


class NELBOValidator(Validator):
    """titan Validator for masked-diffusion models: logs the NELBO in nats/token as ``loss``, plus
    bits per token (= BPC for a character-level tokenizer), the perplexity bound, and each block's
    t range's share (one range per block unless ``t_ranges`` says otherwise). Evaluates the first
    ``steps`` batches of its split (``-1``: the whole split), with fixed masks and t, so the number is
    comparable across validations and runs."""

    @dataclass(kw_only=True, slots=True)
    class Config(Validator.Config):
        t_samples: int = 8
        """Stratified t per sequence per t range."""
        seed: int = 1234
        """Seed of the masks and t draws (fixed: every validation sees the same corruption)."""
        t_ranges: int = 0
        """Report the NELBO split over this many equal t ranges (0: one per block of the model). An
        end-to-end baseline set to its DiffusionBlocks twin's B reports comparable per-range shares."""

    def validate(self, model_parts, step: int) -> dict[str, float]:
        model = model_parts[0]
        model.eval()
        device = next(model.parameters()).device
        num_ranges = self.config.t_ranges or model.num_blocks
        generator = torch.Generator(device=device).manual_seed(self.config.seed + self.dp_rank)
        loader = self.dl_config.build(
            dp_world_size=self.dp_world_size, dp_rank=self.dp_rank, tokenizer=self.tokenizer,
            seq_len=self.seq_len, local_batch_size=self.local_batch_size,
        )
        totals = torch.zeros(num_ranges, dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        with self.validation_context():
            for i, (input_dict, _) in enumerate(loader):
                if i == self.config.steps:
                    break
                x = input_dict["input"].to(device)
                totals += nelbo_per_range(model, x, num_ranges=num_ranges, mask_id=model.mask_id,
                                          t_samples=self.config.t_samples, generator=generator)
                tokens += x.numel()
        if self.parallel_dims.dp_enabled:
            mesh = self.parallel_dims.get_mesh("batch")
            totals = dist_utils.dist_sum_tensor(totals, mesh)
            tokens = dist_utils.dist_sum_tensor(tokens, mesh)
        per_range = (totals / tokens).tolist()
        nelbo = sum(per_range)
        metrics = {
            "validation_metrics/bits_per_token": nelbo / math.log(2),
            "validation_metrics/ppl_bound": math.exp(nelbo),
            **{f"validation_metrics/nelbo_range{b}": v for b, v in enumerate(per_range)},
        }
        self.metrics_processor.log_validation(loss=nelbo, step=step, extra_metrics=metrics)
        ranges = "  ".join(f"r{b}={v / math.log(2):.4f}" for b, v in enumerate(per_range))
        logger.info(f"validate step: {step:2}  nelbo: {nelbo:.4f} nats/token = {nelbo / math.log(2):.4f} "
                    f"bits/token (BPC for chars)  per t range (bits, t≈1 first): {ranges}")
        model.train()
        return {"step": step, "nelbo_nats_per_token": nelbo, "bits_per_token": nelbo / math.log(2),
                "ppl_bound": math.exp(nelbo), "bits_per_token_per_range": [v / math.log(2) for v in per_range],
                "tokens": int(tokens)}
