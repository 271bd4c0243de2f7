"""DBlocksTrainer: torchtitan's Trainer, training ONE block per optimizer step.

What it overrides, and nothing else:
- ``train_step``: picks the step's block from the :class:`BlockSchedule` (same on every rank
  and micro-batch), then runs titan's step (gradient accumulation, clipping, optimizer, LR,
  logging, non-finite check) inside the offload store's step (:mod:`dblocks_titan.offload`: the
  block on the device, the schedule's next block prefetched); afterwards queues the block and its
  CE for the per-block log (:meth:`_log_block_step`: no host sync on the hot path, one flush every
  ``metrics.log_freq`` steps).
- ``_forward_backward_body``: the model's objective (:mod:`dblocks_titan.objectives`: AR or
  masked diffusion) corrupts the micro-batch for that block and runs only its layers; the loss is
  backpropagated and the objective's logged value (AR: unweighted CE; masked: NELBO) returned. After
  ``dblocks.freeze_shared_after`` the shared modules do not require gradients (none computed).
- ``state_dict``/``load_state_dict``: add the schedule's generator and the running losses.

Block-parallel mode (``dblocks.parallel = "blocks"``, :mod:`dblocks_titan.parallelize`): the world is
split into B rank groups and group g trains block g at every step, holding only block g's layers
(and their optimizer state) plus the shared modules. What changes here: the mesh gets
``dp_replicate = B``; each group's gradients are renormalised to its own tokens and clipped by its own
norm, and with ``shared_grads = "world"`` the shared modules' gradients are then averaged over the
groups, so that a step trains the sequential mode's objective (:meth:`_finish_block_parallel_grads`);
the shared modules start identical on every group (broadcast from group 0). The in-training
validator needs every block (AR: block 0; NELBO: all t ranges), so it is switched off with a
warning; evaluate the checkpoints, which load into either mode, with ``python -m dblocks_titan.eval``.

Inactive blocks never run, so their ``.grad`` stays ``None`` (titan zeroes grads with
``set_to_none`` when CUDA graphs are off, which DiffusionBlocks requires) and AdamW neither
moves nor decays them. AR validation is titan's Validator (calling the model without σ is
next-token prediction at σ_max through block 0, see ``DBlocksLlama.forward``); masked diffusion
validates with :class:`dblocks_titan.nelbo.NELBOValidator`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state

from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.components.optimizer.optimizer import ParamGroupConfig
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from dblocks_titan.block_schedule import BlockSchedule, ScheduleKind
from dblocks_titan.diffusion import EDMConfig, Weighting
from dblocks_titan.errors import InputError
from dblocks_titan.inputs import check_inputs
from dblocks_titan.metrics import move_aside
from dblocks_titan.objectives import build_objective
from dblocks_titan.offload import BlockOffload, BlockStep, OffloadMode, Prefetch
from dblocks_titan.parallelize import average_over_group, local_tensor, parallelize_dblocks, shared_parameters


def init_optimizer_states(optimizers) -> None:
    """Give every parameter its optimizer state now, exactly as its first real step would.

    Reason: a block that has not trained yet has no AdamW state, so a checkpoint would lack its
    keys, and resuming (where DCP builds states for every parameter) fails with "Missing key in
    checkpoint state_dict". DCP's own initialiser takes a zero-grad step at lr 0 (moments stay 0,
    nothing moves or decays); resetting ``step`` to 0 leaves the state identical to a fresh one.
    """
    for optimizer in optimizers:
        _init_optim_state(optimizer)
        for state in optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"].zero_()
            elif "step" in state:
                state["step"] = 0


@dataclass(kw_only=True, slots=True)
class DBlocksConfig:
    num_blocks: int = 4
    """B: the model's layers are cut into B blocks of n_layers/B layers."""
    gamma: float = 0.1
    """Overlap γ: block range [lo, hi] trains on [lo/a, hi·a], a = (hi/lo)^γ."""
    edge_share: float = 0.25
    """AR: the share of block 0's samples drawn at σ_max exactly, and of block B − 1's at σ_min: the
    sampler's first and last levels (the validator scores at σ_max), which the log-normal density
    almost never reaches (P(σ > 40 | block 0) = 4e-5 at B = 4), the rest from the widened range.
    0: the paper's density only."""
    weighting: Weighting = "batch_mean"
    """Loss weighting: none | per_sample (paper Eq. 6) | batch_mean (authors' code)."""
    block_schedule: ScheduleKind = "random"
    """random (paper) | round_robin | sequential."""
    seed: int = 0
    """Seed of the block schedule (same on every rank) and of the noise (offset per rank)."""
    running_loss_decay: float = 0.9
    """EMA decay of the per-block running loss that is logged."""
    parallel: Literal["sequential", "blocks"] = "sequential"
    """sequential: every rank trains the step's one block (FSDP2/HSDP over all ranks). blocks: the
    world is split into B rank groups; group g trains block g at every step and holds only its
    layers (world size must be a multiple of B; see :mod:`dblocks_titan.parallelize`)."""
    shared_grads: Literal["world", "group"] = "world"
    """Block-parallel only. world (the paper's semantics: one set of shared modules trained by every
    block): shared-module gradients are reduced over all ranks each step. group: each group keeps
    its own shared modules (B independent models; cannot be checkpointed as one model)."""
    shared_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """Block-parallel, ``shared_grads = "world"`` only: the dtype of the cross-group all-reduce of the
    shared-module gradients. bfloat16 halves the only bytes that cross the groups (torch's DDP
    ``bf16_compress_hook``: cast, divide by B, sum, cast back; every group gets the same result, so the
    shared modules stay identical). titan's own FSDP2 reduce-scatter stays fp32 (titan 0.3.0 accepts
    only float32 for ``mixed_precision_reduce``)."""
    offload: OffloadMode = "none"
    """Sequential only. Where the state of the blocks that are not training lives
    (:mod:`dblocks_titan.offload`): none (on the device) | optimizer (their AdamW state in host
    memory) | block (their parameters' local shards and AdamW state in host memory; the step's block
    is copied in, the next one prefetched; its AdamW steps on the device). The other way to keep the
    blocks on the host is titan's own ``training.enable_cpu_offload`` (FSDP2's CPUOffloadPolicy, with
    ``offload = "none"``): every parameter, gradient and AdamW state on the host, AdamW stepping there;
    a step copies in only what runs (the shared modules and the step's block, at their all-gathers) and
    copies out their gradients, at EVERY step, but no AdamW state ever moves."""
    prefetch: Prefetch = "after_step"
    """offload only. When the next block's state is copied in: after_step (after the optimizer step, in
    the place of the trained block's: the device peak is one block) | step_start (at the step's start:
    every copy overlaps the whole step, two blocks on the device during a step that switches)."""
    block_step: BlockStep = "device"
    """offload = block only. Where the training block's optimizer step runs: device (its AdamW state comes in
    with it and goes back with it at every switch: parameters + AdamW state, 12 bytes per fp32 parameter each
    way; nothing moves while a block repeats) | host (its AdamW state never leaves the host: every step copies
    the block's gradients out and its updated parameters back in, 4 + 4 bytes per parameter, and AdamW steps
    the block on the host, as titan's CPU offload does for every parameter; the shared modules stay on the
    device and step there). host never holds a block's AdamW state on the device and moves a third of the
    bytes of a device switch, at every step; device moves nothing while a block repeats (steps_per_block)."""
    offload_optimizer: bool = False
    """Deprecated spelling of ``offload = "optimizer"`` (accepted with a warning)."""
    steps_per_block: int = 1
    """K: a block drawn by the schedule trains K consecutive optimizer steps (K = 1: a new draw every
    step). Larger K amortises the offload copies over K steps."""
    steps_per_block_from: int = 0
    """F > 0: the runs of K start after optimizer step F; steps 1…F draw a new block every step (K = 1).
    With ``freeze_shared_after`` = F this is the remedy for long runs: the shared modules train while
    every block interleaves, then freeze, so no run of K can drift them away from the other blocks."""
    shared_lr_scale: float = 1.0
    """The shared modules' learning rate as a multiple of ``optimizer.lr`` (their own AdamW param group,
    on the same schedule). 1: the paper. In block-parallel mode the shared modules take one AdamW step per
    step on the mean of B blocks' gradients, where sequential mode gives them B single-block steps for the
    same per-block budget; ``B`` makes up for that (measured on the default pair: README, block-parallel)."""
    freeze_shared_after: int = 0
    """A remedy for shared-module drift (a block's CE rises once other blocks have moved the shared
    embeddings, head, time embedder and final adaLN it was trained with; long ``steps_per_block`` runs and
    the ``sequential`` schedule invite it). S > 0: after optimizer step S the shared modules take no
    update (they stop requiring gradients: none is computed, reduce-scattered or clipped, so the clip
    norm is the block's own); the blocks go on training against them. 0: never frozen (the paper).
    Block-parallel (``shared_grads = "world"``): the shared modules stay identical on every group, so after
    step S the groups skip the cross-group all-reduce and train with no traffic between them."""
    edm: EDMConfig = field(default_factory=EDMConfig)


def configure_block_parallel(config) -> None:
    """Block-parallel set-up, before titan builds anything: one-line errors for a world size that B
    does not divide or a user-set replicate degree; ``dp_replicate = B`` (group g = replicate index
    g); the validator off (it needs every block); titan's clip off (it runs after the step's last
    backward, too late: the trainer clips each group before the cross-group average, see
    :meth:`DBlocksTrainer._finish_block_parallel_grads`); the parallelize function in block-parallel mode.

    Budget: all B blocks advance at every step, so the baseline's steps and warm-up give each block the
    baseline's number of updates (the sequential mode needs B× both); with B× the baseline's global
    batch each group takes the baseline's batch for its block (``train_configs/owt_dblocks_blockparallel.toml``).
    A block-parallel run given a sequential budget trains every block B× too long: nothing here can tell
    the two apart (a step count is just a number), so the configs and the README state the convention."""
    world, num_blocks = int(os.environ.get("WORLD_SIZE", "1")), config.dblocks.num_blocks
    parallelism = config.parallelism
    if world % num_blocks:
        raise InputError(
            f"dblocks.parallel = 'blocks' needs a world size that is a multiple of dblocks.num_blocks = {num_blocks} "
            f"(one rank group per block), got {world} ranks."
        )
    if parallelism.data_parallel_replicate_degree != 1:
        raise InputError(
            "dblocks.parallel = 'blocks' sets parallelism.data_parallel_replicate_degree = num_blocks itself "
            "(one replica group per block): leave it at 1."
        )
    if parallelism.spmd_backend != "partial_dtensor":
        raise InputError("dblocks.parallel = 'blocks' runs with parallelism.spmd_backend = 'partial_dtensor'.")
    parallelism.data_parallel_replicate_degree = num_blocks
    config.training.max_norm = math.inf  # the trainer clips each group itself, before the average
    if config.validator.enable:
        logger.warning(
            "dblocks.parallel = 'blocks': the validator needs every block and is switched off; "
            "evaluate checkpoints with `python -m dblocks_titan.eval`."
        )
        config.validator.enable = False
    config.model_spec = dataclasses.replace(
        config.model_spec, parallelize_fn=partial(parallelize_dblocks, block_parallel=True)
    )


def add_shared_lr_group(config) -> None:
    """``dblocks.shared_lr_scale`` ≠ 1: put the shared modules (named on a meta-device build of the model)
    in their own param group of titan's optimizer, ahead of the catch-all one, with ``lr`` × the scale;
    titan's LR scheduler scales every group's own LR, so the ratio holds over the whole schedule."""
    scale = config.dblocks.shared_lr_scale
    if scale == 1:
        return
    base = config.optimizer.param_groups[-1]
    with torch.device("meta"):
        names = [name for name, _ in shared_parameters(config.model_spec.model.build())]
    pattern = "^(" + "|".join(re.escape(name) for name in names) + ")$"
    kwargs = {**base.optimizer_kwargs, "lr": base.optimizer_kwargs["lr"] * scale}
    config.optimizer.param_groups.insert(0, ParamGroupConfig(pattern=pattern, optimizer_name=base.optimizer_name,
                                                             optimizer_kwargs=kwargs))


@torch.no_grad()
def broadcast_shared_modules(model: torch.nn.Module, group) -> None:
    """Give every group group 0's shared modules (initialisation consumes the RNG differently on
    ranks that hold different layers). Shards match across groups, so the local shards are sent."""
    for _, param in shared_parameters(model):
        torch.distributed.broadcast(local_tensor(param), group=group, group_src=0)


class DBlocksTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        dblocks: DBlocksConfig = field(default_factory=DBlocksConfig)

    config: Config

    def __init__(self, config: Config):
        check_inputs(config)  # every bad value, path or file fails here, before anything is built
        self.block_parallel = config.dblocks.parallel == "blocks"
        self.max_norm = config.training.max_norm
        if self.block_parallel:
            configure_block_parallel(config)
        add_shared_lr_group(config)
        super().__init__(config)
        if self.block_parallel:
            replicate = self.parallel_dims.get_mesh("dp_replicate")
            self.own_block = replicate.get_local_rank()
            if config.dblocks.shared_grads == "world":
                broadcast_shared_modules(self.model_parts[0], replicate.get_group())
        init_optimizer_states(self.optimizers)
        db = config.dblocks
        self.offload = BlockOffload.Config(mode=db.offload, prefetch=db.prefetch, step=db.block_step).build(
            model=self.model_parts[0], optimizers=self.optimizers, num_blocks=db.num_blocks
        )
        if self.checkpointer.enable and db.offload != "none":
            # DCP reads and writes the offloaded blocks on the host, one block on the device at a time
            self.checkpointer.states.update(self.offload.checkpoint_states())
            self.checkpointer.around_io.append(partial(self.offload.checkpoint_io, self.checkpointer))
        self.objective = build_objective(self.model_config, config.dblocks)
        self.schedule = BlockSchedule.Config(
            kind=db.block_schedule, seed=db.seed, steps_per_block=db.steps_per_block,
            steps_per_block_from=db.steps_per_block_from,
        ).build(num_blocks=db.num_blocks, total_steps=config.training.steps)
        self.block = 0
        self.running_loss: dict[int, float] = {}
        self.first_loss: dict[int, float] = {}
        self._step_loss = torch.zeros((), device=self.device)
        self._local_tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self._group_scale = torch.ones((), device=self.device)
        self._pending: list[tuple[int, int, torch.Tensor]] = []  # (step, block, loss on the device)
        self._trace_started = False
        self._microbatch = 0
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._rank = rank
        trace_dir = os.path.join(config.dump_folder, "dblocks_trace")
        os.makedirs(trace_dir, exist_ok=True)
        self._trace_path = os.path.join(trace_dir, f"rank{rank}.jsonl")

    # -- one optimizer step ----------------------------------------------------------------

    def train_step(self, data_iterator):
        self.block = self.schedule.next()  # drawn in both modes, so the schedule resumes in either
        next_block = self.schedule.peek() if self.step < self.config.training.steps else None
        if self.block_parallel:
            self.block = self.own_block
        self._step_loss.zero_()
        self._local_tokens.zero_()
        self._microbatch = 0
        self._freeze_shared_if_due()
        with self.offload.step(self.block, next_block):  # the block on the device, the next one on its way
            super().train_step(data_iterator)
        self._log_block_step()

    def _noise_generator(self) -> torch.Generator:
        """Noise for (seed, step, global micro-batch index = rank·accumulation + micro-batch): reproducible
        on resume without saved state, and the same for one process accumulating k micro-batches as for
        k ranks taking one each (so 1-process and FSDP runs on the same batches give the same losses)."""
        index = self._rank * self.gradient_accumulation_steps + self._microbatch
        seed = hash((self.config.dblocks.seed, self.step, index)) % (2**63)
        self._microbatch += 1
        return torch.Generator(device=self.device).manual_seed(seed)

    def _forward_backward_body(self, inputs, labels, global_valid_tokens, extra_kwargs):
        with self.train_context():
            loss, logged = self.objective(
                self.model_parts[0], inputs, labels, extra_kwargs, block=self.block,
                generator=self._noise_generator(), global_valid_tokens=global_valid_tokens,
            )
            loss.backward()
        self._step_loss += logged
        if self.block_parallel:
            self._local_tokens += (labels != IGNORE_INDEX).sum()
        if self.block_parallel and self._microbatch == self.gradient_accumulation_steps:  # the last backward
            self._finish_block_parallel_grads(global_valid_tokens)
        return logged

    def shared_frozen(self) -> bool:
        """Whether this step leaves the shared modules as they are (``dblocks.freeze_shared_after``)."""
        after = self.config.dblocks.freeze_shared_after
        return 0 < after < self.step

    def _freeze_shared_if_due(self) -> None:
        """At the start of the first step after ``dblocks.freeze_shared_after`` (and of a run resumed past
        it): ``requires_grad_(False)`` on the shared parameters' sharded DTensors. FSDP2 copies the flag to
        the unsharded parameters at their next all-gather, so autograd computes no weight gradient for the
        embeddings, head, time embedder and final adaLN (the head still passes its input gradient to the
        block), FSDP2 reduce-scatters none of them, and AdamW and the clip skip them (no gradient). The
        block's gradient is what it was with the shared gradients computed and dropped."""
        if not self.shared_frozen():
            return
        for _, param in shared_parameters(self.model_parts[0]):
            param.requires_grad_(False)

    def _finish_block_parallel_grads(self, global_valid_tokens: torch.Tensor) -> None:
        """After the step's last backward, block-parallel only. Three steps, no host sync:

        1. Renormalise: titan divided every rank's loss by the world's token count T and FSDP reduced
           the gradients within the group, so group g holds ``Σ_{r∈g} ∇ℓ_r / T``; multiplying by T/T_g
           (= B for equal batches) gives the gradient of the group's own mean loss, G_g.
        2. Clip G_g = (block g's gradient, the shared modules' gradient) by ITS OWN norm, titan's
           ``clip_grad_norm_`` at ``training.max_norm`` over the group: Ĝ_g = min(1, M/‖G_g‖)·G_g, exactly
           what a sequential step on block g with the group's batch and noise applies.
        3. ``shared_grads = "world"``: replace the shared part by its mean over the groups,
           (1/B)·Σ_g Ĝ_g[shared], in one flat all-reduce (:func:`average_over_group`; in
           ``dblocks.shared_reduce_dtype``). ``group``: no
           cross-group traffic; every group keeps its own shared modules. After
           ``dblocks.freeze_shared_after`` there are no shared gradients (identical frozen
           shared modules on every group): no cross-group traffic either.

        What is then equal, and what only in expectation (tested: ``tests/test_block_parallel.py``):
        - block g's gradient is the sequential step's on block g (same batch, same noise), and the shared
          gradient is the MEAN over blocks of the sequential steps' shared gradients, each clipped by its
          own block's norm; so every block has an equal say on the shared modules, as in the sequential
          mode, whatever its loss scale (``batch_mean`` gradient norms span ~8 to ~560 across B = 4
          blocks: clipping their mean once would let the low-σ blocks set the shared update);
        - the sequential (random) schedule's shared gradient, Ĝ_b[shared] for one uniformly drawn b, has
          that mean as its expectation over the block draw: equal in expectation only. AdamW sees the
          mean of B clipped gradients in one step instead of one clipped gradient per step (lower
          variance in its moments), and every block takes an update at every step, so block-parallel
          reaches a block's k-th update in k steps, not ~B·k (hence its own budget convention: see
          :func:`configure_block_parallel`). A group's batch is W/B ranks' batches, so the sequential
          run that matches it step for step has the group's global batch.
        """
        group_tokens = dist_utils.dist_sum_tensor(self._local_tokens, self.parallel_dims.get_mesh("fsdp"))
        self._group_scale = global_valid_tokens / group_tokens
        params = [p for p in self.model_parts[0].parameters() if p.grad is not None]
        torch._foreach_mul_([local_tensor(p.grad) for p in params], self._group_scale)
        dist_utils.clip_grad_norm_(params, self.max_norm, foreach=True)
        if self.config.dblocks.shared_grads != "world" or self.shared_frozen():
            return
        shared = shared_parameters(self.model_parts[0])
        missing = [name for name, p in shared if p.grad is None]
        if missing:  # every group must send the same bucket
            raise RuntimeError(f"block {self.block}: shared parameters without a gradient: {missing}")
        average_over_group([local_tensor(p.grad) for _, p in shared], self.parallel_dims.get_mesh("dp_replicate").get_group(),
                           dtype=getattr(torch, self.config.dblocks.shared_reduce_dtype))

    # -- per-block logging -----------------------------------------------------------------

    def _log_block_step(self) -> None:
        """Queue this step's loss, still on the device (no reduction, no host copy, no file write), and
        flush the queue (:meth:`_flush_block_losses`) when titan logs (``metrics.log_freq``), at the
        last step and at every step that saves a checkpoint (before the save, so the running losses in
        the checkpoint and the trace on disk are complete up to it). Block-parallel: this group's
        loss, renormalised to its own tokens."""
        loss = self._step_loss * self._group_scale if self.block_parallel else self._step_loss.clone()
        self._pending.append((self.step, self.block, loss))
        last = self.step >= self.config.training.steps
        # titan's own rule for "this step saves" (DCP CheckpointManager; private, but its save() asks it too)
        saves = self.checkpointer._should_save(self.step, last_step=self.step == self.config.training.steps)
        if last or saves or self.metrics_processor.should_log(self.step):
            self._flush_block_losses()

    def _flush_block_losses(self) -> None:
        """One reduction of the queued losses (sum over the loss mesh; block-parallel: over the group),
        one host copy, then, step by step: the non-finite check, the first and running loss per block,
        one trace record each (one file write), and the metrics of a logging step.

        A non-finite loss is therefore detected at the flush, up to ``metrics.log_freq`` steps after it
        happened, but always before a checkpoint is saved (titan itself checks its loss on its logging
        steps); the records before it are written, then training stops. A crash between flushes loses up
        to ``log_freq`` trace records; they are the steps after the last checkpoint, which a resumed run
        repeats (:meth:`_write_trace`)."""
        if not self._pending:
            return
        steps, blocks, losses = zip(*self._pending)
        self._pending.clear()
        losses = torch.stack(losses)
        if self.block_parallel:  # each group its own block's loss; a non-finite one stops every group
            losses = dist_utils.dist_sum_tensor(losses, self.parallel_dims.get_mesh("fsdp"))
            bad = dist_utils.dist_sum_tensor((~losses.isfinite()).float(), self.parallel_dims.get_optional_mesh("loss"))
            losses = torch.where(bad > 0, math.nan, losses)
        elif self.parallel_dims.dp_cp_enabled:
            losses = dist_utils.dist_sum_tensor(losses, self.parallel_dims.get_optional_mesh("loss"))
        records, decay = [], self.config.dblocks.running_loss_decay
        for step, b, loss in zip(steps, blocks, losses.tolist()):
            if not math.isfinite(loss):
                self._write_trace(records)
                raise RuntimeError(f"Loss is not finite ({loss}) at step {step}, block {b}. Stopping training.")
            self.first_loss.setdefault(b, loss)
            self.running_loss[b] = loss if b not in self.running_loss else decay * self.running_loss[b] + (1 - decay) * loss
            records.append({"step": step, "block": b, "loss": loss})
        self._write_trace(records)
        if not self.metrics_processor.should_log(self.step):
            return
        metrics = {"dblocks/block": b, "dblocks/loss": loss}
        metrics.update({f"dblocks/running_loss_block{k}": v for k, v in sorted(self.running_loss.items())})
        self.metrics_processor.logger.log(metrics, self.step)
        running = "  ".join(f"b{k}={v:.3f}" for k, v in sorted(self.running_loss.items()))
        logger.info(f"step: {self.step:2}  block: {b}  loss: {loss:.4f}  running loss per block: {running}")

    def _write_trace(self, records: list[dict]) -> None:
        """Append records to ``dump_folder/dblocks_trace/rank<r>.jsonl`` (one line per step). The first
        write of a process starting at step 1 (a fresh run) moves an old trace aside to
        ``rank<r>.jsonl.prev<k>``; one starting at step s > 1 (a resume) drops the old trace's records of
        steps ≥ s (written after the checkpoint by the run that stopped), so the trace keeps one record
        per step."""
        if not records:
            return
        if not self._trace_started:
            self._trace_started = True
            first = records[0]["step"]
            if first == 1:
                move_aside(self._trace_path)
            elif os.path.exists(self._trace_path):
                with open(self._trace_path) as f:
                    kept = [line for line in f if line.strip() and json.loads(line)["step"] < first]
                with open(self._trace_path, "w") as f:
                    f.writelines(kept)
        with open(self._trace_path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))

    def train(self):
        super().train()
        self._flush_block_losses()  # a run cut short (data exhausted) before its last step
        for b in sorted(self.running_loss):
            logger.info(
                f"dblocks summary: block {b}: first loss {self.first_loss[b]:.4f} -> running loss {self.running_loss[b]:.4f}"
            )

    # -- checkpointed state ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "num_blocks": self.config.dblocks.num_blocks,
            "block_schedule": self.schedule.state_dict(),
            "running_loss": dict(self.running_loss),
            "first_loss": dict(self.first_loss),
        }

    def load_state_dict(self, state_dict: dict[str, Any]):
        saved = int(state_dict.get("num_blocks", self.config.dblocks.num_blocks))
        if saved != self.config.dblocks.num_blocks:
            raise ValueError(
                f"the checkpoint was trained with dblocks.num_blocks = {saved} but this run has "
                f"{self.config.dblocks.num_blocks}: resume with the same blocks, or start in a new --dump_folder"
            )
        super().load_state_dict(state_dict)
        self.schedule.load_state_dict(state_dict["block_schedule"])
        self.running_loss = {int(k): float(v) for k, v in state_dict.get("running_loss", {}).items()}
        self.first_loss = {int(k): float(v) for k, v in state_dict.get("first_loss", {}).items()}
