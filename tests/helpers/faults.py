"""Train the debug DB config (checkpoints every 2 steps) with a fault injected at step K.

Usage: faults.py nan|die OUT_DIR K STEPS
- nan: the loss of step K is NaN (the run must stop there with a clear error);
- die: the last rank exits abruptly at step K, once (a marker file in OUT_DIR remembers it), so that
  ``torchrun --max-restarts`` restarts the job and it resumes from the last checkpoint.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package, not an installed copy
import dblocks_titan  # noqa: E402, F401
from dblocks_titan.train import _single_process_env  # noqa: E402


def main() -> None:
    mode, out, bad_step, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    _single_process_env()
    from torchtitan.tools.logging import init_logger

    from dblocks_titan.toml_config import TomlConfigManager

    init_logger()

    config = TomlConfigManager().parse_args(
        ["--job.config_file", "train_configs/debug_dblocks.toml", "--dump_folder", out, "--training.steps", steps,
         "--validator.no-enable", "--checkpoint.enable", "--checkpoint.interval", "2",
         "--comm.init_timeout_seconds", "60"]  # a failed re-connection fails the test in a minute, not 30
    )
    trainer = config.build()
    objective = trainer.objective
    marker = os.path.join(out, "died")
    last_rank = int(os.environ["WORLD_SIZE"]) - 1

    def faulty(*args, **kwargs):
        loss, logged = objective(*args, **kwargs)
        if trainer.step == bad_step and mode == "nan":
            loss, logged = loss * float("nan"), logged * float("nan")
        if trainer.step == bad_step and mode == "die" and trainer._rank == last_rank and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
        return loss, logged

    trainer.objective = faulty
    try:
        trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
