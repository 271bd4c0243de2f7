"""Evaluate a checkpoint: ``[torchrun ...] python -m dblocks_titan.eval --job.config_file X.toml [flags]``.

The run of ``X.toml`` is built exactly as training builds it (same CLI flags and overrides), its
DCP checkpoint is loaded (the latest under ``dump_folder/checkpoint.folder``, or
``--checkpoint.load_step N``), and the config's validator runs once: the exact NELBO / BPC with each
t range's share for masked diffusion (:class:`dblocks_titan.nelbo.NELBOValidator`), CE at σ_max on
the held-out batches for AR. Raise ``--validator.steps`` / ``--validator.t_samples`` for a tighter
number than the one logged during training. The metrics are printed and written next to the
checkpoint as ``<dump_folder>/<checkpoint.folder>/eval_step<N>.json``.
"""

from __future__ import annotations

import json
import os
import sys

import dblocks_titan  # noqa: F401  (applies the compat patches before titan is imported)
from dblocks_titan.train import _single_process_env


def checkpoint_folder(config) -> str:
    """The run's checkpoint folder; a one-line error when it holds no ``step-N`` checkpoint."""
    from dblocks_titan.toml_config import InputError

    folder = os.path.join(config.dump_folder, config.checkpoint.folder)
    steps = [d for d in os.listdir(folder) if d.startswith("step-")] if os.path.isdir(folder) else []
    if not steps:
        raise InputError(
            f"no checkpoint under {folder}: train the config with [checkpoint] enable = true first, "
            "or point --job.dump_folder at the run to evaluate"
        )
    step = config.checkpoint.load_step
    if step != -1 and f"step-{step}" not in steps:
        raise InputError(f"--checkpoint.load_step {step} not in {folder} (it has {', '.join(sorted(steps))})")
    return folder


def evaluate(config) -> dict:
    """Build the trainer of ``config``, load its checkpoint, run its validator once → the logged metrics."""
    config.checkpoint.enable = True
    config.validator.enable = True
    folder = checkpoint_folder(config)
    trainer = config.build()
    try:
        trainer.checkpointer.load(step=config.checkpoint.load_step)
        logged: dict = {}
        log_validation = trainer.metrics_processor.log_validation

        def capture(loss, step, extra_metrics=None):
            logged.update({"validation_metrics/loss": loss, **(extra_metrics or {})})
            log_validation(loss, step, extra_metrics)

        trainer.metrics_processor.log_validation = capture
        trainer.validator.validate(trainer.model_parts, trainer.step)
        result = {"step": trainer.step, "run": os.path.abspath(config.dump_folder), **logged}
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0:
            path = os.path.join(folder, f"eval_step{trainer.step}.json")
            with open(path, "w") as f:
                json.dump(result, f, indent=2)
            print(json.dumps(result, indent=2))
            print(f"wrote {path}")
        return result
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> None:
    import torch

    from torchtitan.tools.logging import init_logger

    from dblocks_titan.toml_config import InputError, TomlConfigManager

    _single_process_env()
    init_logger()
    try:
        evaluate(TomlConfigManager().parse_args(argv))
    except InputError as e:
        sys.exit(f"dblocks_titan.eval: error: {e}")
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
