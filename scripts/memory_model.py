"""Per-rank device bytes of a training step, as pure functions of a model's shape (used by
``bench_memory_per_rank.py``, tested by ``tests/test_bench_accounting.py``).

1. :class:`Shape`: what the bytes depend on: L layers of ``layer_numel`` parameters, the shared
   modules' ``shared_numel`` (embeddings, head, final norm; DB: + time embedder, final adaLN), width
   d, FFN width, vocabulary, the largest FSDP2 unit.
2. :class:`Constants`: what one measured step gives per unit: state bytes per parameter (parameters,
   gradients, AdamW), activation bytes per layer-position per unit of width (the MLP's per unit of FFN
   width, the rest per unit of d), shared-module activation bytes per token per unit of d, the loss's
   bytes per logit of one chunk, FSDP2's unsharded peak per byte of its largest unit, host↔device
   bytes per parameter of titan's CPU offload. :func:`fit_activations` reads them from a measured step.
3. :func:`device_bytes`: the split (params, grads, AdamW, activations, unsharded) of one rank for a
   mode (``e2e``, ``e2e_cpu_offload``, DB ``none`` / ``optimizer`` / ``block`` with ``prefetch``,
   ``block_host``: ``block`` with ``block_step = "host"``, ``db_cpu_offload``: titan's CPU offload over a DB
   model),
   AC, world size, sequence, local batch and dtypes; :func:`ideal_bytes`: the method's ideal (shared
   modules + L/B layers with their gradients and AdamW state + one block's activations).
4. :func:`llama3_family` and :func:`largest_fitting`: the depth of the llama3-shaped model family at a
   width, and the largest member whose per-rank device bytes fit a budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

GIB = 2**30
LOGIT_CHUNK_BYTES = 32 * 2**20  # objectives.LOGIT_CHUNK_BYTES: MDLM's head runs unchunked below it
CE_CHUNKS = 8  # titan's ChunkedLossWrapper default (e2e, AR DB, MDLM above LOGIT_CHUNK_BYTES)
DB_MODES = ("none", "optimizer", "block", "block_host")  # block_host: offload = block, block_step = host
CPU_OFFLOAD_MODES = ("e2e_cpu_offload", "db_cpu_offload")  # FSDP2 CPUOffloadPolicy: every shard on the host


@dataclass(frozen=True)
class Shape:
    family: str  # "ar" (titan llama3 / dblocks_llama) or "mdlm"
    kind: str  # "e2e" or "db"
    n_layers: int
    layer_numel: int
    shared_numel: int
    dim: int
    ffn_dim: int
    vocab: int
    largest_unit_numel: int  # the largest FSDP2 unit (a layer, the embeddings or [norm, head])

    @property
    def numel(self) -> int:
        return self.n_layers * self.layer_numel + self.shared_numel

    def positions_per_token(self) -> int:
        """Sequence positions each layer runs per input token: AR DB runs [clean | noisy] (2N)."""
        return 2 if (self.family, self.kind) == ("ar", "db") else 1

    def head_rows(self, tokens: int) -> float:
        """Rows the head and the CE run at: every token (AR), the masked ones (MDLM: half on average)."""
        return tokens / 2 if self.family == "mdlm" else tokens

    def loss_chunk_rows(self, tokens: int) -> float:
        """Rows of ONE chunk of the head + CE (only one chunk's fp32 logits are alive at a time)."""
        rows = self.head_rows(tokens)
        if self.family == "mdlm" and rows * self.vocab * 4 <= LOGIT_CHUNK_BYTES:
            return rows
        return rows / CE_CHUNKS


@dataclass
class Constants:
    """Per-unit bytes of one family/kind/AC measured at fp32 (see the module docstring, 2.)."""

    param_bytes: float = 4.0
    grad_bytes: float = 4.0
    adamw_bytes: float = 8.0
    layer_act_per_dim: float = 0.0  # bytes per layer-position per unit of d (everything but the MLP)
    layer_act_per_ffn: float = 0.0  # bytes per layer-position per unit of FFN width
    shared_act_per_dim: float = 0.0  # bytes per input token per unit of d, outside the layers and the loss
    loss_act_per_logit: float = 0.0  # bytes per logit of one chunk (fp32 log-softmax and friends)
    unsharded_per_unit: float = 0.0  # FSDP2's unsharded peak / the largest unit's parameter bytes
    offload_h2d_per_param: float = 0.0  # titan CPU offload: bytes copied in per parameter held (fp32)
    offload_d2h_per_param: float = 0.0
    extra: dict = field(default_factory=dict)


def fit_activations(layer_bytes: dict[str, float], shared_bytes: float, loss_bytes: float, shape: Shape, *,
                    active_layers: int, tokens: int) -> dict[str, float]:
    """The activation constants of one measured step. ``layer_bytes``: the saved bytes of the layers
    that ran, ``{"mlp": …, "rest": …}``; ``shared_bytes``: outside the layers and the loss; ``loss_bytes``:
    the loss (one chunk); ``tokens``: input tokens of the rank's step (local batch × N)."""
    positions = active_layers * tokens * shape.positions_per_token()
    return {"layer_act_per_dim": layer_bytes["rest"] / (positions * shape.dim),
            "layer_act_per_ffn": layer_bytes["mlp"] / (positions * shape.ffn_dim),
            "shared_act_per_dim": shared_bytes / (tokens * shape.dim),
            "loss_act_per_logit": loss_bytes / (shape.loss_chunk_rows(tokens) * shape.vocab)}


@dataclass(frozen=True)
class Setting:
    world: int
    seq: int
    local_batch: int
    act_dtype_bytes: int = 4  # 2: bf16 compute (FSDP2 param_dtype bf16); the loss chunk stays fp32
    gather_dtype_bytes: int = 4  # dtype of FSDP2's unsharded parameters (param_dtype)

    @property
    def tokens(self) -> int:
        return self.seq * self.local_batch


def activation_bytes(shape: Shape, c: Constants, s: Setting, *, active_layers: int) -> float:
    """Saved bytes of one rank's step: the active layers at their positions, the shared modules per token,
    one chunk of the loss; layers and shared modules scaled to the compute dtype."""
    scale = s.act_dtype_bytes / 4
    positions = active_layers * s.tokens * shape.positions_per_token()
    layers = positions * (c.layer_act_per_dim * shape.dim + c.layer_act_per_ffn * shape.ffn_dim)
    shared = s.tokens * c.shared_act_per_dim * shape.dim
    loss = shape.loss_chunk_rows(s.tokens) * shape.vocab * c.loss_act_per_logit
    return scale * (layers + shared) + loss


def device_bytes(shape: Shape, c: Constants, s: Setting, *, mode: str, num_blocks: int = 1,
                 prefetch: str = "after_step") -> dict[str, float]:
    """One rank's device bytes at the step's peak, by kind. ``mode``: ``e2e`` | ``e2e_cpu_offload`` (FSDP2
    CPUOffloadPolicy: sharded parameters, gradients and AdamW state on the host) | DB ``none`` |
    ``optimizer`` | ``block`` | ``block_host`` (the block's AdamW state stays on the host) | ``db_cpu_offload``
    (the policy over a DB model). Sharded state: bytes per parameter × parameters / world; activations from
    :func:`activation_bytes`; ``unsharded``: FSDP2's all-gathered units (scaled to the gather dtype)."""
    W, S, layer = s.world, shape.shared_numel, shape.layer_numel
    all_layers = shape.n_layers * layer
    block = all_layers // num_blocks
    cpu = mode in CPU_OFFLOAD_MODES
    resident = {"e2e": all_layers, "none": all_layers, "optimizer": all_layers, "block": block,
                "block_host": block}.get(mode, 0)
    with_state = {"optimizer": block, "block_host": 0}.get(mode, resident)
    with_grads = all_layers if mode.startswith("e2e") else block
    extra = block if (mode.startswith("block") and prefetch == "step_start" and num_blocks > 1) else 0
    extra_state = 0 if mode == "block_host" else extra
    shared = 0 if cpu else S
    out = {"params": c.param_bytes * (shared + resident + extra) / W,
           "grads": 0.0 if cpu else c.grad_bytes * (shared + with_grads) / W,
           "adamw": c.adamw_bytes * (shared + with_state + extra_state) / W,
           "activations": activation_bytes(shape, c, s, active_layers=shape.n_layers if mode.startswith("e2e")
                                           else shape.n_layers // num_blocks),
           "unsharded": c.unsharded_per_unit * shape.largest_unit_numel * s.gather_dtype_bytes if W > 1 else 0.0}
    out["total"] = sum(out.values())
    return out


def host_bytes(shape: Shape, c: Constants, s: Setting, *, mode: str, num_blocks: int = 1) -> float:
    """What a rank keeps in host memory: titan's CPU offload (also over a DB model) every shard (parameters,
    gradients, AdamW); DB the offload store's host copies, one of every block's shards, the resident block's
    too (``optimizer``: their AdamW state; ``block``: + their parameters; ``block_host``: + one block's
    gradients, which the host step reads)."""
    if mode in CPU_OFFLOAD_MODES:
        return (c.param_bytes + c.grad_bytes + c.adamw_bytes) * shape.numel / s.world
    layers = shape.n_layers * shape.layer_numel / s.world
    grads = c.grad_bytes * layers / num_blocks
    return {"e2e": 0.0, "none": 0.0, "optimizer": c.adamw_bytes * layers,
            "block": (c.param_bytes + c.adamw_bytes) * layers,
            "block_host": (c.param_bytes + c.adamw_bytes) * layers + grads}[mode]


def moved_bytes(shape: Shape, c: Constants, s: Setting, *, mode: str, num_blocks: int = 1,
                steps_per_block: int = 1) -> dict[str, float]:
    """Host↔device bytes per step of one rank. titan's CPU offload: every shard in at each of its
    all-gathers and every gradient shard out (measured constants per parameter), at every step; over a
    DB model the same for what runs: the shared modules and one block; DB: a switching step writes one
    block's shard out and brings the next one in (``block``: parameters + AdamW state; ``optimizer``:
    AdamW state), once every ``steps_per_block`` steps; ``block_host``: every step takes the block's
    gradients out and brings its (or the next block's) parameters in, whatever ``steps_per_block``."""
    if mode in CPU_OFFLOAD_MODES:
        runs = shape.numel if mode == "e2e_cpu_offload" else shape.shared_numel + shape.n_layers * shape.layer_numel / num_blocks
        return {"h2d": c.offload_h2d_per_param * runs / s.world, "d2h": c.offload_d2h_per_param * runs / s.world}
    block = shape.n_layers * shape.layer_numel / num_blocks / s.world
    if mode == "block_host":
        return {"h2d": c.param_bytes * block, "d2h": c.grad_bytes * block}
    per_param = {"block": c.param_bytes + c.adamw_bytes, "optimizer": c.adamw_bytes}.get(mode, 0.0)
    one = per_param * block / steps_per_block
    return {"h2d": one, "d2h": one}


def ideal_bytes(shape: Shape, c: Constants, s: Setting, *, num_blocks: int, activations: float,
                unsharded: float = 0.0) -> float:
    """The method's ideal for a DB rank: the shared modules + L/B of the layers, with their gradients and
    AdamW state (sharded over the world), + one block's ``activations`` (+ FSDP2's ``unsharded`` units,
    which every FSDP run holds)."""
    state = c.param_bytes + c.grad_bytes + c.adamw_bytes
    return state * (shape.shared_numel + shape.n_layers * shape.layer_numel / num_blocks) / s.world + activations + unsharded


# --------------------------------------------------------------------------------------------
# The llama3 family
# --------------------------------------------------------------------------------------------

LLAMA3_SHAPES = {  # name: (d, n_layers) of Llama 3.2-1B, 3.1-8B, -70B, -405B (128256 tokens, 8 KV heads of 128)
    "1B": (2048, 16), "8B": (4096, 32), "70B": (8192, 80), "405B": (16384, 126),
}
VOCAB = 128256
FAMILY_FFN = dict(ffn_multiple_of=1024, ffn_dim_multiplier=1.3)  # the 8B/70B FFN rule: 8d/3·1.3 up to 1024s


def llama3_family(dim: int) -> int:
    """n_layers of the continuous llama3 family at width ``dim`` (heads of 128, 8 KV heads, the 8B/70B FFN
    rule :data:`FAMILY_FFN`, vocabulary 128256): interpolated log-log through the 1B/8B/70B/405B
    shapes (extrapolated linearly in log-log beyond them) and rounded to a multiple of 8, so that
    B = 2, 4, 8 divide it."""
    pts = sorted((math.log(d), math.log(n)) for d, n in LLAMA3_SHAPES.values())
    x = math.log(dim)
    i = next((k for k in range(len(pts) - 1) if x <= pts[k + 1][0]), len(pts) - 2)
    (x0, y0), (x1, y1) = pts[i], pts[i + 1]
    layers = math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return max(8, 8 * round(layers / 8))


def largest_fitting(fits, dims) -> tuple[int, object] | None:
    """The largest ``dim`` of ``dims`` (ascending) for which ``fits(dim)`` returns a truthy result, with it;
    None when none fits. Device bytes grow with d in the family, so the search stops at the first
    miss after a fit."""
    best = None
    for dim in dims:
        result = fits(dim)
        if result:
            best = (dim, result)
        elif best is not None:
            break
    return best


def replace(c: Constants, **kwargs) -> Constants:
    return dataclasses.replace(c, **kwargs)
