"""Run titan's training loop (``trainer.train()``: checkpoints and validation included) from a TOML config
(+ CLI overrides), recording what the offload store holds at every step; write ``<out>/offload<r>.json``:

- ``init``: the store's report before the first step (every block on the host);
- ``block_bytes``: the host bytes of one block by kind (every block has the same layers);
- ``steps``: per step its block, the next block, the report at the step's first forward (``during``) and
  right after the step (``after``: before titan's checkpoint and validation of that step; its ``peak``
  covers the step, from the end of the previous one's, checkpoint and validation included).

Usage: offload_probe.py OUT_DIR CONFIG [CLI overrides...]
"""

import json
import os
import sys

import dblocks_titan  # noqa: F401
from dblocks_titan.train import _single_process_env


def main() -> None:
    out, config_file, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    _single_process_env()
    from torchtitan.tools.logging import init_logger

    from dblocks_titan.toml_config import TomlConfigManager

    init_logger()
    config = TomlConfigManager().parse_args(["--job.config_file", config_file, "--dump_folder", out, *overrides])
    trainer = config.build()
    store, objective, log_step = trainer.offload, trainer.objective, trainer._log_block_step
    steps, during = [], {}

    def probed_objective(*args, **kwargs):
        if not during:  # the step's first micro-batch
            during.update(store.report())
        return objective(*args, **kwargs)

    def probed_log_step():
        next_block = trainer.schedule.peek() if trainer.step < config.training.steps else None
        steps.append({"step": trainer.step, "block": trainer.block, "next": next_block, "during": dict(during),
                      "after": store.report()})
        during.clear()
        store.reset_peak()
        log_step()

    trainer.objective, trainer._log_block_step = probed_objective, probed_log_step
    init = store.report()
    trainer.train()
    block_bytes = {kind: part.nbytes for (b, kind), part in store.parts.items() if b == 0}
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"offload{rank}.json"), "w") as f:
        json.dump({"init": init, "block_bytes": block_bytes, "steps": steps}, f)
    trainer.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
