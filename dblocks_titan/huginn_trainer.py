"""HuginnTrainer: titan's own Trainer for the end-to-end recurrent-depth baseline (``huginn``).

The one thing it adds: before each optimizer step it tells the model the step
(``Huginn.set_step``), from which the model draws the step's depth r as a pure function of
(seed, step) (``models.huginn.draw_depth``). So every rank and every micro-batch of a step runs the
same r (all ranks iterate alike, as FSDP's collectives need), and a resumed run, whose step titan
restores from its checkpoint, repeats the uninterrupted run's draws without any saved state.
Loss, validation, clipping, optimizer, LR, metrics and checkpoints are titan's, unchanged; the
validation pass runs first (:class:`~dblocks_titan.baseline_trainer.BaselineTrainer`).
"""

from __future__ import annotations

from dataclasses import dataclass

from dblocks_titan.baseline_trainer import BaselineTrainer


class HuginnTrainer(BaselineTrainer):
    @dataclass(kw_only=True, slots=True)
    class Config(BaselineTrainer.Config):
        """titan's ``Trainer.Config``; its own class so that ``build()`` constructs this trainer."""

    def train_step(self, data_iterator):
        for part in self.model_parts:
            part.set_step(self.step)
        super().train_step(data_iterator)
