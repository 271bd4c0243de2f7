"""DBlocksTrainer: torchtitan's Trainer, training ONE block per optimizer step.

What it overrides, and nothing else:
- ``train_step``: picks the step's block from the :class:`BlockSchedule` (same on every rank
  and micro-batch), then runs titan's step (gradient accumulation, clipping, optimizer, LR,
  logging, non-finite check); afterwards logs the block, its CE and a per-block running CE.
- ``_forward_backward_body``: the model's objective (:mod:`dblocks_titan.objectives`: AR or
  masked diffusion) corrupts the micro-batch for that block and runs only its layers; the loss is
  backpropagated and the objective's logged value (AR: unweighted CE; masked: NELBO) returned.
- ``state_dict``/``load_state_dict``: add the schedule's generator and the running losses.

Block-parallel mode (``dblocks.parallel = "blocks"``, :mod:`dblocks_titan.parallelize`): the world is
split into B rank groups and group g trains block g at every step, holding only block g's layers
(and their optimizer state) plus the shared modules. What changes here: the mesh gets
``dp_replicate = B``; each group's gradients are renormalised to its own tokens and, with
``shared_grads = "world"``, clipped by one norm over all blocks (:meth:`_finish_block_parallel_grads`);
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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state
from torch.distributed.tensor import DTensor

from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from dblocks_titan.block_schedule import BlockSchedule, ScheduleKind
from dblocks_titan.diffusion import EDMConfig, Weighting
from dblocks_titan.errors import InputError
from dblocks_titan.inputs import check_inputs
from dblocks_titan.metrics import move_aside
from dblocks_titan.objectives import build_objective
from dblocks_titan.offload import InactiveOptimizerOffload
from dblocks_titan.parallelize import local_tensor, parallelize_dblocks


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
    offload_optimizer: bool = False
    """Sequential only: keep the optimizer state of the blocks that are not training in host memory
    (:mod:`dblocks_titan.offload`), copied in for the steps that train them."""
    edm: EDMConfig = field(default_factory=EDMConfig)


def configure_block_parallel(config) -> None:
    """Block-parallel set-up, before titan builds anything: one-line errors for a world size that B
    does not divide or a user-set replicate degree; ``dp_replicate = B`` (group g = replicate index
    g); the validator off (it needs every block); titan's clip off with ``shared_grads = "world"``
    (it would clip each group by its own norm, the trainer clips by the world's); the parallelize
    function in block-parallel mode."""
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
    if config.dblocks.shared_grads == "world":  # the trainer clips by the world's norm itself
        config.training.max_norm = math.inf
    if config.validator.enable:
        logger.warning(
            "dblocks.parallel = 'blocks': the validator needs every block and is switched off; "
            "evaluate checkpoints with `python -m dblocks_titan.eval`."
        )
        config.validator.enable = False
    config.model_spec = dataclasses.replace(
        config.model_spec, parallelize_fn=partial(parallelize_dblocks, block_parallel=True)
    )


@torch.no_grad()
def broadcast_shared_modules(model: torch.nn.Module, group) -> None:
    """Give every group group 0's shared modules (initialisation consumes the RNG differently on
    ranks that hold different layers). Shards match across groups, so the local shards are sent."""
    for name, param in model.named_parameters():
        if not name.startswith("layers."):
            torch.distributed.broadcast(local_tensor(param), group=group, group_src=0)


def _squared_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """‖grads‖² over the group that shards them (0 for an empty list)."""
    norm = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
    return (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2


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
        super().__init__(config)
        if self.block_parallel:
            replicate = self.parallel_dims.get_mesh("dp_replicate")
            self.own_block = replicate.get_local_rank()
            if config.dblocks.shared_grads == "world":
                broadcast_shared_modules(self.model_parts[0], replicate.get_group())
        init_optimizer_states(self.optimizers)
        self.offload = None
        if config.dblocks.offload_optimizer:
            self.offload = InactiveOptimizerOffload(self.model_parts[0], self.optimizers, config.dblocks.num_blocks)
            # DCP reads and writes every state tensor: make them resident around titan's save and load
            self.checkpointer.around_io.append(self.offload.all_resident)
        self.objective = build_objective(self.model_config, config.dblocks)
        db = config.dblocks
        self.schedule = BlockSchedule.Config(kind=db.block_schedule, seed=db.seed).build(
            num_blocks=db.num_blocks, total_steps=config.training.steps
        )
        self.block = 0
        self.running_loss: dict[int, float] = {}
        self.first_loss: dict[int, float] = {}
        self._step_loss = torch.zeros((), device=self.device)
        self._local_tokens = torch.zeros((), dtype=torch.int64, device=self.device)
        self._group_scale = 1.0
        self._microbatch = 0
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._rank = rank
        trace_dir = os.path.join(config.dump_folder, "dblocks_trace")
        os.makedirs(trace_dir, exist_ok=True)
        self._trace_path = os.path.join(trace_dir, f"rank{rank}.jsonl")

    # -- one optimizer step ----------------------------------------------------------------

    def train_step(self, data_iterator):
        self.block = self.schedule.next()  # drawn in both modes, so the schedule resumes in either
        if self.block_parallel:
            self.block = self.own_block
        self._step_loss.zero_()
        self._local_tokens.zero_()
        self._microbatch = 0
        if self.offload is not None:
            self.offload.fetch(self.block)
        super().train_step(data_iterator)
        if self.offload is not None:
            self.offload.evict(self.block)
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
            if self._microbatch == self.gradient_accumulation_steps:
                self._finish_block_parallel_grads(global_valid_tokens)
        return logged

    def _finish_block_parallel_grads(self, global_valid_tokens: torch.Tensor) -> None:
        """After the step's last backward, block-parallel only.

        titan normalised every rank's loss by the world's token count T, and FSDP reduced the
        gradients within the group: group g's gradients are ``Σ_{r∈g} ∇ℓ_r / T``. Its block must be
        normalised by the group's own count T_g, so every gradient is multiplied by T/T_g (= B for
        equal batches). With ``shared_grads = "world"`` the shared modules' gradients are then averaged
        over the groups (an all-reduce of the matching local shards, /B), which is the expectation
        over blocks that the sequential mode's random block estimates, and all gradients are clipped
        by ONE norm, ``‖g‖² = Σ_groups ‖block_g‖² + ‖shared‖²``, at the configured max_norm, so every
        group scales its identical shared gradients identically (titan's own clip, which would see
        only this group's norm, runs at max_norm = ∞). ``group``: titan clips each group's model alone.
        """
        group_tokens = dist_utils.dist_sum_tensor(self._local_tokens, self.parallel_dims.get_mesh("fsdp"))
        self._group_scale = float(global_valid_tokens) / float(group_tokens)
        params = {n: p for n, p in self.model_parts[0].named_parameters() if p.grad is not None}
        for param in params.values():
            param.grad.mul_(self._group_scale)
        if self.config.dblocks.shared_grads != "world":
            return
        replicate = self.parallel_dims.get_mesh("dp_replicate").get_group()
        shared = [p.grad for n, p in params.items() if not n.startswith("layers.")]
        for grad in shared:
            local = local_tensor(grad)
            torch.distributed.all_reduce(local, group=replicate)
            local.div_(self.config.dblocks.num_blocks)
        if 0 < self.max_norm < math.inf:
            blocks_sq = _squared_norm([p.grad for n, p in params.items() if n.startswith("layers.")])
            torch.distributed.all_reduce(blocks_sq, group=replicate)
            total = (blocks_sq + _squared_norm(shared)).sqrt()
            torch.nn.utils.clip_grads_with_norm_(list(params.values()), self.max_norm, total, foreach=True)

    # -- per-block logging -----------------------------------------------------------------

    def _log_block_step(self) -> None:
        loss = self._step_loss
        if self.block_parallel:  # this group's block: its ranks' losses, renormalised to its tokens
            loss = dist_utils.dist_sum(loss * self._group_scale, self.parallel_dims.get_mesh("fsdp"))
        elif self.parallel_dims.dp_cp_enabled:
            loss = dist_utils.dist_sum(loss, self.parallel_dims.get_optional_mesh("loss"))
        loss = float(loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"Loss is not finite ({loss}) at step {self.step}, block {self.block}. Stopping training.")
        b, decay = self.block, self.config.dblocks.running_loss_decay
        self.first_loss.setdefault(b, loss)
        self.running_loss[b] = loss if b not in self.running_loss else decay * self.running_loss[b] + (1 - decay) * loss
        self._write_trace({"step": self.step, "block": b, "loss": loss})
        if not self.metrics_processor.should_log(self.step):
            return
        metrics = {"dblocks/block": b, "dblocks/loss": loss}
        metrics.update({f"dblocks/running_loss_block{k}": v for k, v in sorted(self.running_loss.items())})
        self.metrics_processor.logger.log(metrics, self.step)
        running = "  ".join(f"b{k}={v:.3f}" for k, v in sorted(self.running_loss.items()))
        logger.info(f"step: {self.step:2}  block: {b}  loss: {loss:.4f}  running loss per block: {running}")

    def _write_trace(self, record: dict) -> None:
        """Append to ``dump_folder/dblocks_trace/rank<r>.jsonl``. A fresh run (step 1) finding an old
        trace moves it aside to ``rank<r>.jsonl.prev<k>`` instead of overwriting it."""
        if self.step == 1:
            move_aside(self._trace_path)
        with open(self._trace_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self):
        super().train()
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
