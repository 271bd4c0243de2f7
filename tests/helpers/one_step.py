"""Run under torchrun (or plainly): build the debug DB trainer, take STEPS optimizer steps on a
fixed block, and write what each rank sees to <out>/rank<r>.json.

Usage: one_step.py OUT_DIR BLOCK STEPS [extra CLI overrides...]
(From zero-init adaLN/head, a layer's weights first move on the third step on a block.)
"""

import json
import os
import sys

import dblocks_titan  # noqa: F401
from dblocks_titan.train import _single_process_env


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def main() -> None:
    out, block, steps, overrides = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    _single_process_env()
    from dblocks_titan.toml_config import TomlConfigManager

    config = TomlConfigManager().parse_args(
        ["--job.config_file", "train_configs/debug_dblocks.toml", "--dump_folder", out, "--training.steps", str(steps),
         "--validator.no-enable", *overrides]
    )
    trainer = config.build()
    model = trainer.model_parts[0]
    before = {n: full(p) for n, p in model.named_parameters()}
    trainer.schedule.next = lambda: block
    data = trainer.batch_generator(trainer.dataloader)
    for _ in range(steps):
        trainer.step += 1
        trainer.train_step(data)
    layer_ids = {n.split(".")[1] for n in before if n.startswith("layers.")}
    active = {str(i) for i in range(len(layer_ids)) if i // (len(layer_ids) // config.dblocks.num_blocks) == block}
    report = {"active_layers": sorted(active), "unchanged": [], "changed": [], "grad_none": [], "grad_set": []}
    for name, p in model.named_parameters():
        (report["unchanged"] if full(p).equal(before[name]) else report["changed"]).append(name)
        (report["grad_none"] if p.grad is None else report["grad_set"]).append(name)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    trainer.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
