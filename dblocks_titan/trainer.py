"""DBlocksTrainer: torchtitan's Trainer, training ONE block per optimizer step.

What it overrides, and nothing else:
- ``train_step``: picks the step's block from the :class:`BlockSchedule` (same on every rank
  and micro-batch), then runs titan's step (gradient accumulation, clipping, optimizer, LR,
  logging, non-finite check); afterwards logs the block, its CE and a per-block running CE.
- ``_forward_backward_body``: the model's objective (:mod:`dblocks_titan.objectives`: AR or
  masked diffusion) corrupts the micro-batch for that block and runs only its layers; the loss is
  backpropagated and the objective's logged value (AR: unweighted CE; masked: NELBO) returned.
- ``state_dict``/``load_state_dict``: add the schedule's generator and the running losses.

Inactive blocks never run, so their ``.grad`` stays ``None`` (titan zeroes grads with
``set_to_none`` when CUDA graphs are off, which DiffusionBlocks requires) and AdamW neither
moves nor decays them. AR validation is titan's Validator (calling the model without σ is
next-token prediction at σ_max through block 0, see ``DBlocksLlama.forward``); masked diffusion
validates with :class:`dblocks_titan.nelbo.NELBOValidator`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import _init_optim_state

from torchtitan.distributed import utils as dist_utils
from torchtitan.tools.logging import logger
from torchtitan.trainer import Trainer

from dblocks_titan.block_schedule import BlockSchedule, ScheduleKind
from dblocks_titan.diffusion import EDMConfig, Weighting, WEIGHTINGS
from dblocks_titan.models.block_denoiser import check_num_blocks
from dblocks_titan.objectives import build_objective
from dblocks_titan.toml_config import check_inputs


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
    edm: EDMConfig = field(default_factory=EDMConfig)

    def __post_init__(self):
        if self.num_blocks < 1:
            raise ValueError(f"dblocks.num_blocks must be >= 1, got {self.num_blocks}.")
        if not 0 <= self.gamma < 1:
            raise ValueError(f"dblocks.gamma must be in [0, 1), got {self.gamma}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"dblocks.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        if not 0 <= self.running_loss_decay < 1:
            raise ValueError(f"dblocks.running_loss_decay must be in [0, 1), got {self.running_loss_decay}.")


class DBlocksTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        dblocks: DBlocksConfig = field(default_factory=DBlocksConfig)

        def __post_init__(self):
            Trainer.Config.__post_init__(self)
            self.validate_dblocks()

        def validate_dblocks(self) -> None:
            """Checks that need the whole tree; run again after TOML/CLI edits."""
            if not self.training.disable_cuda_graphs:
                raise ValueError(
                    "DiffusionBlocks changes the active block every step and needs inactive grads to stay "
                    "None: set --training.disable_cuda_graphs (or training.disable_cuda_graphs = true)."
                )
            if self.model_spec is not None:
                check_num_blocks(len(self.model_spec.model.layers), self.dblocks.num_blocks)
            t_ranges = getattr(self.validator, "t_ranges", 0)
            if self.validator.enable and t_ranges % self.dblocks.num_blocks:
                raise ValueError(
                    f"validator.t_ranges = {t_ranges} must be a multiple of dblocks.num_blocks = {self.dblocks.num_blocks}"
                    " (each t range is evaluated by the one block that owns it)."
                )

    config: Config

    def __init__(self, config: Config):
        config.validate_dblocks()
        check_inputs(config)  # bad paths / vocab fail here, before the model is built
        super().__init__(config)
        init_optimizer_states(self.optimizers)
        self.objective = build_objective(self.model_config, config.dblocks)
        db = config.dblocks
        self.schedule = BlockSchedule.Config(kind=db.block_schedule, seed=db.seed).build(
            num_blocks=db.num_blocks, total_steps=config.training.steps
        )
        self.block = 0
        self.running_loss: dict[int, float] = {}
        self.first_loss: dict[int, float] = {}
        self._step_loss = torch.zeros((), device=self.device)
        self._microbatch = 0
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self._rank = rank
        trace_dir = os.path.join(config.dump_folder, "dblocks_trace")
        os.makedirs(trace_dir, exist_ok=True)
        self._trace_path = os.path.join(trace_dir, f"rank{rank}.jsonl")

    # -- one optimizer step ----------------------------------------------------------------

    def train_step(self, data_iterator):
        self.block = self.schedule.next()
        self._step_loss.zero_()
        self._microbatch = 0
        super().train_step(data_iterator)
        self._log_block_step()

    def _noise_generator(self) -> torch.Generator:
        """Noise for (seed, step, rank, micro-batch): reproducible on resume without saved state."""
        seed = hash((self.config.dblocks.seed, self.step, self._rank, self._microbatch)) % (2**63)
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
        return logged

    # -- per-block logging -----------------------------------------------------------------

    def _log_block_step(self) -> None:
        loss = self._step_loss
        if self.parallel_dims.dp_cp_enabled:
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
        if self.step == 1 and os.path.exists(self._trace_path):
            k = 0
            while os.path.exists(f"{self._trace_path}.prev{k}"):
                k += 1
            os.rename(self._trace_path, f"{self._trace_path}.prev{k}")
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
