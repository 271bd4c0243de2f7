"""Where each block's state lives, device or host: the one module that moves tensors between them.

``dblocks.offload`` (sequential mode; one process holds every block, sharded or not):

- ``"none"``: every block's parameters and AdamW state stay on the device; nothing moves.
- ``"optimizer"``: the AdamW state (``exp_avg``, ``exp_avg_sq``) of every block that is not training
  lives in host memory.
- ``"block"``: the parameters' local shards too. Under FSDP2 a parameter's local shard is one
  storage, behind both ``FSDPParam._sharded_param_data`` (the padded flat shard the all-gather copies
  in at every unshard) and the sharded DTensor's ``_local_tensor`` (what the optimizer updates);
  without FSDP it is the plain parameter's storage. Emptying and refilling that storage is all
  FSDP needs: its tensors, bookkeeping and the optimizer's references stay as they are.

``dblocks.block_step`` (``offload = "block"`` only) says where the training block's optimizer step runs:

- ``"device"`` (default): its AdamW state is copied in with it and written back with it at every switch
  (parameters + AdamW state, 12 bytes per fp32 parameter each way; nothing moves while a block repeats).
- ``"host"``: its AdamW state never leaves the host. Each step copies the block's gradients out
  (4 bytes per parameter) and AdamW steps the block there, on the host copies (titan's CPU offload does
  the same for every parameter); the updated parameters come back in for the next step (4 bytes per
  parameter), prefetched like a new block's. The device holds the step's block's parameters and
  gradients and never its AdamW state.

The shared modules (embeddings, head, time embedder, final adaLN, norm) train at every step and stay
resident; so do the ``step`` counters (scalars).

How :class:`BlockOffload` does it:

1. At set-up each storage of a block's layers (per kind: ``params`` / ``optimizer``) gets a host copy
   of its bytes (pinned when the device is CUDA) and its device storage is freed
   (``untyped_storage().resize_(0)``).
2. ``with store.step(b, b_next):`` around titan's optimizer step. When the copies happen
   (``prefetch``) decides the device peak:

   - ``"after_step"`` (default; the peak is ONE block): at the step's start b's parameters are resident
     (prefetched by the step before; else copied in now and waited for) and b's AdamW state is copied
     in on the side CUDA stream, overlapping the forward and backward (the optimizer's step pre-hook
     makes the compute stream wait for it: nothing reads AdamW state before). After the optimizer step
     (on exit), unless b_next == b (``steps_per_block``: then b stays and nothing moves), b's AdamW
     state and parameters are written back and freed, and only then b_next's parameters are copied in
     on the side stream, overlapping the write-back and the next step's start (data, embeddings, time
     embedder); they take the place of b's AdamW state (2× their bytes), so the device never holds
     more than one block's parameters + AdamW state (b's gradients are still allocated then: b's
     parameters + b_next's + b's gradients = 3 of the 4 bytes-per-parameter units the step held).
   - ``"step_start"``: b_next's parameters and AdamW state are copied in at the step's start, so every
     copy overlaps the whole step, at the price of TWO blocks' parameters and AdamW state on the device
     during a step that switches blocks.

   Events order the copies against the compute stream (a side stream waits for the compute stream
   before it copies or frees; the compute stream waits for a copy's event before it reads). On CUDA the
   storages are (re-)allocated on the side stream, so a block freed after its write-back gives its
   memory, in stream order, to the next copy-in (no ``record_stream`` detour through the compute
   stream's pool). On CPU the same code runs synchronously (the "device" is host memory: what is saved
   there is nothing, what is tested is the mechanism and the accounting).
3. A model forward on a block whose parameters are on the host (validation, the eval command)
   brings them in first (a forward pre-hook on the root module, which reads the call's ``block=``),
   one borrowed block at a time; a borrowed block did not train, so it is freed without a copy back.
4. Checkpoints never need more than one extra block on the device: :meth:`checkpoint_states` gives
   titan's checkpointer Statefuls whose DCP state dicts hold the offloaded blocks on the host, with
   the same keys as ever (so a run resumes with any offload mode, and the eval reads any). Optimizer
   state: views of the host copies, read and written in place by DCP. Parameters: each offloaded
   block is brought in alone, its layers' ``state_dict`` (titan's hooks included, e.g. the fused-QKV
   split) copied to the host, and freed; on load each offloaded block is brought in alone, loaded,
   written back. :meth:`checkpoint_io` wraps a save or load: in-flight copies finish first, and after
   an asynchronous save the next eviction or host step (which overwrite host copies DCP may still be
   staging from, or free storage it reads) waits for titan's staging (``checkpointer.maybe_wait_for_staging``).
5. ``block_step = "host"``: the optimizer's step pre-hook copies the block's gradient shards to the host
   (the side stream, after the backward and titan's clip) and takes them from the device optimizer, which
   then steps only the shared modules; its step post-hook waits for the copies and runs an optimizer of the
   same class, with the same param-group hyperparameters (LR of this step, betas, weight decay, fused or
   foreach), over views of the host copies: parameters, AdamW state and the ``step`` counters of the
   device optimizer's own state, so checkpoints and resumes see one optimizer as ever. On exit the stale
   device copy is freed without a write-back and the next step's block (the same one too) comes in.
6. :meth:`report`: device-resident and host bytes by kind, the resident blocks, the bytes moved each
   way so far, and the peak of the device bytes since :meth:`reset_peak` (for tests and benchmarks).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, get_args, Literal

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from torchtitan.components.checkpoint import MODEL, OPTIMIZER
from torchtitan.config import Configurable

from dblocks_titan.parallelize import local_tensor

OffloadMode = Literal["none", "optimizer", "block"]
OFFLOAD_MODES = get_args(OffloadMode)
Prefetch = Literal["after_step", "step_start"]
PREFETCH_MODES = get_args(Prefetch)
BlockStep = Literal["device", "host"]
BLOCK_STEPS = get_args(BlockStep)
KINDS = ("params", "optimizer")
_MODE_KINDS = {"none": (), "optimizer": ("optimizer",), "block": KINDS}


@dataclass
class _Part:
    """One kind of one block's state: flat byte views over its device storages and their host copies."""

    kind: str
    device: list[torch.Tensor]
    host: list[torch.Tensor]
    resident: bool = True
    dirty: bool = False  # the device values are newer than the host copy
    ready: Any = None  # CUDA event of the copy that filled the device storages (None: nothing pending)
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = sum(h.numel() for h in self.host)


def _storages(tensors) -> dict[int, torch.UntypedStorage]:
    """The distinct non-empty storages behind ``tensors`` (DTensors: their local shards), by identity."""
    out = {}
    for t in tensors:
        storage = local_tensor(t).untyped_storage()
        if storage.nbytes():
            out.setdefault(storage._cdata, storage)
    return out


def _like(t: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` in the place of ``t``'s local tensor (a DTensor of the same spec, or ``local`` itself)."""
    if isinstance(t, DTensor):
        return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
    return local


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of ``t`` (of a DTensor: a DTensor of the same spec with a host copy of its local shard)."""
    local = local_tensor(t)
    return _like(t, torch.empty_like(local, device="cpu").copy_(local))


def _prefixed(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


class BlockOffload(Configurable):
    """The offload store of a model cut into blocks (``model.block_layers(b)``) and its optimizers."""

    @dataclass(kw_only=True, slots=True)
    class Config(Configurable.Config):
        mode: OffloadMode = "none"
        """none | optimizer (the AdamW state of the blocks that are not training on the host) | block
        (their parameters' local shards too)."""
        prefetch: Prefetch = "after_step"
        """When the next block is copied in: after_step (the device peak is one block) | step_start
        (every copy overlaps the whole step; two blocks on the device during a switching step)."""
        step: BlockStep = "device"
        """mode = block only: where the training block's optimizer step runs: device (its AdamW state
        copied in and out with it at every switch) | host (its AdamW state never leaves the host; its
        gradients are copied out and its updated parameters in, at every step)."""

    def __init__(self, config: Config, *, model: torch.nn.Module, optimizers, num_blocks: int):
        if config.mode not in OFFLOAD_MODES:
            raise ValueError(f"dblocks.offload must be one of {OFFLOAD_MODES}, got {config.mode!r}.")
        if config.prefetch not in PREFETCH_MODES:
            raise ValueError(f"dblocks.prefetch must be one of {PREFETCH_MODES}, got {config.prefetch!r}.")
        if config.step not in BLOCK_STEPS or (config.step == "host" and config.mode != "block"):
            raise ValueError(f"dblocks.block_step must be 'device', or 'host' with dblocks.offload = 'block', got "
                             f"{config.step!r} with {config.mode!r}.")
        self.mode, self.model, self.optimizers, self.num_blocks = config.mode, model, optimizers, num_blocks
        self.prefetch = config.prefetch
        self.kinds = _MODE_KINDS[config.mode]
        self.host_step = config.step == "host"
        self.training_kinds = ("params",) if self.host_step else self.kinds  # what a training step brings in
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.side = torch.cuda.Stream(self.device) if cuda and self.kinds else None
        self.moved = {"h2d": 0, "d2h": 0}
        self.borrowed: int | None = None  # a block brought in for a forward outside training
        self._staging = None  # a checkpointer whose async staging the next eviction waits for
        self._views: dict[str, torch.Tensor] = {}  # optimizer key -> device tensor, during a load
        self.parts: dict[tuple[int, str], _Part] = {}
        self._resident = dict.fromkeys(KINDS, 0)  # bytes of the parts on the device now, by kind
        self._peak = dict(self._resident)  # ... at the moment their sum was largest since reset_peak()
        self._awaited: _Part | None = None  # the step's AdamW state, waited for before the optimizer step
        self._host_of: dict[int, tuple[_Part, torch.Tensor]] = {}  # device storage -> (part, host copy)
        self._training: int | None = None  # the block of the step in progress
        self._block_params: dict[int, list[torch.Tensor]] = {}
        self._grads_host: dict[tuple, torch.Tensor] = {}  # host step: gradient buffers, shared by the blocks
        self._host_grads: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # optimizer -> (param, host grad)
        self._group_of: dict[int, tuple[Any, int]] = {}  # host step: param -> (its optimizer, its param group)
        if not self.kinds:  # (a block-parallel rank does not even hold every block)
            return
        for block in range(num_blocks):
            params = self._block_params[block] = [p for layer in model.block_layers(block) for p in layer.parameters()]
            tensors = {"params": params, "optimizer": self._state_tensors(params)}
            for kind in self.kinds:
                storages = _storages(tensors[kind])
                host = [torch.empty(s.nbytes(), dtype=torch.uint8, pin_memory=cuda) for s in storages.values()]
                device = [torch.empty(0, dtype=torch.uint8, device=s.device).set_(s) for s in storages.values()]
                part = self.parts[block, kind] = _Part(kind, device, host, dirty=True)
                self._resident[kind] += part.nbytes  # resident until the eviction below
                self._host_of.update({key: (part, h) for key, h in zip(storages, host)})
        if "params" in self.kinds:
            if isinstance(model, FSDPModule):  # FSDP's lazy init re-pads local shards: run it while they are full
                model._get_fsdp_state()._lazy_init()
            self._default_block = inspect.signature(model.forward).parameters["block"].default
            model.register_forward_pre_hook(self._bring_in_for_forward, with_kwargs=True, prepend=True)
        for optimizer in optimizers if self.host_step else ():
            self._group_of.update({id(p): (optimizer, i) for i, group in enumerate(optimizer.param_groups)
                                   for p in group["params"]})
            optimizer.register_step_pre_hook(self._grads_to_host)
            optimizer.register_step_post_hook(self._step_on_host)
        for optimizer in optimizers if "optimizer" in self.training_kinds else ():
            optimizer.register_step_pre_hook(self._before_optimizer_step)
        for part in self.parts.values():
            self._evict(part)
        self.synchronize()
        self.reset_peak()

    def _state_tensors(self, params) -> list[torch.Tensor]:
        """The optimizer's state tensors of ``params`` (not the scalar ``step``)."""
        return [v for optimizer in self.optimizers for p in params for v in optimizer.state.get(p, {}).values()
                if isinstance(v, torch.Tensor) and v.numel() > 1]

    # -- moving one part --------------------------------------------------------------------

    def _side_stream(self):
        """Context for a copy: on CUDA the side stream, after the compute stream's work so far."""
        if self.side is None:
            return nullcontext()
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.side)

    def _fill(self, part: _Part) -> None:
        """Re-allocate ``part`` on the device and copy it in from the host (both on the side stream)."""
        if part.resident:
            return
        with torch.no_grad(), self._side_stream():
            for d, h in zip(part.device, part.host):
                d.untyped_storage().resize_(d.numel())
                d.copy_(h, non_blocking=True)
        if self.side is not None:
            part.ready = torch.cuda.Event()
            part.ready.record(self.side)
        part.resident, part.dirty = True, False
        self.moved["h2d"] += part.nbytes
        self._count(part, +1)

    def _count(self, part: _Part, sign: int) -> None:
        """Book ``part`` in (+1) or out (−1) of the device bytes, and keep their peak."""
        self._resident[part.kind] += sign * part.nbytes
        if sum(self._resident.values()) > sum(self._peak.values()):
            self._peak = dict(self._resident)

    def _use(self, part: _Part) -> None:
        """The compute stream waits for the copy that filled ``part``."""
        if part.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(part.ready)
            part.ready = None

    def _evict(self, part: _Part) -> None:
        """Write ``part`` back to the host if it changed, then free its device storage."""
        if not part.resident:
            return
        self._wait_for_staging()
        self._use(part)  # an unused prefetch is complete before its memory is reused
        with torch.no_grad(), self._side_stream():  # after the compute stream's reads, the copy, then the free
            if part.dirty:
                for d, h in zip(part.device, part.host):
                    h.copy_(d, non_blocking=True)
                    if self.side is not None:
                        d.record_stream(self.side)  # a storage first allocated on the compute stream
                self.moved["d2h"] += part.nbytes
            for d in part.device:
                d.untyped_storage().resize_(0)
        part.resident = part.dirty = False
        self._count(part, -1)

    def _wait_for_staging(self) -> None:
        if self._staging is not None:
            self._staging.maybe_wait_for_staging()
            self._staging = None

    def synchronize(self) -> None:
        """Every copy issued so far is complete (host copies and device storages hold their values)."""
        if self.side is not None:
            self.side.synchronize()

    # -- what the trainer, the validator and the eval ask for -------------------------------------

    def _parts(self, block: int) -> list[_Part]:
        return [self.parts[block, kind] for kind in self.training_kinds]

    @contextmanager
    def step(self, block: int, next_block: int | None):
        """Around one optimizer step on ``block``: its parameters resident (for the compute stream) in
        the body and its AdamW state by the optimizer step (``block_step = "host"``: the step runs on the
        host, see the module docstring, 5); ``block`` written back and freed afterwards unless it is
        ``next_block`` (``None``: no next step; host step: the device copy is stale, so it is freed
        without a write-back and comes in again); ``next_block``'s state copied in on the side stream,
        after the step or at its start (``prefetch``: module docstring, step 2)."""
        if not self.kinds:
            yield
            return
        early = self.prefetch == "step_start" and next_block not in (None, block)
        self._give_back(keep=(block, next_block) if early else (block,))
        params = self.parts.get((block, "params"))
        state = self.parts.get((block, "optimizer")) if "optimizer" in self.training_kinds else None
        if params is not None:
            self._fill(params)
            self._use(params)
            params.dirty = not self.host_step  # a device step will change it; a host step changes the host copy
        if state is not None:
            self._fill(state)  # overlaps the forward and backward; waited for by _before_optimizer_step
            state.dirty = True
            self._awaited = state
        if early:
            for part in self._parts(next_block):
                self._fill(part)
        self._training = block
        try:
            yield
        finally:
            self._training = None
        self._awaited = None
        if next_block == block and not self.host_step:
            return
        for part in (state, params):  # the AdamW state first: the next block's parameters take its place
            if part is not None:
                self._evict(part)
        upcoming = self.parts.get((next_block, "params"))
        if upcoming is not None and not early:
            self._fill(upcoming)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        """The optimizer's step pre-hook: the compute stream waits for the step's AdamW state."""
        if self._awaited is not None:
            self._use(self._awaited)

    def _grads_to_host(self, optimizer, args, kwargs) -> None:
        """Host step, the optimizer's step pre-hook: the step's block's gradient shards are copied to the
        host (side stream, after the backward and the clip) and taken from the device optimizer, which
        then steps the shared modules only."""
        if self._training is None:
            return
        pending = []
        with torch.no_grad(), self._side_stream():
            for i, p in enumerate(self._block_params[self._training]):
                if p.grad is None or self._group_of[id(p)][0] is not optimizer:
                    continue
                grad = local_tensor(p.grad)
                host = self._grad_buffer(i, grad)
                host.copy_(grad, non_blocking=True)
                if self.side is not None:
                    grad.record_stream(self.side)
                self.moved["d2h"] += grad.numel() * grad.element_size()
                pending.append((p, host))
        for p, _ in pending:
            p.grad = None
        self._host_grads[id(optimizer)] = pending

    def _grad_buffer(self, index: int, grad: torch.Tensor) -> torch.Tensor:
        """The host buffer of a block's ``index``-th gradient shard (one set for all blocks of one shape)."""
        key = (index, tuple(grad.shape), grad.dtype)
        if key not in self._grads_host:
            self._grads_host[key] = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=self.side is not None)
        return self._grads_host[key]

    def _step_on_host(self, optimizer, args, kwargs) -> None:
        """Host step, the optimizer's step post-hook: once the gradients are on the host, an optimizer of
        ``optimizer``'s class steps the block over views of the host copies (parameters, state), each
        parameter in its own param group's hyperparameters; ``step`` counters on the device are copied
        to the host and back."""
        pending = self._host_grads.pop(id(optimizer), None)
        if not pending:
            return
        self._wait_for_staging()  # an async checkpoint may still be staging from the host copies this step writes
        self.synchronize()  # the gradients are on the host
        groups: dict[int, dict] = {}
        state, steps = {}, []
        for p, grad in pending:
            i = self._group_of[id(p)][1]
            if i not in groups:
                groups[i] = {k: v.cpu() if isinstance(v, torch.Tensor) else v
                             for k, v in optimizer.param_groups[i].items() if k != "params"}
                groups[i]["params"] = []
            group = groups[i]
            view = self._host_local(p)
            view.grad = grad
            group["params"].append(view)
            state[view] = {}
            for key, value in optimizer.state[p].items():
                if isinstance(value, torch.Tensor) and local_tensor(value).untyped_storage()._cdata in self._host_of:
                    value = self._host_local(value)  # the AdamW state
                elif isinstance(value, torch.Tensor) and value.device.type != "cpu":  # the step counter (fused)
                    steps.append((value, host := value.cpu()))
                    value = host
                state[view][key] = value
        on_host = type(optimizer)(list(groups.values()))
        on_host.state.update(state)
        on_host.step()
        for device, host in steps:
            device.copy_(host)

    def bring_in(self, block: int) -> None:
        """``block``'s parameters on the device for a forward outside training (at most one such
        borrowed block: the previous one is freed)."""
        part = self.parts.get((block, "params"))
        if part is None or part.resident:
            if part is not None:
                self._use(part)
            return
        self._give_back()
        self._fill(part)
        self._use(part)
        self.borrowed = block

    def _give_back(self, keep=()) -> None:
        """Free the borrowed block (not written back unless loaded into), unless it is in ``keep``."""
        if self.borrowed is not None and self.borrowed not in keep:
            self._evict(self.parts[self.borrowed, "params"])
        self.borrowed = None

    def _bring_in_for_forward(self, module, args, kwargs):
        self.bring_in(kwargs.get("block", self._default_block))

    def reset_peak(self) -> None:
        """Start a new peak window (``report()["peak"]``) at the bytes resident now."""
        self._peak = dict(self._resident)

    def report(self) -> dict[str, Any]:
        """``device``: bytes by kind the model's parameters (local shards) and the optimizer's state hold
        in device storage now, shared modules included (each storage once; on CPU: outside the store);
        ``host``: the store's host copies by kind; ``resident``: the blocks whose kind is on the device;
        ``moved``: bytes copied ``h2d`` / ``d2h`` so far; ``peak_blocks``: the bytes by kind of the
        blocks' state on the device at the moment their sum was largest since :meth:`reset_peak`;
        ``peak``: ``device`` with the blocks' share at that moment (the shared modules' state does not
        move)."""
        params = [p for p in self.model.parameters()]
        state = [v for optimizer in self.optimizers for s in optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.device == self.device]
        device = {kind: sum(s.nbytes() for s in _storages(ts).values()) for kind, ts in zip(KINDS, (params, state))}
        host = {kind: sum(p.nbytes for (_, k), p in self.parts.items() if k == kind) for kind in KINDS}
        if self.host_step:
            host["grads"] = sum(h.numel() * h.element_size() for h in self._grads_host.values())
        resident = {kind: sorted(b for (b, k), p in self.parts.items() if k == kind and p.resident) for kind in self.kinds}
        peak = {kind: device[kind] - self._resident[kind] + self._peak[kind] for kind in KINDS}
        return {"device": device, "host": host, "resident": resident, "moved": dict(self.moved),
                "peak_blocks": dict(self._peak), "peak": peak}

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint_states(self) -> dict[str, Any]:
        """Entries for titan's ``checkpointer.states`` that read and write the offloaded blocks on the
        host (none for ``offload = "none"``: titan's own ModelWrapper and OptimizersContainer)."""
        states = {}
        if "params" in self.kinds:
            states[MODEL] = _Stateful(self._model_state_dict, self._load_model_state_dict)
        if "optimizer" in self.kinds:
            states[OPTIMIZER] = _Stateful(self._optimizer_state_dict, self._load_optimizer_state_dict)
        return states

    @contextmanager
    def checkpoint_io(self, checkpointer):
        """Around a DCP save or load by ``checkpointer``: see the module docstring, step 4."""
        self.synchronize()
        try:
            yield
        finally:
            self._staging = checkpointer

    def _units(self) -> tuple[list[tuple[str, torch.nn.Module]], dict[int, list[tuple[str, torch.nn.Module]]]]:
        """(prefix, module) of the shared modules, and per block of its layers: the model's state
        dict is the union of theirs."""
        shared = [(f"{name}.", child) for name, child in self.model.named_children() if name != "layers"]
        names = {id(layer): name for name, layer in self.model.layers.items()}
        blocks = {b: [(f"layers.{names[id(layer)]}.", layer) for layer in self.model.block_layers(b)]
                  for b in range(self.num_blocks)}
        return shared, blocks

    def _model_state_dict(self) -> dict[str, Any]:
        self._give_back()  # a borrowed block's storage must not be freed while DCP holds it
        shared, blocks = self._units()
        state = {k: v for prefix, module in shared for k, v in module.state_dict(prefix=prefix).items()}
        for block, layers in blocks.items():
            on_host = not self.parts[block, "params"].resident
            self.bring_in(block)
            for prefix, layer in layers:
                part = layer.state_dict(prefix=prefix)
                state.update({k: _to_host(v) for k, v in part.items()} if on_host else part)
        self._give_back()
        return state

    def _load_model_state_dict(self, state_dict: dict[str, Any]) -> None:
        shared, blocks = self._units()
        for prefix, module in shared:
            module.load_state_dict(_prefixed(state_dict, prefix), strict=False)
        for block, layers in blocks.items():
            self.bring_in(block)
            for prefix, layer in layers:
                layer.load_state_dict(_prefixed(state_dict, prefix), strict=False)
            self.parts[block, "params"].dirty = True
            self._give_back()

    def _host_local(self, t: torch.Tensor) -> torch.Tensor:
        """``t``'s local tensor as a view of its host copy."""
        local = local_tensor(t)
        _, host = self._host_of[local.untyped_storage()._cdata]
        return host.view(local.dtype).as_strided(local.size(), local.stride(), local.storage_offset())

    def _host_view(self, t: torch.Tensor) -> torch.Tensor | None:
        """``t`` as a view of its host copy when its device storage is offloaded, else None."""
        part, _ = self._host_of.get(local_tensor(t).untyped_storage()._cdata, (None, None))
        if part is None or part.resident:
            return None
        return _like(t, self._host_local(t))

    def _optimizer_state_dict(self) -> dict[str, Any]:
        state, self._views = {}, {}
        for key, value in self.optimizers.state_dict().items():
            view = self._host_view(value) if isinstance(value, torch.Tensor) else None
            if view is not None:
                self._views[key] = value
            state[key] = value if view is None else view
        return state

    def _load_optimizer_state_dict(self, state_dict: dict[str, Any]) -> None:
        """DCP has read the offloaded values into their host copies: hand the optimizer its own device
        tensors for those keys (``load_state_dict`` keeps a tensor already on its device as is)."""
        self.optimizers.load_state_dict({k: self._views.get(k, v) for k, v in state_dict.items()})


class _Stateful(Stateful):
    """What titan's checkpointer saves and loads under one key, from the store's two functions."""

    def __init__(self, save, load):
        self._save, self._load = save, load

    def state_dict(self) -> dict[str, Any]:
        return self._save()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load(state_dict)
