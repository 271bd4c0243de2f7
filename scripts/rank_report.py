"""What each rank holds: build a trainer from a TOML config (+ CLI overrides) under torchrun (or
as one process), take STEPS optimizer steps, and write per rank r:

- ``<out>/rank<r>.json``: its block (block-parallel), the local bytes of every parameter, of the
  gradients and of the optimizer state, the parameters whose (local shard) moved and those that
  hold a gradient after the last step, and every parameter's learning rate for the next step;
- ``<out>/shared<r>.pt``: the full values of the shared (non-layer) parameters;
- ``<out>/grads<r>.pt``: the full gradients of the last step.

Usage: rank_report.py OUT_DIR CONFIG STEPS [extra CLI overrides...]
With DBLOCKS_FIXED_BATCHES=1 the data are random token batches (below [MASK] for masked
diffusion) numbered by their global
micro-batch index (step, rank, micro-batch), so one process accumulating 2 micro-batches sees
exactly what 2 ranks taking one each see. With DBLOCKS_FIXED_BLOCK=b every step trains block b. With
DBLOCKS_AS_RANK=r/W one process takes the batches and the noise of rank r of a W-rank run (e.g. to
replay one block-parallel group's step sequentially). With DBLOCKS_COUNT_COMM=1 every collective of
the last step is counted (``bench_common.CollectiveCounter``) into ``<out>/comm<r>.json``. With
DBLOCKS_MEMORY=1 every step is measured (:func:`measure_memory`) into ``<out>/memory<r>.json``. A run resumed from a checkpoint (``--checkpoint.enable``
with one under OUT_DIR) continues to step STEPS; checkpoints are saved at titan's interval.
Used by the tests and by ``bench_per_rank.py``.
"""

import contextlib
import json
import os
import sys

import torch

import dblocks_titan  # noqa: F401
from dblocks_titan.parallelize import local_tensor
from dblocks_titan.train import _single_process_env


def clean(name: str) -> str:
    """The parameter's name in the plain model (without AC / compile wrapper segments)."""
    return name.replace("._checkpoint_wrapped_module", "").replace("._orig_mod", "")


def nbytes(t: torch.Tensor) -> int:
    t = local_tensor(t)
    return t.numel() * t.element_size()


def resident(p: torch.Tensor) -> bool:
    """The parameter's local shard is on the device (``offload = "block"`` frees the others' storage)."""
    return local_tensor(p).untyped_storage().nbytes() > 0 or local_tensor(p).numel() == 0


def measure_memory(trainer, step_fn) -> dict:
    """One step under the byte counters: the activation bytes autograd saves (peak, by module tag;
    ``bench_common.SavedTensorAccountant``, FSDP2's unsharded parameters excluded), the peak of FSDP2's
    unsharded parameters and gradients (sampled at every save and unpack), the local gradient bytes at
    their largest, as the optimizer step starts or after it (kept until the next step's zero_grad;
    ``block_step = "host"`` takes the block's gradients off the device in the step), and the offload
    store's bytes moved in the step
    (saved tensors outside every module, the loss's, are tagged ``(loss)``)."""
    import bench_common as bc  # scripts/ is this script's sys.path[0]

    model = trainer.model_parts[0]
    unsharded = [0]

    def sample():
        unsharded[0] = max(unsharded[0], bc.fsdp_unsharded_bytes(model))

    store = getattr(trainer, "offload", None)
    moved = dict(store.moved) if store is not None else {}
    grads = [0]

    def grad_bytes(*_):
        grads[0] = max(grads[0], sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None))

    # the container's pre-hook runs before its optimizers' own (the offload store's host step among them)
    hook = trainer.optimizers.register_step_pre_hook(grad_bytes)
    acct = bc.SavedTensorAccountant(exclude=[local_tensor(p) for p in model.parameters()] + list(model.buffers()),
                                    exclude_if=bc.is_parameter_view, on_use=sample).track_modules(model)
    with bc.count_selective_ac(), acct:
        step_fn()
    acct.remove_module_hooks()
    hook.remove()
    grad_bytes()
    return {"block": getattr(trainer, "block", None), "act_peak": acct.peak_bytes,
            "act_by_tag": {"(loss)" if k is None else k: v for k, v in acct.peak_by_tag.items()},
            "unsharded_peak": unsharded[0],
            "grad_bytes": grads[0],
            "moved": {k: store.moved[k] - v for k, v in moved.items()}}


def fixed_batches(trainer, rank: int, world: int):
    """Micro-batch k = (step − 1)·W·A + rank·A + j of uniform random tokens (W ranks, A accumulation)."""
    accum = trainer.gradient_accumulation_steps
    shape = (trainer.config.training.local_batch_size, trainer.config.training.seq_len + 1)
    vocab = getattr(trainer.model_config, "mask_id", trainer.model_config.vocab_size)  # clean text never holds [MASK]
    while True:
        for j in range(accum):  # drawn inside train_step, after trainer.step was advanced
            k = (trainer.step - 1) * world * accum + rank * accum + j
            tokens = torch.randint(vocab, shape, generator=torch.Generator().manual_seed(k))
            trainer.metrics_processor.data_loading_times.append(0.0)  # what titan's batch_generator logs
            yield {"input": tokens[:, :-1]}, tokens[:, 1:]


def main() -> None:
    out, config_file, steps, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    _single_process_env()
    from torchtitan.tools.logging import init_logger

    from dblocks_titan.toml_config import TomlConfigManager

    init_logger()
    config = TomlConfigManager().parse_args(
        ["--job.config_file", config_file, "--dump_folder", out, "--training.steps", str(steps), *overrides]
    )
    trainer = config.build()
    if config.checkpoint.enable:  # e.g. a seed checkpoint: the same initial weights for any mesh
        trainer.checkpointer.load(step=config.checkpoint.load_step)
    if "DBLOCKS_FIXED_BLOCK" in os.environ:
        trainer.schedule.next = trainer.schedule.peek = lambda: int(os.environ["DBLOCKS_FIXED_BLOCK"])
    model = trainer.model_parts[0]
    before = {n: local_tensor(p).detach().clone() for n, p in model.named_parameters() if resident(p)}
    as_rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if "DBLOCKS_AS_RANK" in os.environ:
        as_rank, world = (int(x) for x in os.environ["DBLOCKS_AS_RANK"].split("/"))
        trainer._rank = as_rank  # the noise of that rank (DBlocksTrainer._noise_generator)
    fixed = os.environ.get("DBLOCKS_FIXED_BATCHES") == "1"
    data = fixed_batches(trainer, as_rank, world) if fixed else trainer.batch_generator(trainer.dataloader)
    counter, memory = None, os.environ.get("DBLOCKS_MEMORY") == "1"
    store = getattr(trainer, "offload", None)
    if store is not None:
        store.reset_peak()
    steps_measured = []
    while trainer.step < steps:
        trainer.step += 1
        if trainer.step == steps and os.environ.get("DBLOCKS_COUNT_COMM") == "1":
            from bench_common import CollectiveCounter  # scripts/ is this script's sys.path[0]

            counter = CollectiveCounter()
        with counter or contextlib.nullcontext():
            if memory:
                steps_measured.append(measure_memory(trainer, lambda: trainer.train_step(data)))
            else:
                trainer.train_step(data)
        trainer.checkpointer.save(trainer.step)
    optim_bytes = sum(
        nbytes(v) for opt in trainer.optimizers for state in opt.state.values() for v in state.values()
        if isinstance(v, torch.Tensor)
    )
    lr = {id(p): group["lr"] for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
    rank = int(os.environ.get("RANK", "0"))
    report = {
        "block": getattr(trainer, "own_block", None),
        "param_bytes": {clean(n): nbytes(p) for n, p in model.named_parameters()},
        "param_numel": {clean(n): p.numel() for n, p in model.named_parameters()},  # of the whole tensor
        "optimizer_bytes": optim_bytes,
        "grad_bytes": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
        "changed": [clean(n) for n, p in model.named_parameters()  # (blocks offloaded then or now: not compared)
                    if n in before and resident(p) and not local_tensor(p).equal(before[n])],
        "grad_set": [clean(n) for n, p in model.named_parameters() if p.grad is not None],
        "lr": {clean(n): lr[id(p)] for n, p in model.named_parameters()},  # its param group's, for the next step
        "offload": trainer.offload.report() if hasattr(trainer, "offload") else None,
        "trace": getattr(trainer, "_trace_path", None),
    }
    is_block_parameter = getattr(model, "is_block_parameter", lambda n: n.startswith("layers."))
    shared = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in model.named_parameters() if not is_block_parameter(n)}
    torch.save(shared, os.path.join(out, f"shared{rank}.pt"))
    grads = {clean(n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters() if p.grad is not None}
    torch.save(grads, os.path.join(out, f"grads{rank}.pt"))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if memory:
        with open(os.path.join(out, f"memory{rank}.json"), "w") as f:
            json.dump({"steps": steps_measured, "store": None if store is None else store.report(),
                       "param_bytes": sum(nbytes(p) for p in model.parameters()), "optimizer_bytes": optim_bytes,
                       "param_numel_local": sum(local_tensor(p).numel() for p in model.parameters()),
                       "cpu_offload": config.training.enable_cpu_offload}, f)
    if counter is not None:
        with open(os.path.join(out, f"comm{rank}.json"), "w") as f:
            json.dump({"records": counter.records, "kernel_numel": counter.kernel_numel(),
                       "input_numel": counter.input_numel()}, f)
    trainer.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
