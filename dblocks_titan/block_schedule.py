"""Which block trains at each optimizer step (METHOD.md §4, step 1).

Every rank builds the schedule from the same seed and draws once per optimizer step, so all
ranks and all micro-batches of a step train the same block. The generator state is part of
``state_dict`` (saved in titan's ``train_state`` checkpoint), so a resumed run continues the
same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from torchtitan.config import Configurable

ScheduleKind = Literal["random", "round_robin", "sequential"]


class BlockSchedule(Configurable):
    """``random`` (paper): uniform i.i.d.; ``round_robin``: 0, 1, …, B−1, 0, …;
    ``sequential``: the first ⌈S/B⌉ steps train block 0, the next block 1, … (S = total steps)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Configurable.Config):
        kind: ScheduleKind = "random"
        seed: int = 0

    def __init__(self, config: Config, *, num_blocks: int, total_steps: int):
        if config.kind not in ("random", "round_robin", "sequential"):
            raise ValueError(
                f"dblocks.block_schedule must be 'random', 'round_robin' or 'sequential', got {config.kind!r}."
            )
        self.kind = config.kind
        self.num_blocks = num_blocks
        self.total_steps = total_steps
        self.draws = 0
        self.generator = torch.Generator().manual_seed(config.seed)

    def next(self) -> int:
        """The block of the next optimizer step."""
        k, b = self.draws, self.num_blocks
        self.draws += 1
        if self.kind == "random":
            return int(torch.randint(b, (), generator=self.generator))
        if self.kind == "round_robin":
            return k % b
        steps_per_block = -(-self.total_steps // b)
        return min(k // steps_per_block, b - 1)

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.draws = int(state["draws"])
        self.generator.set_state(state["generator"])
