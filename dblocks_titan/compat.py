"""Every patch dblocks_titan applies to torch / torchtitan, each with its reason.

Nothing here changes behaviour on a machine where the patched thing already works:
each patch is applied only when it is needed (no CUDA device, a missing torch API,
a gloo process group). Import this module before torchtitan (``dblocks_titan``'s
``__init__`` does) so the device patch is in place when titan reads the device type.
"""

from __future__ import annotations

import os
import types
from datetime import timedelta

import torch

_applied: set[str] = set()


def _once(name: str) -> bool:
    if name in _applied:
        return False
    _applied.add(name)
    return True


def patch_cpu_device() -> None:
    """Let torchtitan run on a machine without an accelerator.

    Reason: ``torchtitan.tools.utils`` computes ``_get_available_device_type() or
    "cuda"`` at import, so on a CPU-only machine it picks "cuda" and fails; and
    ``DeviceMemoryMonitor`` calls CUDA-style memory functions that ``torch.cpu``
    lacks. We make the device type "cpu" and give ``torch.cpu`` inert memory
    functions (CPU peak memory is reported as 0; benchmarks measure it themselves).
    """
    if torch.cuda.is_available() or not _once("cpu_device"):
        return
    import sys

    from torch import _utils as torch_utils

    torch_utils._get_available_device_type = lambda: "cpu"
    # When titan was imported first (``python -m torchtitan.train --module dblocks_titan``),
    # its modules already bound device_type = "cuda": rebind them.
    for name, module in list(sys.modules.items()):
        if name.startswith("torchtitan") and getattr(module, "device_type", None) == "cuda":
            module.device_type, module.device_module = "cpu", torch.cpu

    props = types.SimpleNamespace(total_memory=1)
    fill = {
        "get_device_name": lambda device=None: "cpu",
        "get_device_properties": lambda device=None: props,
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
        "memory_stats": lambda device=None: {},
    }
    for name, fn in fill.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)


def patch_fsdp_mesh_dims() -> None:
    """Give ``torch.distributed.fsdp`` a ``DataParallelMeshDims`` where torch lacks it.

    Reason: titan 0.3.0 imports ``DataParallelMeshDims`` from ``torch.distributed.fsdp`` at import
    time (``torchtitan.distributed.full_dtensor``, reached from the trainer), and torch 2.11 (the
    GPU machine's torch) does not have it: torch 2.13 does. Titan uses it only for
    ``parallelism.spmd_backend`` "full_dtensor" / "spmd_types"; with our "partial_dtensor"
    (:func:`default_spmd_backend`) it passes ``dp_mesh_dims=None`` and never builds one. The
    stand-in makes the import succeed and fails with one line if a full-DTensor mesh asks for it.
    Must run before torchtitan is imported; ``python -m torchtitan.train`` imports titan before
    any plugin, so on such a torch launch with ``python -m dblocks_titan.train`` instead.
    """
    import torch.distributed.fsdp as fsdp

    if hasattr(fsdp, "DataParallelMeshDims") or not _once("fsdp_mesh_dims"):
        return

    class DataParallelMeshDims:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(
                f"parallelism.spmd_backend 'full_dtensor' / 'spmd_types' needs torch.distributed.fsdp."
                f"DataParallelMeshDims, which torch {torch.__version__} lacks: use "
                f"--parallelism.spmd_backend partial_dtensor (the default of dblocks_titan's recipes)."
            )

    DataParallelMeshDims.__module__ = "torch.distributed.fsdp"
    fsdp.DataParallelMeshDims = DataParallelMeshDims


def patch_grouped_fsdp_units() -> None:
    """Shard titan's ``[norm, lm_head]`` FSDP unit as two units where torch's FSDP2 cannot run it.

    Reason: titan 0.3.0's ``apply_fsdp_to_decoder`` puts ``norm`` and ``lm_head`` in one FSDP unit,
    and its ``ChunkedLossWrapper`` (our AR and masked losses too) calls the model with the head
    skipped, then the head per chunk, then ``lm_head.reshard()``. torch 2.13's FSDP2 completes a
    unit whose modules did not all run from the root's post-forward
    (``FSDPState._force_complete_incomplete_states``), so the norm's output gets its pre-backward
    hook. torch 2.11 (the GPU machine's) does not: the norm's output has no hook, the unit is
    resharded before the decoder's backward reaches the norm, and that backward reads the freed
    unsharded weight (a segfault in ``MulBackward0`` on CPU; garbage or an illegal access on GPU).
    As separate units each module completes its own forward. Lists whose modules share a
    parameter (tied embeddings) stay one unit.
    """
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    if hasattr(FSDPState, "_force_complete_incomplete_states") or not _once("grouped_fsdp_units"):
        return
    import torchtitan.distributed.fsdp as titan_fsdp

    fully_shard = titan_fsdp.fully_shard

    def fully_shard_each(module, **kwargs):
        if isinstance(module, (list, tuple)):
            params = [{id(p) for p in m.parameters()} for m in module]
            if sum(map(len, params)) == len(set().union(*params)):  # no parameter shared
                return [fully_shard(m, **kwargs) for m in module]
        return fully_shard(module, **kwargs)

    titan_fsdp.fully_shard = fully_shard_each


def patch_cpu_offload_without_accelerator() -> None:
    """Let titan's ``--training.enable_cpu_offload`` (FSDP2 ``CPUOffloadPolicy``) run without an
    accelerator (CPU tests and benchmarks; on CPU the "host" is the device, so nothing is saved, but
    the same code runs and its copies can be counted).

    Reasons: titan then asks c10d for the backend ``"cpu:gloo,cpu:gloo"`` (its device backend plus a
    CPU one for the offloaded tensors' collectives: the same one here), which c10d rejects as a
    duplicate device type; and titan's ``CPUOffloadPolicy()`` pins its host memory, which needs an
    accelerator. Without one: no extra CPU backend, and unpinned host memory.
    """
    if torch.cuda.is_available() or not _once("cpu_offload"):
        return
    import functools

    import torchtitan.distributed.fsdp as titan_fsdp
    import torchtitan.distributed.utils as dist_utils
    from torch.distributed.fsdp import CPUOffloadPolicy

    init_distributed = dist_utils.init_distributed

    def init_without_cpu_backend(*args, enable_cpu_backend: bool = False, **kwargs):
        return init_distributed(*args, **kwargs)

    dist_utils.init_distributed = init_without_cpu_backend
    titan_fsdp.CPUOffloadPolicy = functools.partial(CPUOffloadPolicy, pin_memory=False)


def patch_pg_timeouts() -> None:
    """Replace ``torchtitan.distributed.utils.set_pg_timeouts``.

    Reason: titan 0.3.0 calls ``torch.distributed.set_timeout``, which torch 2.13
    does not have (on GPU too), and a ``barrier(device_ids=...)`` that gloo rejects.
    The replacement does the same job with ``distributed_c10d._set_pg_timeout``.
    """
    if hasattr(torch.distributed, "set_timeout") or not _once("pg_timeouts"):
        return
    import torchtitan.distributed.utils as dist_utils
    import torchtitan.trainer as titan_trainer
    from torch.distributed import distributed_c10d

    def set_pg_timeouts(timeout: timedelta, parallel_dims) -> None:
        torch.distributed.barrier()
        groups = [m.get_group() for m in parallel_dims.get_all_one_dimensional_meshes().values()]
        for group in groups + [None]:
            distributed_c10d._set_pg_timeout(timeout, group)

    dist_utils.set_pg_timeouts = set_pg_timeouts
    titan_trainer.dist_utils.set_pg_timeouts = set_pg_timeouts


def fix_fsdp_for_gloo(model: torch.nn.Module) -> None:
    """Make FSDP2 reduce gradients with plain SUM when the process group is gloo.

    Reason: gloo has neither PREMUL_SUM nor AVG, which FSDP2 uses by default.
    titan already disables FSDP's gradient division (it normalises by the global
    token count), so SUM is exactly what is wanted.
    """
    if not torch.distributed.is_initialized() or torch.distributed.get_backend() != "gloo":
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def patch_restart_store() -> None:
    """Give each torchrun restart attempt its own keys in the agent's store.

    Reason: under ``torchrun`` (``TORCHELASTIC_USE_AGENT_STORE=True``) torch 2.13's workers connect to
    the agent's TCPStore, which ``torch.distributed.rendezvous._create_c10d_store`` assumes is new
    for every restart ("no need to add prefix for each attempt"). It is not: after a killed rank,
    the restarted workers read the dead attempt's process-group keys (gloo peer addresses) and the
    connect times out, so ``--max-restarts`` never recovers. Prefixing the workers' store with the
    restart count (``TORCHELASTIC_RESTART_COUNT``) gives every attempt fresh keys.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or not _once("restart_store"):
        return
    import importlib

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the module, not the function
    create_store = rendezvous._create_c10d_store
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")

    def create_attempt_store(*args, **kwargs):
        return torch.distributed.PrefixStore(f"/dblocks_titan/attempt_{attempt}", create_store(*args, **kwargs))

    rendezvous._create_c10d_store = create_attempt_store


def exit_after_distributed_run() -> None:
    """End a finished multi-process run (``WORLD_SIZE`` > 1) with ``os._exit(0)`` after flushing the
    logs and standard streams, so that the interpreter's own teardown does not run; a one-process run
    returns normally.

    Reason: with gloo (torch 2.13, CPU) a rank that has trained, closed its trainer and destroyed its
    process groups can still abort during interpreter finalization ("terminate called without an active
    exception", SIGABRT, exit code -6): gloo's C++ worker threads outlive the interpreter, which is a known
    torch teardown race (pytorch/pytorch#179291 was abandoned). It happened for about one 2-rank run in
    600 of the test suite. Everything the run writes is written by then: titan's ``Trainer.close``
    closes the metric loggers and the checkpointer before ``main`` returns.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import logging
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, but ``t`` itself where it already has that dtype (the same result).

    Reason: under ``torch.compile``, torch 2.11 (the GPU machine's) returns zero gradients for every
    input of a custom ``autograd.Function`` whose forward returns a no-op ``.to`` of its result (an
    fp32 run of ``_ModulatedRMSNorm`` / ``_NoisyAttention``: per-layer compile lost the norms', adaLN's
    and q/k/v projections' gradients); torch 2.13 is right. A real cast (bf16) is not affected.
    """
    return t if t.dtype == dtype else t.to(dtype)


def default_spmd_backend() -> str:
    """The ``parallelism.spmd_backend`` our recipes use.

    Reason: torch 2.13 with titan 0.3.0's default "spmd_types" fails as soon as
    data parallelism is > 1; "partial_dtensor" (DTensor on model-parallel axes only)
    is titan's other supported backend and works on CPU and GPU.
    """
    return "partial_dtensor"


def apply() -> None:
    """Apply the import-time patches (device first: titan reads it on import; the FSDP stand-in
    before anything imports titan)."""
    patch_cpu_device()
    patch_fsdp_mesh_dims()
    patch_grouped_fsdp_units()
    patch_pg_timeouts()
    patch_cpu_offload_without_accelerator()
    patch_restart_store()
