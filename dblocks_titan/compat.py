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


def default_spmd_backend() -> str:
    """The ``parallelism.spmd_backend`` our recipes use.

    Reason: torch 2.13 with titan 0.3.0's default "spmd_types" fails as soon as
    data parallelism is > 1; "partial_dtensor" (DTensor on model-parallel axes only)
    is titan's other supported backend and works on CPU and GPU.
    """
    return "partial_dtensor"


def apply() -> None:
    """Apply the import-time patches (device first: titan reads it on import)."""
    patch_cpu_device()
    patch_pg_timeouts()
    patch_restart_store()
