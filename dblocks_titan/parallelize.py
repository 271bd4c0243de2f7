"""Parallelisms for DiffusionBlocks models, applied as functions over the plain model.

The model keeps titan's Decoder layout (``tok_embeddings``, ``layers``, ``norm``, ``lm_head``),
so titan's llama3 recipe applies unchanged, in titan's order: activation checkpointing on each
layer, per-layer ``torch.compile``, then FSDP2 with every transformer layer its own FSDP unit
(``apply_fsdp_to_decoder``). An inactive block's layers are never called, so they are never
all-gathered and never reduce-scattered; the remaining shared modules (timestep embedder,
final adaLN) live in the root unit, gathered once per step.
"""

from __future__ import annotations

import torch

from torchtitan.models.llama3.parallelize import parallelize_llama

from dblocks_titan import compat


def parallelize_dblocks(model: torch.nn.Module, *, parallel_dims, **kwargs) -> torch.nn.Module:
    """titan's ``parallelize_llama`` (AC → compile → FSDP2/HSDP), then the gloo fix-up."""
    if parallel_dims.tp_enabled or parallel_dims.cp_enabled or parallel_dims.pp_enabled:
        raise ValueError(
            "dblocks models support data parallelism (FSDP2/HSDP) only: set tensor, context and "
            "pipeline parallel degrees to 1."
        )
    model = parallelize_llama(model, parallel_dims=parallel_dims, **kwargs)
    compat.fix_fsdp_for_gloo(model)
    return model
