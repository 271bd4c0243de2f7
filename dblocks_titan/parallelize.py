"""Parallelisms for DiffusionBlocks models, applied as functions over the plain model.

The model keeps titan's Decoder layout (``tok_embeddings``, ``layers``, ``norm``, ``lm_head``),
so titan's building blocks apply unchanged, in titan's order: activation checkpointing on each
layer, per-layer ``torch.compile``, then FSDP2 with every transformer layer its own FSDP unit
(``apply_fsdp_to_decoder``).

- **Sequential** (``dblocks.parallel = "sequential"``): titan's ``parallelize_llama`` as is, FSDP2
  or HSDP over all ranks. An inactive block's layers are never called, so they are never
  all-gathered and never reduce-scattered; the remaining shared modules (timestep embedder, final
  adaLN) live in the root unit, gathered once per step.
- **Block-parallel** (``dblocks.parallel = "blocks"``): the trainer sets ``dp_replicate = B``, so the
  mesh is (B groups) × (W/B ranks) and group g = the ranks with replicate index g. Each rank keeps
  only block g's layers (:func:`keep_block`; the others are deleted on the meta device, so they are
  never materialised) and FSDP2-shards the model within its group only (the ``fsdp`` sub-mesh): no
  parameter, activation or gradient collective crosses groups here. With ``dblocks.shared_grads =
  "world"`` the trainer then averages the shared modules' gradients over the groups, after clipping each
  group's gradient by its own norm (:meth:`dblocks_titan.trainer.DBlocksTrainer._finish_block_parallel_grads`):
  ONE all-reduce of one flat bucket across the groups (:func:`average_over_group`) per step.

  Why not HSDP's own in-backward all-reduce (a ``(dp_replicate, dp_shard)`` mesh for the shared units):
  it sums the groups' shared gradients inside the backward, as each unit finishes, before the group's
  norm (which needs every gradient of the group, the embeddings' last) is known, so the per-group clip
  that makes block-parallel train the sequential objective could no longer precede the average. One
  bucket after the backward sends the same bytes as HSDP's per-unit all-reduces, in one call instead of
  one per tensor, but it cannot hide behind the backward as HSDP's can on a GPU (measured bytes:
  ``scripts/bench_per_rank.py --comm``, ``results/comm_per_rank.md``).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from torchtitan.config import TORCH_DTYPE_MAP
from torchtitan.distributed.compile import apply_compile
from torchtitan.distributed.fsdp import apply_fsdp_to_decoder
from torchtitan.models.llama3.parallelize import parallelize_llama

from dblocks_titan import compat

def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops reach the DTensor), a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def shared_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters of no block (embeddings, head, time embedder, final norm and adaLN, a shared
    noisy-slot W; :meth:`BlockDenoiser.is_block_parameter`), in ``named_parameters`` order, which is the
    same on every rank whichever block it holds."""
    return [(name, p) for name, p in model.named_parameters() if not model.is_block_parameter(name)]


@torch.no_grad()
def average_over_group(tensors: list[torch.Tensor], group, dtype: torch.dtype = torch.float32) -> None:
    """Replace every tensor by its mean over the ranks of ``group``, in ONE all-reduce: the tensors are
    packed into one flat bucket of ``dtype`` (as FSDP2 packs a unit's gradients for its reduce-scatter),
    divided by the group's size, summed (gloo has no AVG) and unpacked. A narrower ``dtype`` than the
    tensors' is torch's DDP compression hooks (``bf16_compress_hook``): divided before the sum, as there.
    Every rank passes tensors of the same shapes in the same order, and gets the same result."""
    flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
    flat.div_(group.size())
    torch.distributed.all_reduce(flat, group=group)
    torch._foreach_copy_(tensors, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors)])


def keep_block(model: torch.nn.Module, block: int) -> None:
    """Delete the modules of every other block (:meth:`BlockDenoiser.block_module_names`, entries of
    ModuleDicts: the names, hence checkpoint keys, of those kept do not change)."""
    for other in range(model.num_blocks):
        if other != block:
            for name in model.block_module_names(other):
                parent, key = name.rsplit(".", 1)
                del model.get_submodule(parent)[key]


def parallelize_dblocks(
    model: torch.nn.Module, *, parallel_dims, block_parallel: bool = False, **kwargs
) -> torch.nn.Module:
    """Sequential: titan's ``parallelize_llama`` (AC → compile → FSDP2/HSDP); block-parallel:
    :func:`parallelize_block_parallel`. Then the gloo fix-up."""
    if parallel_dims.tp_enabled or parallel_dims.cp_enabled or parallel_dims.pp_enabled:
        raise ValueError(
            "dblocks models support data parallelism (FSDP2/HSDP) only: set tensor, context and "
            "pipeline parallel degrees to 1."
        )
    if block_parallel:
        parallelize_block_parallel(model, parallel_dims=parallel_dims, **kwargs)
    else:
        model = parallelize_llama(model, parallel_dims=parallel_dims, **kwargs)
    compat.fix_fsdp_for_gloo(model)
    return model


def parallelize_block_parallel(
    model, *, parallel_dims, training, parallelism, compile_config, ac_config, dump_folder
) -> None:
    """Keep this rank's block, then titan's AC, per-layer compile and ``apply_fsdp_to_decoder`` on
    the group's own mesh."""
    keep_block(model, parallel_dims.get_mesh("dp_replicate").get_local_rank())
    if ac_config is not None:
        ac_config.build(dump_folder=dump_folder).apply(model)
    if compile_config.enable and "model" in compile_config.components:
        apply_compile(model, compile_config=compile_config, parallel_dims=parallel_dims)
    apply_fsdp_to_decoder(
        model,
        parallel_dims.get_mesh("fsdp"),
        param_dtype=TORCH_DTYPE_MAP[training.mixed_precision_param],
        reduce_dtype=TORCH_DTYPE_MAP[training.mixed_precision_reduce],
        pp_enabled=False,
        cpu_offload=training.enable_cpu_offload,
        reshard_after_forward_policy=parallelism.fsdp_reshard_after_forward,
        enable_symm_mem=parallelism.enable_fsdp_symm_mem,
    )
