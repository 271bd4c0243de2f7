"""titan's MetricsProcessor, plus every logged dict as one JSON line in ``dump_folder/metrics.jsonl``.

Both the DiffusionBlocks trainer and titan's plain Trainer (the e2e twin) build it from
``[metrics]``. On rank 0, each ``logger.log(metrics, step)`` call — titan's train metrics, its
validation metrics, the DB trainer's ``dblocks/*`` metrics — appends one line, in the order logged:

- ``{"step": s, "kind": "run", ...}``: first line of a run (and of each resume): :func:`run_record`.
- ``{"step": s, "kind": "train", ...}``: titan's keys (``loss_metrics/global_avg_loss``, ``grad_norm``,
  ``n_tokens_seen``, ``lr/AdamW``, ``throughput(tps)``, ``memory/...``), or the DB trainer's
  ``dblocks/*`` keys (a second line at the same step).
- ``{"step": s, "kind": "validation", "validation_metrics/loss": ..., ...}``.

The run record is written with the first logged dict, not at build time: only then are the model
(for its layer size) and the first step known. A fresh run (first step 1) moves an old file aside to
``metrics.jsonl.prev<k>``, as the DB trace does; a resumed run appends to it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from torchtitan.components.metrics import BaseLogger, MetricsProcessor
from torchtitan.distributed import ParallelDims

from dblocks_titan.models.block_denoiser import layer_flops_per_token, layer_params_without_adaln
from dblocks_titan.models.dblocks_llama import DBlocksLlama

METRICS_FILE = "metrics.jsonl"


def move_aside(path: str) -> None:
    """Rename an existing ``path`` to ``path.prev<k>`` with the first free k."""
    if not os.path.exists(path):
        return
    k = 0
    while os.path.exists(f"{path}.prev{k}"):
        k += 1
    os.rename(path, f"{path}.prev{k}")


def record_kind(metrics: dict[str, Any]) -> str:
    """``validation`` for titan's ``log_validation`` dicts (keys ``validation_metrics/*``), else ``train``."""
    return "validation" if any(k.startswith("validation_metrics/") for k in metrics) else "train"


def run_record(job: dict[str, Any], model: nn.Module, dp_degree: int) -> dict[str, Any]:
    """What a report needs to put runs on common axes, from the job config (``Trainer.Config.to_dict()``)
    and the built model:

    - ``model``, ``flavor``, ``num_blocks`` (B; 1 end to end), ``n_layers`` (L), ``steps`` (configured);
    - ``local_batch_size``, ``dp_degree``, ``global_batch_size`` (local × dp unless set), ``seq_len`` (N);
    - ``tokens_per_step`` = global batch × N (input tokens of one optimizer step);
    - ``positions_per_token`` (p), ``layer_params`` (P_layer), and ``layer_flops_per_step`` =
      :func:`layer_flops_per_token` × ``tokens_per_step``: DB counts only the active block; recurrent
      models count their iterations (``layer_flops_per_token`` of ``models.huginn``: at the mean depth).
    """
    spec, training = job["model_spec"], job["training"]
    model_cfg = spec["model"]
    n_heads = model_cfg["layers"][0]["attention"]["n_heads"]
    num_blocks = job.get("dblocks", {}).get("num_blocks", 1)
    global_batch = training["global_batch_size"]
    if global_batch <= 0:
        global_batch = training["local_batch_size"] * dp_degree
    tokens_per_step = global_batch * training["seq_len"]
    positions = 2 if isinstance(model, DBlocksLlama) else 1
    layer_params = layer_params_without_adaln(next(iter(model.layers.values())))
    if hasattr(model, "layer_flops_per_token"):  # recurrent depth: the core runs more than once (models.huginn)
        per_token = model.layer_flops_per_token(training["seq_len"])
    else:
        per_token = layer_flops_per_token(
            n_layers=len(model_cfg["layers"]), num_blocks=num_blocks, positions_per_token=positions,
            layer_params=layer_params, n_heads=n_heads, head_dim=model_cfg["dim"] // n_heads,
            seq_len=training["seq_len"],
        )
    return {
        "model": spec["name"],
        "flavor": spec["flavor"],
        "num_blocks": num_blocks,
        "n_layers": len(model_cfg["layers"]),
        "steps": training["steps"],
        "local_batch_size": training["local_batch_size"],
        "dp_degree": dp_degree,
        "global_batch_size": global_batch,
        "seq_len": training["seq_len"],
        "tokens_per_step": tokens_per_step,
        "positions_per_token": positions,
        "layer_params": layer_params,
        "layer_flops_per_step": per_token * tokens_per_step,
    }


class JsonlLogger(BaseLogger):
    """Appends each logged dict to ``path`` as one JSON line (after a run record), then hands it to
    ``inner`` (titan's TensorBoard / W&B loggers)."""

    def __init__(self, path: str, inner: BaseLogger, make_run_record: Callable[[], dict[str, Any]]):
        self.path = path
        self.inner = inner
        self.make_run_record = make_run_record
        self.started = False

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.started:
            self.start(step)
        self.append({"step": step, "kind": record_kind(metrics), **metrics})
        self.inner.log(metrics, step)

    def start(self, step: int) -> None:
        if step == 1:
            move_aside(self.path)
        self.append({"step": step, "kind": "run", **self.make_run_record()})
        self.started = True

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")  # default: 0-d tensors

    def close(self) -> None:
        self.inner.close()


class JsonlMetricsProcessor(MetricsProcessor):
    """titan's MetricsProcessor whose logger also writes ``dump_folder/metrics.jsonl`` (rank 0)."""

    @dataclass(kw_only=True, slots=True)
    class Config(MetricsProcessor.Config):
        """titan's fields (``[metrics]``); its own class so that ``build()`` constructs this processor."""

    def __init__(
        self, config: Config, *, parallel_dims: ParallelDims, dump_folder: str, config_dict: dict[str, Any], **kwargs
    ):
        super().__init__(
            config, parallel_dims=parallel_dims, dump_folder=dump_folder, config_dict=config_dict, **kwargs
        )
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        os.makedirs(dump_folder, exist_ok=True)
        dp_degree = parallel_dims.dp_replicate * parallel_dims.dp_shard
        self.logger = JsonlLogger(
            os.path.join(dump_folder, METRICS_FILE),
            self.logger,
            lambda: run_record(config_dict, self.model_parts[0], dp_degree),
        )
