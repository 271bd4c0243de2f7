"""Shared pieces of ``bench_memory.py`` and ``bench_throughput.py`` (single process, no FSDP).

1. Models: :func:`build_model` builds the AR DiffusionBlocks decoder (``dblocks_llama``), titan's
   e2e ``Llama3Model`` twin of the same flavor, or the masked-diffusion model (``mdlm``: B = 1 is
   the end-to-end baseline), fp32, on the bench device, with every zero-initialised parameter
   (adaLN, final adaLN, DB head) given small random values so that no gradient is structurally
   zero and autograd skips no work.
2. Steps: :class:`DBStep` does what ``DBlocksTrainer._forward_backward_body`` does (the product's
   objective: ``build_objective`` → AR or masked diffusion); :class:`E2EStep` does what titan's
   ``Trainer`` does for the llama3 twin (``_skip_lm_head`` + ``ChunkedLossWrapper(CrossEntropyLoss)``,
   8 chunks, the recipe of ``config_registry.recipe("llama3")``). Both then take titan's AdamW step
   (``default_adamw``: betas (0.9, 0.95), wd 0.1, fused implementation) after grad clipping.
3. :class:`SavedTensorAccountant`: exact bytes autograd keeps for backward (see its docstring).
4. Report helpers: machine description, Markdown tables, bar charts.

Run the scripts from the repository root: ``.venv/bin/python scripts/bench_memory.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import platform
import shlex
import subprocess
import sys
import weakref
from collections import defaultdict
from typing import Callable, Iterable

import dblocks_titan  # noqa: F401  (CPU / version patches; import before torchtitan)
import torch
import torch.nn.functional as F  # noqa: F401
import torchtitan
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.optimizer import default_adamw
from torchtitan.distributed import activation_checkpoint as titan_ac
from torchtitan.models.common import FlexAttention

from dblocks_titan.models import mdlm
from dblocks_titan.models.block_denoiser import decoder_parts, flavor_kwargs
from dblocks_titan.models.dblocks_llama import baseline_config, flavor_config
from dblocks_titan.objectives import build_objective
from dblocks_titan.trainer import DBlocksConfig, init_optimizer_states

GAMMA = {"db": 0.1, "mdlm": 0.05}  # dblocks.gamma of the shipped AR / masked-diffusion configs
LR = 1e-3  # config_registry.recipe's optimizer
MAX_NORM = 1.0  # titan's training.max_norm default
CE_CHUNKS = 8  # ChunkedLossWrapper.Config.num_chunks default (the twin's recipe)


# --------------------------------------------------------------------------------------------
# Device and machine
# --------------------------------------------------------------------------------------------


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_model_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def machine_lines(device: torch.device) -> list[str]:
    import os

    lines = [
        f"- CPU: {cpu_model_name()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, torchtitan {getattr(torchtitan, '__version__', '0.3.0')}, "
        f"Python {platform.python_version()}",
    ]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    else:
        lines.append("- device: CPU (no GPU)")
    return lines


def load_line(load_at_start: float) -> str:
    """The 1-minute load average at the start and end of a run: other work on the machine skews timings."""
    import os

    return (f"- 1-minute load average: {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
            f"(the end includes this run's own threads)")


def command_line() -> str:
    return ".venv/bin/python " + " ".join(shlex.quote(a) for a in sys.argv)


# --------------------------------------------------------------------------------------------
# Models and steps
# --------------------------------------------------------------------------------------------


def model_config(kind: str, flavor: str, *, seq: int, num_blocks: int = 1, attn_backend: str = "auto",
                 vocab_size: int | None = None, n_layers: int | None = None):
    """kind "db" → DBlocksLlama.Config; "e2e" → titan Llama3Model.Config; "mdlm" → MDLM.Config
    (``num_blocks`` = 1: the end-to-end baseline ``mdlm``, else ``dblocks_mdlm``).

    ``n_layers`` overrides the flavor's depth (mdlm only: its debugmodel has 6 layers, which B = 4
    does not divide); the layers are rebuilt by ``decoder_parts`` from the flavor's other fields.
    The RoPE table is sized as the Trainer sizes it (``update_from_config``): ``seq`` positions for
    the twin and MDLM, ``seq + 1`` for AR DiffusionBlocks (noisy slot i sits at position pos_i + 1),
    not the flavor's 131072 (a 16 MiB buffer per layer at head_dim 32).
    """
    rope_len = seq
    if kind == "db":
        cfg = flavor_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size)
        rope_len = seq + 1
    elif kind == "e2e":
        cfg = baseline_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size)
    elif kind == "mdlm":
        cfg = mdlm.mdlm_config(flavor, end_to_end=num_blocks == 1, vocab_size=vocab_size)
        if n_layers is not None:
            kwargs = {**flavor_kwargs(mdlm.FLAVORS, flavor, vocab_size), "n_layers": n_layers}
            cfg.layers = decoder_parts(adaln=True, inner_attention=cfg.layers[0].attention.inner_attention,
                                       **kwargs)["layers"]
    else:
        raise ValueError(f"kind must be 'db', 'e2e' or 'mdlm', got {kind!r}.")
    if kind != "e2e":
        n = len(cfg.layers)
        if num_blocks < 1 or n % num_blocks:
            raise ValueError(f"num_blocks={num_blocks} must divide n_layers={n} of {kind} flavor {flavor!r}.")
        cfg.num_blocks = num_blocks
    for layer in cfg.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=rope_len)
    return cfg


def randomize_zero_params(model: nn.Module, std: float = 0.02, seed: int = 0) -> list[str]:
    """Give every all-zero parameter (zero-init adaLN/head, zero biases) N(0, std²) values.

    A zero adaLN gate multiplies the attention/MLP branch by 0 and a zero head makes every
    logit 0: autograd would still run, but the numbers would not be those of a trained model.
    Returns the names of the parameters changed.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    changed = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
                changed.append(name)
    return changed


def build_model(cfg, device: torch.device, *, ac: str = "none", seed: int = 0) -> nn.Module:
    """Build on meta → materialise fp32 on ``device`` → init → randomise zero-inits → apply AC.

    ac: "none" | "selective" | "full" — titan's SelectiveAC / FullAC wrapping each ``model.layers``
    child, exactly as ``parallelize_llama`` applies them.
    """
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device=device)
    with torch.no_grad():
        model.init_weights()
    randomize_zero_params(model, seed=seed)
    if ac == "selective":
        titan_ac.SelectiveAC.Config().build(dump_folder="").apply(model)
    elif ac == "full":
        titan_ac.FullAC.Config().build(dump_folder="").apply(model)
    elif ac != "none":
        raise ValueError(f"ac must be none | selective | full, got {ac!r}.")
    model.train()
    return model


def compile_layers(model: nn.Module) -> None:
    """Per-layer ``torch.compile`` (inductor, fullgraph) of every ``model.layers`` child, after AC, as
    titan's ``apply_compile`` does in ``parallelize_llama``."""
    for layer in model.layers.values():
        layer.compile(fullgraph=True)


def build_optimizer(model: nn.Module, *, init_all_states: bool):
    """titan's AdamW container (``default_adamw``, as ``config_registry.recipe``).

    ``init_all_states``: what ``DBlocksTrainer.__init__`` does — every parameter gets its AdamW
    state up front (``init_optimizer_states``), whichever blocks will train.
    """
    opt = default_adamw(lr=LR).build(model_parts=[model])
    if init_all_states:
        init_optimizer_states(opt)
    return opt


def make_batch(batch: int, seq: int, vocab: int, device: torch.device, seed: int = 0, *, shift: bool = True):
    """Random tokens in [0, vocab). ``shift``: [batch, seq+1] → (x[:, :-1], x[:, 1:]), like titan's
    loader; else (x, x), like the masked-diffusion loaders (labels = the clean sequence)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randint(0, vocab, (batch, seq + shift), generator=gen).to(device)
    if not shift:
        return x, x
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class Step:
    """One training step of a model: ``loss(block)`` (forward + loss, returns the loss to
    backpropagate; chunked losses may have run part of the backward already), then
    ``backward(loss)`` and ``optimizer_step()``."""

    name: str
    model: nn.Module
    optimizer: object
    active_layers: int
    """Transformer layers that run in one step (L for e2e, L/B for DB)."""
    positions_per_token: int
    """Sequence positions each layer processes per input token (1 for e2e, 2 for DB AR)."""
    head_positions_per_token: float = 1.0
    """Positions per input token the head runs at (MDLM: the masked ones, ½ on average)."""

    def loss(self, block: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> None:
        params = [p for p in self.model.parameters() if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    amp_dtype: torch.dtype | None = None
    """Autocast dtype of the forward + loss (None: fp32). The weights and AdamW stay fp32."""

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.inputs.device.type, dtype=self.amp_dtype)

    def train_step(self, block: int = 0) -> float:
        with self.autocast():
            loss = self.loss(block)
        self.backward(loss)
        self.optimizer_step()
        return float(loss.detach())

    def flops_per_token(self, seq: int) -> int:
        """titan's count (the model config's ``get_nparams_and_flops``), as the Trainer logs MFU."""
        return self.model_cfg.get_nparams_and_flops(self.model, seq)[1]

    def linear_flops_per_token(self) -> int:
        """Exact matmul FLOPs per input token of the linear layers that run at every position:
        6 · (weights of the active layers × positions per token + head × its positions per token).
        Excludes attention scores, and DB's adaLN / time-embedder linears, which run once per sample
        (negligible)."""
        layer = self.model.layers["0"]
        per_layer = sum(p.numel() for n, p in layer.named_parameters() if p.dim() == 2 and "adaln" not in n)
        head = self.head_positions_per_token * self.model.lm_head.weight.numel()
        return int(6 * (self.active_layers * self.positions_per_token * per_layer + head))


class DBStep(Step):
    """``DBlocksTrainer._forward_backward_body`` without the Trainer: the model's objective
    (``build_objective``: AR → ``ARObjective``, MDLM → ``MaskedDiffusionObjective``) for one block."""

    def __init__(self, model, cfg, inputs, labels, *, gamma: float, seed: int = 0):
        self.model, self.model_cfg = model, cfg
        self.inputs, self.labels = inputs, labels
        self.num_blocks = cfg.num_blocks
        self.active_layers = len(cfg.layers) // cfg.num_blocks
        self.objective = build_objective(cfg, DBlocksConfig(num_blocks=cfg.num_blocks, gamma=gamma))
        masked = hasattr(cfg, "mask_id")
        self.positions_per_token = 1 if masked else 2  # AR: [clean | noisy]
        self.head_positions_per_token = mdlm.HEAD_POSITIONS_PER_TOKEN if masked else 1.0
        self.seed = seed
        self._calls = 0
        self.gvt = torch.tensor(labels.numel(), device=labels.device)

    def loss(self, block: int = 0) -> torch.Tensor:
        gen = torch.Generator(device=self.labels.device).manual_seed(self.seed * 100003 + self._calls)
        self._calls += 1
        loss, _ = self.objective(self.model, self.inputs, self.labels, {}, block=block, generator=gen,
                                 global_valid_tokens=self.gvt)
        return loss


class E2EStep(Step):
    """titan ``Trainer._forward_backward_body`` for the llama3 twin: hidden states, then
    ``ChunkedLossWrapper`` (lm_head + CE per chunk, each chunk's backward run inside the call)."""

    def __init__(self, model, cfg, inputs, labels, *, chunked: bool = True):
        self.model, self.model_cfg = model, cfg
        self.inputs, self.labels = inputs, labels
        self.active_layers = len(cfg.layers)
        self.positions_per_token = 1
        self.chunked = chunked
        self.gvt = torch.tensor(labels.numel(), device=labels.device)
        if chunked:
            self.loss_fn = ChunkedLossWrapper.Config(num_chunks=CE_CHUNKS, loss_fn=CrossEntropyLoss.Config()).build()
            self.loss_fn.set_lm_head(model.lm_head)
            model._skip_lm_head = True
        else:
            self.loss_fn = CrossEntropyLoss.Config().build()
        self.mask_args = ()  # titan's FlexAttention (GPU) needs the block-causal BlockMask; SDPA is causal itself
        if isinstance(cfg.layers[0].attention.inner_attention, FlexAttention.Config):
            positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
            self.mask_args = (positions, model.get_attention_masks(positions))

    def loss(self, block: int = 0) -> torch.Tensor:
        pred = self.model(self.inputs, *self.mask_args)
        loss, _ = self.loss_fn(pred, self.labels, self.gvt)
        return loss


def make_step(kind: str, flavor: str, device: torch.device, *, batch: int, seq: int, num_blocks: int = 1,
              ac: str = "none", attn_backend: str = "auto", vocab_size: int | None = None, chunked_ce: bool = True,
              n_layers: int | None = None, seed: int = 0) -> Step:
    """kind as in :func:`model_config`; "db" and "mdlm" train through the product's objective."""
    cfg = model_config(kind, flavor, seq=seq, num_blocks=num_blocks, attn_backend=attn_backend,
                       vocab_size=vocab_size, n_layers=n_layers)
    model = build_model(cfg, device, ac=ac, seed=seed)
    if kind == "mdlm":  # clean text never holds [MASK]
        inputs, labels = make_batch(batch, seq, cfg.mask_id, device, seed=seed, shift=False)
    else:
        inputs, labels = make_batch(batch, seq, cfg.vocab_size, device, seed=seed)
    if kind == "e2e":
        step = E2EStep(model, cfg, inputs, labels, chunked=chunked_ce)
    else:
        step = DBStep(model, cfg, inputs, labels, gamma=GAMMA[kind], seed=seed)
    step.optimizer = build_optimizer(model, init_all_states=(kind != "e2e"))
    return step


def step_from_args(kind: str, *, num_blocks: int = 1, **step_kwargs) -> Callable:
    """A benchmark row: ``(args, device) → make_step(kind, …)`` from the scripts' shared flags
    (--flavor / --mdlm-flavor and --mdlm-layers, --batch, --seq, --attn-backend, --vocab-size, --seed)."""

    def build(args, device: torch.device) -> Step:
        if kind == "mdlm":
            model = dict(flavor=args.mdlm_flavor, n_layers=args.mdlm_layers, vocab_size=args.vocab_size)
        else:
            model = dict(flavor=args.flavor, attn_backend=args.attn_backend, vocab_size=args.vocab_size)
        return make_step(kind, device=device, batch=args.batch, seq=args.seq, num_blocks=num_blocks, seed=args.seed,
                         **model, **step_kwargs)

    return build


# --------------------------------------------------------------------------------------------
# Byte counts of model state
# --------------------------------------------------------------------------------------------


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the unique storages behind ``tensors`` (views and repeats counted once)."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def param_bytes(model: nn.Module) -> int:
    return tensor_bytes(model.parameters())


def grad_bytes(model: nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer, params: Iterable[torch.Tensor] | None = None) -> int:
    """Bytes of every tensor in the optimizer state (exp_avg, exp_avg_sq, step), optionally
    restricted to the states of ``params``."""
    wanted = None if params is None else {id(p) for p in params}
    tensors = []
    for opt in optimizer:  # titan's container iterates its torch optimizers
        for p, state in opt.state.items():
            if wanted is not None and id(p) not in wanted:
                continue
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensor_bytes(tensors)


# --------------------------------------------------------------------------------------------
# Saved-tensor accounting
# --------------------------------------------------------------------------------------------


class _Saved:
    """What a pack hook returns: a detached alias of the saved tensor (a detached alias keeps the
    storage alive without creating a reference cycle through the tensor's ``grad_fn``). It lives
    exactly as long as autograd keeps the saved tensor, which a finalizer reports."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedTensorAccountant:
    """Exact bytes that autograd keeps alive for backward, counted by unique storage.

    Inside ``with acct:`` every tensor that autograd saves goes through
    ``torch.autograd.graph.saved_tensors_hooks``:

    1. A saved tensor whose storage is a parameter's or a buffer's (the weight an ``mm`` saves,
       its ``.t()`` view, RoPE's ``freqs_cis``) is NOT an activation: that memory is resident
       anyway and is counted in the parameter column. Its bytes go to ``excluded_bytes`` only.
    2. Any other saved tensor is keyed by ``untyped_storage().data_ptr()``. The storage's full
       ``nbytes()`` is counted once while at least one saved reference to it is alive (a tensor
       saved twice, or a view of a saved tensor, costs nothing extra; a view keeps its whole
       storage alive, so the whole storage is what it costs).
    3. A saved reference dies when autograd frees it (after its node's backward, or when the graph
       is dropped); ``live_bytes`` drops then. ``peak_bytes`` is the maximum of ``live_bytes``:
       for a plain forward it is the total at the end of the forward; with titan's
       ``ChunkedLossWrapper`` (whose chunks run their own backward inside the loss call) it
       counts one chunk's logits at a time, as a real step does.
    4. Activation checkpointing: inside a checkpointed region torch's own (inner) hooks take
       over, so what counts is what checkpointing really keeps: the region's inputs (saved by
       ``_NoopSaveInputs`` outside the inner hooks) and, for selective AC, the op outputs its
       policy decides to save — reported through :func:`counting_sac_policy`, live until the
       accountant exits (they are freed during the backward, after the window that matters).
       Recomputation during the backward is not a saved tensor and is not counted.
    5. With ``track_modules(model)`` each storage is tagged with the module whose forward was
       running when it was FIRST saved (``""`` = the model's own forward body, ``None`` = outside
       any module, e.g. the loss) → ``peak_by_tag``: the live bytes per tag at the peak.

    The count depends only on shapes, dtypes and which ops run, so it is the same on CPU and GPU
    for the same kernels (SDPA picks different kernels per device: see the reports).
    """

    current: "SavedTensorAccountant | None" = None

    def __init__(self, exclude: Iterable[torch.Tensor] = (),
                 refine_tag: Callable[[torch.Tensor, str | None], str | None] | None = None,
                 exclude_if: Callable[[torch.Tensor], bool] | None = None,
                 on_use: Callable[[], None] | None = None):
        """exclude: tensors whose storages are not activations (parameters, buffers).
        refine_tag(tensor, module_tag) → tag: optional re-labelling of a storage when first saved.
        exclude_if(tensor) → True for a saved tensor that is not an activation although its storage is
        not in ``exclude`` (e.g. :func:`is_parameter_view`: FSDP2's unsharded parameters, all-gathered
        anew at every unshard). on_use(): called at every save and every unpack (a sampler of other
        state over the forward and the backward)."""
        self._exclude_if, self._on_use = exclude_if, on_use
        self._excluded_ptrs = {t.untyped_storage().data_ptr() for t in exclude}
        self._excluded_seen: set[int] = set()
        self._refine_tag = refine_tag
        self._refs: dict[int, int] = defaultdict(int)  # storage ptr → live saved references
        self._nbytes: dict[int, int] = {}
        self._tag_of: dict[int, str | None] = {}
        self._pinned: list[torch.Tensor] = []
        self._module_stack: list[str] = []
        self._hook_handles: list = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self.excluded_bytes = 0
        """Unique bytes of parameter/buffer storages that were saved (not counted as activations)."""
        self.packed_count = 0
        """Saved references counted (parameters/buffers excluded; repeats included)."""
        self.peak_by_tag: dict[str | None, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> "SavedTensorAccountant":
        return cls(exclude=list(model.parameters()) + list(model.buffers()), **kwargs)

    # -- tagging ----------------------------------------------------------------------------

    def track_modules(self, model: nn.Module) -> "SavedTensorAccountant":
        """Tag saved storages with the innermost running module (AC wrapper names stripped)."""
        for name, module in model.named_modules():
            clean = name.replace("._checkpoint_wrapped_module", "").replace("_checkpoint_wrapped_module.", "")

            def pre(_m, _args, _name=clean):
                self._module_stack.append(_name)

            def post(_m, _args, _out, _name=clean):
                if self._module_stack and self._module_stack[-1] == _name:
                    self._module_stack.pop()

            self._hook_handles.append(module.register_forward_pre_hook(pre))
            self._hook_handles.append(module.register_forward_hook(post, always_call=True))
        return self

    def _current_tag(self) -> str | None:
        return self._module_stack[-1] if self._module_stack else None

    # -- counting ---------------------------------------------------------------------------

    def _add(self, t: torch.Tensor) -> int | None:
        if self._on_use is not None:
            self._on_use()
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self._excluded_ptrs or (self._exclude_if is not None and self._exclude_if(t)):
            if ptr not in self._excluded_seen:  # unique storages, like the activations
                self._excluded_seen.add(ptr)
                self.excluded_bytes += storage.nbytes()
            return None
        self.packed_count += 1
        if self._refs[ptr] == 0:
            self._nbytes[ptr] = storage.nbytes()
            tag = self._current_tag()
            if self._refine_tag is not None:
                tag = self._refine_tag(t, tag)
            self._tag_of[ptr] = tag
            self.live_bytes += self._nbytes[ptr]
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
                self._snapshot_tags()
        self._refs[ptr] += 1
        return ptr

    def _release(self, ptr: int) -> None:
        self._refs[ptr] -= 1
        if self._refs[ptr] == 0:
            self.live_bytes -= self._nbytes.pop(ptr)
            self._tag_of.pop(ptr, None)
            del self._refs[ptr]

    def _snapshot_tags(self) -> None:
        # Cheap enough: called only when a new peak is reached.
        by_tag: dict[str | None, int] = defaultdict(int)
        for ptr, n in self._nbytes.items():
            by_tag[self._tag_of[ptr]] += n
        self.peak_by_tag = dict(by_tag)

    def _pack(self, t: torch.Tensor):
        ptr = self._add(t)
        if ptr is None:
            return t  # a parameter or buffer: resident anyway
        handle = _Saved(t.detach())
        weakref.finalize(handle, self._release, ptr)
        return handle

    def _unpack(self, handle):
        if self._on_use is not None:
            self._on_use()
        return handle.tensor if isinstance(handle, _Saved) else handle

    def add_pinned(self, out) -> None:
        """Count tensors kept by another mechanism (selective AC's cache) until ``__exit__``."""
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self._add(t) is not None:
                self._pinned.append(t.detach())

    # -- context ----------------------------------------------------------------------------

    def __enter__(self):
        if SavedTensorAccountant.current is not None:
            raise RuntimeError("SavedTensorAccountant windows cannot nest.")
        SavedTensorAccountant.current = self
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        SavedTensorAccountant.current = None
        for t in self._pinned:
            self._release(t.untyped_storage().data_ptr())
        self._pinned.clear()
        return False

    def remove_module_hooks(self) -> None:
        for h in self._hook_handles:
            h.remove()
        self._hook_handles.clear()


def is_parameter_view(t: torch.Tensor) -> bool:
    """``t`` is a parameter or a view of one (a weight a matmul saves, its transpose): under FSDP2 the
    unsharded parameters are new ``nn.Parameter`` storages at every all-gather, which no fixed list of
    storages can exclude."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def fsdp_unsharded_bytes(model: nn.Module) -> int:
    """Bytes FSDP2 holds now in unsharded form (all-gathered parameters of the units being computed and
    their unsharded gradients before the reduce-scatter): 0 between steps (every unit resharded) and
    for a model without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    total = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is None:
                    continue
                total += unsharded.untyped_storage().nbytes()
                if unsharded.grad is not None:
                    total += unsharded.grad.untyped_storage().nbytes()
    return total


def counting_sac_policy(policy_fn: Callable) -> Callable:
    """Wrap a selective-AC policy so the op outputs it saves are counted by the accountant."""

    def policy(ctx, func, *args, **kwargs):
        decision = policy_fn(ctx, func, *args, **kwargs)
        if isinstance(decision, bool):
            decision = CheckpointPolicy.MUST_SAVE if decision else CheckpointPolicy.PREFER_RECOMPUTE
        acct = SavedTensorAccountant.current
        if acct is not None and not ctx.is_recompute and decision in (
            CheckpointPolicy.MUST_SAVE, CheckpointPolicy.PREFER_SAVE
        ):
            acct.add_pinned(ctx.op_output)
        return decision

    return policy


@contextlib.contextmanager
def count_selective_ac():
    """While active, titan's SelectiveAC reports the outputs it saves to the accountant.

    ``SelectiveAC._wrap_block`` calls the module-level ``create_selective_checkpoint_contexts``
    of ``torchtitan.distributed.activation_checkpoint`` on every forward; this swaps in a version
    whose policy is wrapped by :func:`counting_sac_policy`. Bench-only; nothing in the product
    changes.
    """
    original = titan_ac.create_selective_checkpoint_contexts

    def wrapped(policy_fn, *args, **kwargs):
        return original(counting_sac_policy(policy_fn), *args, **kwargs)

    titan_ac.create_selective_checkpoint_contexts = wrapped
    try:
        yield
    finally:
        titan_ac.create_selective_checkpoint_contexts = original


class PeakTensorTracker(TorchDispatchMode):
    """Peak bytes of all live tensor storages over a window (forward + backward + optimizer step).

    ``resident`` tensors (parameters, buffers, optimizer state, the batch) are alive throughout and
    counted once at entry; then every storage that an op creates inside the window is counted
    while it lives (a weak reference to the storage reports its release). Device independent: the
    CPU counterpart of ``torch.cuda.max_memory_allocated`` without the allocator's rounding and
    caching. Storages made outside the dispatcher and not listed as resident (none in a plain
    training step) are not seen.
    """

    def __init__(self, resident: Iterable[torch.Tensor]):
        super().__init__()
        resident = list(resident)
        self._resident = {t.untyped_storage().data_ptr() for t in resident}
        self.resident_bytes = tensor_bytes(resident)
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self.live_bytes = self.peak_bytes = self.resident_bytes

    def _free(self, ptr: int, _ref) -> None:
        entry = self._live.pop(ptr, None)
        if entry is not None:
            self.live_bytes -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr == 0 or ptr in self._live or ptr in self._resident:
                    continue
                n = st.nbytes()
                self._live[ptr] = (n, weakref.ref(st, functools.partial(self._free, ptr)))
                self.live_bytes += n
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:,.2f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Placeholder:
    """A row this script does not measure (its reason says why, or where it is measured)."""

    reason: str


def bar_chart(path: str, labels: list[str], series: dict[str, list[float]], *, ylabel: str, title: str,
              hline: float | None = None, stacked: bool = False, annotations: list[str] | None = None) -> None:
    """Grouped (or stacked) bars, one group per label. Needs matplotlib (the ``bench`` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(labels) + 2), 4.8))
    xs = range(len(labels))
    width = 0.8 if stacked else 0.8 / max(n, 1)
    bottom = [0.0] * len(labels)
    for i, (name, values) in enumerate(series.items()):
        if stacked:
            ax.bar(xs, values, width, bottom=bottom, label=name)
            bottom = [b + v for b, v in zip(bottom, values)]
        else:
            ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], values, width, label=name)
    if annotations:
        tops = bottom if stacked else [max(v) for v in zip(*series.values())]
        for x, top, text in zip(xs, tops, annotations):
            ax.annotate(text, (x, top), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    if hline is not None:
        ax.axhline(hline, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Collective accounting (bench_per_rank.py --comm)
# --------------------------------------------------------------------------------------------

COLLECTIVES = ("all_gather", "reduce_scatter", "all_reduce", "broadcast")


def ring_bytes_sent(kind: str, payload_bytes: float, group_size: int) -> float:
    """Bytes ONE rank sends for a collective over ``group_size`` ranks with ring algorithms (NCCL's bus
    factors), ``payload_bytes`` being the full tensor: the gathered output (all-gather), the input before
    the scatter (reduce-scatter), the reduced tensor (all-reduce), the broadcast tensor.

    all-gather and reduce-scatter: each rank sends (k−1) of its k chunks, (k−1)/k·payload; all-reduce
    = reduce-scatter + all-gather, 2(k−1)/k·payload; broadcast (pipelined ring): (k−1)/k·payload on
    average over the ranks. A group of one rank sends nothing.
    """
    k = group_size
    if kind not in COLLECTIVES:
        raise ValueError(f"kind must be one of {COLLECTIVES}, got {kind!r}.")
    return (2 if kind == "all_reduce" else 1) * (k - 1) / k * payload_bytes


def block_group_scope(ranks: Iterable[int], ranks_per_group: int) -> str:
    """"within" if every rank of a collective is in the same block group (ranks g·W/B … (g+1)·W/B − 1:
    titan's (dp_replicate, dp_shard) order, replicate index = block), else "across"."""
    return "within" if len({r // ranks_per_group for r in ranks}) == 1 else "across"


def _payload(args: dict, tensor_arg: str, gathered: bool, group_size: int) -> tuple[int, int]:
    """(numel, bytes) of the full tensor of a call (see :func:`ring_bytes_sent`)."""
    value = args[tensor_arg]
    tensors = value if isinstance(value, (list, tuple)) else [value]
    numel = sum(t.numel() for t in tensors) * (group_size if gathered else 1)
    return numel, numel * tensors[0].element_size()


# name → (kind, argument holding the payload, payload = that argument × group size). Plain c10d calls
# (``torch.distributed.*``: FSDP2's all-gather, reduce-scatter and HSDP all-reduce, the trainer's own
# calls) and functional collectives (``_functional_collectives``: DTensor redistributions such as
# ``full_tensor``, titan's ``dist_sum_tensor``).
_C10D_CALLS = {
    "all_reduce": ("all_reduce", "tensor", False), "all_reduce_coalesced": ("all_reduce", "tensors", False),
    "broadcast": ("broadcast", "tensor", False), "all_gather": ("all_gather", "tensor_list", False),
    "all_gather_single": ("all_gather", "output_tensor", False),
    "all_gather_into_tensor": ("all_gather", "output_tensor", False),
    "reduce_scatter": ("reduce_scatter", "input_list", False), "reduce_scatter_single": ("reduce_scatter", "input", False),
    "reduce_scatter_tensor": ("reduce_scatter", "input", False),
}
_FUNCOL_CALLS = {
    "all_reduce": ("all_reduce", "self", False), "all_reduce_coalesced": ("all_reduce", "self", False),
    "broadcast": ("broadcast", "self", False),
    **{name: ("all_gather", "self", True) for name in (
        "all_gather_single", "all_gather_single_autograd", "all_gather_tensor", "all_gather_tensor_autograd",
        "all_gather_single_coalesced", "all_gather_into_tensor_coalesced")},
    **{name: ("reduce_scatter", "self", False) for name in (
        "reduce_scatter_single", "reduce_scatter_single_autograd", "reduce_scatter_tensor",
        "reduce_scatter_tensor_autograd", "reduce_scatter_single_coalesced", "reduce_scatter_tensor_coalesced")},
}


class CollectiveCounter:
    """Every collective this process issues inside ``with counter:``, one record each:
    ``{"kind", "call", "ranks", "numel", "bytes", "sent"}`` (payload as in :func:`ring_bytes_sent`;
    ``sent`` = the bytes this rank sends, ring algorithms).

    How: the Python entry points of c10d (``torch.distributed.all_gather_single`` …, which FSDP2 calls
    by module attribute) and of the functional collectives (``funcol.all_reduce`` …, which DTensor and
    titan call) are wrapped while the counter is active; a call made from inside another wrapped call
    (a deprecated alias, a coalesced variant) is not counted twice. The process group of every call
    gives its ranks. A caller that bound a collective by name at import would be missed, so the
    profiler's record of the gloo/NCCL kernels that actually ran is kept beside (:meth:`kernel_numel`)
    for a cross-check.
    """

    def __init__(self):
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        self.records: list[dict] = []
        self._depth = 0
        self._patches = [(module, name, spec) for module, calls in
                         ((torch.distributed, _C10D_CALLS), (c10d, _C10D_CALLS), (funcol, _FUNCOL_CALLS))
                         for name, spec in calls.items() if hasattr(module, name)]
        self._saved: list[tuple] = []
        self._profiler = None

    def _ranks(self, group) -> tuple[int, ...]:
        import torch.distributed._functional_collectives as funcol
        import torch.distributed.distributed_c10d as c10d

        if group is None:
            group = c10d._get_default_group()
        elif not isinstance(group, torch.distributed.ProcessGroup):
            group = c10d._resolve_process_group(funcol._resolve_group_name(group))
        return tuple(torch.distributed.get_process_group_ranks(group))

    def _wrap(self, fn, spec):
        import inspect

        kind, tensor_arg, gathered = spec
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                ranks = self._ranks(bound.arguments.get("group"))
                numel, nbytes = _payload(bound.arguments, tensor_arg, gathered, len(ranks))
                self.records.append({"kind": kind, "call": fn.__module__.rsplit(".", 1)[-1] + "." + fn.__name__,
                                     "ranks": list(ranks), "numel": numel, "bytes": nbytes,
                                     "sent": ring_bytes_sent(kind, nbytes, len(ranks))})
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def __enter__(self):
        originals = {}
        for module, name, spec in self._patches:
            fn = getattr(module, name)
            if id(fn) not in originals:  # torch.distributed.X and distributed_c10d.X are one function
                originals[id(fn)] = self._wrap(fn, spec)
            self._saved.append((module, name, fn))
            setattr(module, name, originals[id(fn)])
        self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self._profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self._profiler.__exit__(*exc)
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved.clear()
        return False

    def kernel_numel(self) -> int:
        """Input elements that the gloo backend's collective kernels received, from the profiler's
        ``gloo:all_gather`` (one rank's chunk), ``gloo:all_reduce`` and ``gloo:broadcast`` events. gloo
        runs a reduce-scatter as an all-reduce of its whole input (so it logs no reduce-scatter event, and
        sends 2× what a ring reduce-scatter sends: ``sent`` counts the ring's, what NCCL sends on a GPU).
        Equal to :meth:`input_numel` when no collective escaped the wrappers."""
        names = ("gloo:all_gather", "gloo:all_reduce", "gloo:broadcast")
        return sum(math.prod(e.input_shapes[0]) for e in self._profiler.events() if e.name in names and e.input_shapes)

    def input_numel(self) -> int:
        """The same count from the wrapped calls (an all-gather's input = its payload / group size)."""
        return sum(r["numel"] // len(r["ranks"]) if r["kind"] == "all_gather" else r["numel"] for r in self.records)


SCALAR_NUMEL = 1024
"""Collectives of at most this many elements (losses, norms, token counts) are "scalars", not
parameter or gradient traffic."""


def record_class(record: dict, layer_numel: int) -> str:
    """"layers" (a transformer layer's FSDP unit: its gathered parameters or its gradients before the
    scatter, ``layer_numel`` elements), "scalars" (≤ SCALAR_NUMEL elements), else "shared" (the shared
    modules' units and the cross-group bucket of their gradients)."""
    if record["numel"] <= SCALAR_NUMEL:
        return "scalars"
    return "layers" if record["numel"] == layer_numel else "shared"


def comm_summary(records: list[dict], *, layer_numel: int, ranks_per_group: int) -> dict:
    """One rank's step, summed: bytes it sends per (kind, scope) and per (kind, class), and payload
    elements per (kind, class, scope) (for the per-parameter constants)."""
    sent: dict[str, float] = defaultdict(float)
    numel: dict[str, int] = defaultdict(int)
    for r in records:
        scope, cls = block_group_scope(r["ranks"], ranks_per_group), record_class(r, layer_numel)
        sent[f"{r['kind']}/{scope}"] += r["sent"]
        sent[scope] += r["sent"]
        sent["total"] += r["sent"]
        numel[f"{r['kind']}/{cls}/{scope}"] += r["numel"]
    return {"sent": dict(sent), "numel": dict(numel)}


@dataclasses.dataclass
class CommShape:
    """What the per-step collectives of a mode depend on: L layers of ``layer_numel`` parameters,
    ``shared_numel`` shared-module parameters, ``active_layers`` layers run per step (per group)."""

    layer_numel: int
    n_layers: int
    shared_numel: int
    active_layers: int


def fsdp_constants(numel: dict[str, int], shape: CommShape) -> dict[str, float]:
    """Per-parameter constants of one measured FSDP2 step: payload elements of each collective kind per
    parameter of the units that ran, for the layers and for the shared modules, e.g. ``all_gather/layers``
    = 2 (gathered for the forward and again for the backward), ``reduce_scatter/shared`` = 1."""
    per = {"layers": shape.active_layers * shape.layer_numel, "shared": shape.shared_numel}
    constants = {}
    for kind in ("all_gather", "reduce_scatter"):
        for cls, params in per.items():
            constants[f"{kind}/{cls}"] = sum(v for k, v in numel.items() if k.startswith(f"{kind}/{cls}/")) / params
    return constants


def fsdp_bytes_sent(constants: dict[str, float], *, layer_params: int, shared_params: int, group_size: int,
                    param_bytes: int, reduce_bytes: int) -> float:
    """Bytes one rank sends per step for FSDP2 over ``group_size`` ranks (ring), from the constants:
    all-gathers in the parameter dtype, reduce-scatters in the reduce dtype."""
    total = 0.0
    for kind, dtype_bytes in (("all_gather", param_bytes), ("reduce_scatter", reduce_bytes)):
        payload = constants[f"{kind}/layers"] * layer_params + constants[f"{kind}/shared"] * shared_params
        total += ring_bytes_sent(kind, payload * dtype_bytes, group_size)
    return total


# --------------------------------------------------------------------------------------------
# Recurrent depth (models/huginn.py): the Huginn baseline and its DiffusionBlocks version
# --------------------------------------------------------------------------------------------


def huginn_model_config(kind: str, flavor: str, *, seq: int, attn_backend: str = "auto",
                        vocab_size: int | None = None, mean_depth: int = 32, backprop_depth: int = 8):
    """kind "huginn" → the e2e baseline's config (mean depth m, k); "dbhuginn" → DBlocksHuginn.Config
    (B = 1). RoPE sized to ``seq`` as the Trainer sizes it."""
    from dblocks_titan.models.huginn import dblocks_huginn_config, huginn_config

    if kind == "huginn":
        cfg = huginn_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size, mean_depth=mean_depth,
                            backprop_depth=backprop_depth, inference_depth=mean_depth)
    elif kind == "dbhuginn":
        cfg = dblocks_huginn_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size)
    else:
        raise ValueError(f"kind must be 'huginn' or 'dbhuginn', got {kind!r}.")
    for layer in cfg.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, max_seq_len=seq)
    return cfg


def huginn_analytic_flops(flavor: str, *, seq: int) -> dict[str, int]:
    """Training FLOPs per token of ``huginn`` (mean depth 32, k = 8) and ``dblocks_huginn`` at ``flavor``:
    titan's count (the configs' ``get_nparams_and_flops``, head included) on meta-device models, so any
    flavor is counted without its weights."""
    out = {}
    for kind in ("huginn", "dbhuginn"):
        cfg = huginn_model_config(kind, flavor, seq=seq, attn_backend="sdpa")
        with torch.device("meta"):
            out[kind] = cfg.get_nparams_and_flops(cfg.build(), seq)[1]
    return out


class HuginnStep(E2EStep):
    """titan's ``Trainer._forward_backward_body`` for the ``huginn`` baseline (as :class:`E2EStep`) at a
    fixed depth: the mean m, of which the last k iterations with gradients (what ``get_nparams_and_flops``
    counts), instead of a random draw, so that every measured step is the same."""

    def __init__(self, model, cfg, inputs, labels):
        from dblocks_titan.models.huginn import Depth

        super().__init__(model, cfg, inputs, labels)
        k = min(cfg.backprop_depth, int(cfg.mean_depth))
        self.depth = Depth(no_grad=int(cfg.mean_depth) - k, with_grad=k)

    def loss(self, block: int = 0) -> torch.Tensor:
        loss, _ = self.loss_fn(self.model(self.inputs, depth=self.depth), self.labels, self.gvt)
        return loss


class RecurrentDBStep(DBStep):
    """:class:`DBStep` for ``dblocks_huginn`` (the AR objective; its layers run N positions, not 2N)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.positions_per_token = 1


def huginn_step_from_args(kind: str, **config_kwargs) -> Callable:
    """A benchmark row ``(args, device) → Step`` for kind "huginn" | "dbhuginn" (--huginn-flavor, --batch,
    --seq, --attn-backend, --vocab-size, --seed)."""

    def build(args, device: torch.device) -> Step:
        step = huginn_step(kind, args.huginn_flavor, batch=args.batch, seq=args.seq, device=device,
                           attn_backend=args.attn_backend, vocab_size=args.vocab_size, seed=args.seed, **config_kwargs)
        step.optimizer = build_optimizer(step.model, init_all_states=kind != "huginn")
        return step

    return build


def huginn_step(kind: str, flavor: str, *, batch: int, seq: int, device: torch.device, attn_backend: str = "sdpa",
                vocab_size: int | None = None, seed: int = 0, **config_kwargs) -> Step:
    """One ``huginn`` (:class:`HuginnStep`) or ``dbhuginn`` (:class:`RecurrentDBStep`) step on fixed random
    batches, without an optimizer."""
    cfg = huginn_model_config(kind, flavor, seq=seq, attn_backend=attn_backend, vocab_size=vocab_size,
                              **config_kwargs)
    model = build_model(cfg, device, seed=seed)
    inputs, labels = make_batch(batch, seq, cfg.vocab_size, device, seed=seed)
    if kind == "huginn":
        return HuginnStep(model, cfg, inputs, labels)
    return RecurrentDBStep(model, cfg, inputs, labels, gamma=0.0, seed=seed)


def count_step_flops(step: Step) -> int:
    """FLOPs of one step's forward + loss + backward, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls and attention, as the kernels run them; the optimizer step is not counted). Grads are cleared after."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step.backward(step.loss(0))
    step.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def count_huginn_flops(flavor: str, *, batch: int, seq: int, seed: int = 0) -> dict[str, int]:
    """:func:`count_step_flops` of one ``huginn`` (mean depth 32, k = 8) and one ``dblocks_huginn`` step at
    ``flavor`` on the CPU, one model at a time and without an optimizer (a 1B model's weights and
    gradients fit a 24 GiB machine, its AdamW state beside them would not)."""
    out = {}
    for kind in ("huginn", "dbhuginn"):
        step = huginn_step(kind, flavor, batch=batch, seq=seq, device=torch.device("cpu"), seed=seed)
        step.optimizer = step.model  # count_step_flops only clears the gradients: Module.zero_grad does
        out[kind] = count_step_flops(step)
        del step
    return out
