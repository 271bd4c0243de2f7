"""Train the debug DB config with checkpoints every 2 steps, making the loss NaN at step K.

Usage: nan_at_step.py OUT_DIR K  (the run must stop at step K with a clear error)
"""

import sys

import dblocks_titan  # noqa: F401
from dblocks_titan.train import _single_process_env


def main() -> None:
    out, bad_step = sys.argv[1], int(sys.argv[2])
    _single_process_env()
    from dblocks_titan.toml_config import TomlConfigManager

    config = TomlConfigManager().parse_args(
        ["--job.config_file", "train_configs/debug_dblocks.toml", "--dump_folder", out, "--training.steps", "6",
         "--validator.no-enable", "--checkpoint.enable", "--checkpoint.interval", "2"]
    )
    trainer = config.build()
    objective = trainer.objective

    def poisoned(*args, **kwargs):
        loss, logged = objective(*args, **kwargs)
        if trainer.step == bad_step:
            loss, logged = loss * float("nan"), logged * float("nan")
        return loss, logged

    trainer.objective = poisoned
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
