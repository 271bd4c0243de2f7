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
import torch.nn.functional as F

from torchtitan.components.validate import Validator
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger

from dblocks_titan.diffusion import block_t_range, T_MIN, t_to_block


@torch.no_grad()
def nelbo_per_block(
    model, x: torch.Tensor, *, num_blocks: int, mask_id: int, t_samples: int, generator: torch.Generator
) -> torch.Tensor:
    """Σ over the sequences of ``x`` [B, N] of each block's share of the NELBO (nats) → [num_blocks].

    Block b: ``∫_lo^hi f(t) dt ≈ (hi−lo)/K·Σ_k f(t_k)``, ``t_k = lo + (hi−lo)·(k + u_k)/K`` (one
    uniform u_k per sequence: stratified), ``f(t) = (1/t)·Σ_masked −log p``.
    """
    batch = x.shape[0]
    out = torch.zeros(num_blocks, dtype=torch.float64, device=x.device)
    for block in range(num_blocks):
        lo, hi = block_t_range(block, num_blocks)
        for k in range(t_samples):
            u = torch.rand(batch, generator=generator, device=x.device)
            t = (lo + (hi - lo) * (k + u) / t_samples).clamp_min(T_MIN)
            assert bool((t_to_block(t, num_blocks) == block).all()), "t must be evaluated by its owning block"
            masked = torch.rand(x.shape, generator=generator, device=x.device) < t[:, None]
            x_t = torch.where(masked, mask_id, x)
            logits = model(x_t, t=t, block=block)
            nll = F.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="none").view_as(x)
            per_seq = torch.where(masked, nll, 0.0).sum(-1) / t
            out[block] += (hi - lo) / t_samples * per_seq.double().sum()
    return out


class NELBOValidator(Validator):
    """titan Validator for masked-diffusion models: logs the NELBO in nats/token as ``loss``, plus
    bits per token (= BPC for a character-level tokenizer), the perplexity bound, and each block's
    contribution. Evaluates the first ``steps`` batches of its split, so the number is comparable
    across validations and runs."""

    @dataclass(kw_only=True, slots=True)
    class Config(Validator.Config):
        t_samples: int = 8
        """Stratified t per sequence per block."""
        seed: int = 1234
        """Seed of the masks and t draws (fixed: every validation sees the same corruption)."""

    def __init__(self, config: Config, **kwargs):
        if config.steps < 1:
            raise ValueError("validator.steps must be >= 1 for the NELBO validator (a fixed number of batches).")
        super().__init__(config, **kwargs)

    def validate(self, model_parts, step: int) -> dict[str, float]:
        model = model_parts[0]
        model.eval()
        device = next(model.parameters()).device
        num_blocks, mask_id = model.num_blocks, model.mask_id
        generator = torch.Generator(device=device).manual_seed(self.config.seed + self.dp_rank)
        loader = self.dl_config.build(
            dp_world_size=self.dp_world_size, dp_rank=self.dp_rank, tokenizer=self.tokenizer,
            seq_len=self.seq_len, local_batch_size=self.local_batch_size,
        )
        totals = torch.zeros(num_blocks, dtype=torch.float64, device=device)
        tokens = torch.zeros((), dtype=torch.float64, device=device)
        batches = iter(loader)
        with self.validation_context():
            for _ in range(self.config.steps):
                input_dict, _ = next(batches)
                x = input_dict["input"].to(device)
                totals += nelbo_per_block(model, x, num_blocks=num_blocks, mask_id=mask_id,
                                          t_samples=self.config.t_samples, generator=generator)
                tokens += x.numel()
        if self.parallel_dims.dp_enabled:
            mesh = self.parallel_dims.get_mesh("batch")
            totals = dist_utils.dist_sum_tensor(totals, mesh)
            tokens = dist_utils.dist_sum_tensor(tokens, mesh)
        per_block = (totals / tokens).tolist()
        nelbo = sum(per_block)
        metrics = {
            "validation_metrics/bits_per_token": nelbo / math.log(2),
            "validation_metrics/ppl_bound": math.exp(nelbo),
            **{f"validation_metrics/nelbo_block{b}": v for b, v in enumerate(per_block)},
        }
        self.metrics_processor.log_validation(loss=nelbo, step=step, extra_metrics=metrics)
        blocks = "  ".join(f"b{b}={v / math.log(2):.4f}" for b, v in enumerate(per_block))
        logger.info(f"validate step: {step:2}  nelbo: {nelbo:.4f} nats/token = {nelbo / math.log(2):.4f} "
                    f"bits/token (BPC for chars)  per block (bits): {blocks}")
        model.train()
        return {"nelbo": nelbo, "bits_per_token": nelbo / math.log(2), "per_block_bits": [v / math.log(2) for v in per_block]}
