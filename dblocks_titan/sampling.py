"""Samplers that chain the blocks (METHOD.md §7; the AR sampler of §6 comes with the eval issue)."""

from __future__ import annotations

import torch

from dblocks_titan.diffusion import t_to_block


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
