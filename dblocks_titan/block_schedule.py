"""Which block trains at each optimizer step (METHOD.md §4, step 1).

Every rank builds the schedule from the same seed and draws once per optimizer step, so all
ranks and all micro-batches of a step train the same block. A drawn block trains a *run* of
``steps_per_block`` = K consecutive steps (K = 1: a new block every step); with
``steps_per_block_from`` = F > 0 the first F steps are a K = 1 schedule of their own and the runs of K
start after step F (the drift remedy: the shared modules learn while every block interleaves, then
``freeze_shared_after`` = F freezes them for the long runs). The schedule is
deterministic, so :meth:`BlockSchedule.peek` tells the block of the next step without drawing it
(the offload store prefetches that block). The state (steps drawn, generator) is part of
``state_dict`` (saved in titan's ``train_state`` checkpoint), so a resumed run continues the same
sequence, also in the middle of a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from torchtitan.config import Configurable

ScheduleKind = Literal["random", "round_robin", "sequential"]


class BlockSchedule(Configurable):
    """Runs of K steps: ``random`` (paper): each run's block uniform i.i.d.; ``round_robin``: runs of
    0, 1, …, B−1, 0, …; ``sequential``: the first ⌈R/B⌉ runs train block 0, the next block 1, …
    (R = ⌈S/K⌉ runs in S total steps). With F = ``steps_per_block_from`` > 0: steps 1…F follow the kind
    with K = 1 over F steps, the rest the kind with runs of K over the S − F steps left."""

    @dataclass(kw_only=True, slots=True)
    class Config(Configurable.Config):
        kind: ScheduleKind = "random"
        seed: int = 0
        steps_per_block: int = 1
        steps_per_block_from: int = 0

    def __init__(self, config: Config, *, num_blocks: int, total_steps: int):
        if config.kind not in ("random", "round_robin", "sequential"):
            raise ValueError(
                f"dblocks.block_schedule must be 'random', 'round_robin' or 'sequential', got {config.kind!r}."
            )
        self.kind = config.kind
        self.num_blocks = num_blocks
        self.total_steps = total_steps
        self.steps_per_block = config.steps_per_block
        self.runs_from = config.steps_per_block_from  # F: the steps before it are drawn with K = 1
        self.draws = 0  # steps drawn so far
        self.generator = torch.Generator().manual_seed(config.seed)
        self._run_block = 0  # random: the block of the run in progress
        self._run_state = self.generator.get_state()  # random: the generator before that run's draw

    def next(self) -> int:
        """The block of the next optimizer step (advances the schedule)."""
        if self.kind == "random" and self._run_starts():
            self._run_state = self.generator.get_state()
            self._run_block = self._draw(self.generator)
        block = self._run_block if self.kind == "random" else self._fixed_block(self.draws)
        self.draws += 1
        return block

    def peek(self) -> int:
        """The block :meth:`next` will return, without advancing the schedule."""
        if self.kind != "random":
            return self._fixed_block(self.draws)
        if not self._run_starts():
            return self._run_block
        return self._draw(torch.Generator().set_state(self.generator.get_state()))

    def _run_starts(self) -> bool:
        return self.draws < self.runs_from or (self.draws - self.runs_from) % self.steps_per_block == 0

    def _draw(self, generator: torch.Generator) -> int:
        return int(torch.randint(self.num_blocks, (), generator=generator))

    def _fixed_block(self, step: int) -> int:
        """round_robin / sequential: the block of 0-based ``step``, in its phase (before F: K = 1 over F
        steps; from F: runs of K over the steps left)."""
        if step < self.runs_from:
            k, total = 1, self.runs_from
        else:
            k, total, step = self.steps_per_block, self.total_steps - self.runs_from, step - self.runs_from
        run, b = step // k, self.num_blocks
        if self.kind == "round_robin":
            return run % b
        runs = -(-total // k)
        return min(run // -(-runs // b), b - 1)

    def state_dict(self) -> dict[str, Any]:
        """Steps drawn and the generator; in the middle of a random run, the generator as it was before
        the run's draw (the resumed schedule redraws the same block), else as it is (so K = 1 saves
        what it always did)."""
        mid_run = self.kind == "random" and not self._run_starts()
        return {"draws": self.draws, "generator": self._run_state if mid_run else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.generator.set_state(state["generator"])
        if self.kind == "random" and not self._run_starts():
            self._run_state = self.generator.get_state()
            self._run_block = self._draw(self.generator)
