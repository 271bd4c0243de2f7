"""BaselineTrainer: titan's own Trainer for the end-to-end twins (``llama3``), unchanged but for the one
validation pass (:func:`dblocks_titan.inputs.check_inputs`) before anything is built, so that a twin
launched by titan's native ``--module dblocks_titan --config X`` fails on a bad value with the same
one-line error as through ``python -m dblocks_titan.train`` (which checks once more, harmlessly)."""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan.trainer import Trainer

from dblocks_titan.inputs import check_inputs


class BaselineTrainer(Trainer):
    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        """titan's ``Trainer.Config``; its own class so that ``build()`` constructs this trainer."""

    def __init__(self, config: Config):
        check_inputs(config)
        super().__init__(config)
