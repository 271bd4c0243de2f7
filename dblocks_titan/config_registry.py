"""Model specs and training recipes.

- ``model_registry(name, flavor)``: ``dblocks_llama`` (DiffusionBlocks) or ``llama3`` (its titan
  end-to-end twin: titan's own Llama3Model of the same shape); ``dblocks_mdlm`` / ``mdlm``;
  ``dblocks_huginn`` (recurrent depth, B = 1) / ``huginn`` (its end-to-end baseline, titan's Trainer).
- ``recipe(name, flavor)``: the base ``Trainer.Config`` for that model; ``load_toml(path)`` applies a TOML
  file of ``train_configs/`` on top of it (:mod:`dblocks_titan.tables`).
- Zero-argument config functions (``debug_dblocks``, ``owt_dblocks``, ``owt_llama_baseline``, …)
  for titan's native ``--module dblocks_titan --config <fn>``: each loads the TOML file of the
  same name, so the TOML files are the single source of every shipped run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.optimizer import default_adamw, LRSchedulersContainer
from torchtitan.components.quantization import Float8LinearConverter
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.config.configs import DebugConfig
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.common import Linear
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from dblocks_titan import compat, data  # noqa: F401  (data registers the datasets)
from dblocks_titan.ar_eval import ARValidator
from dblocks_titan.baseline_trainer import BaselineTrainer
from dblocks_titan.checkpoints import DBlocksCheckpointManager
from dblocks_titan.data import CharTokenizer, Text8DataLoader
from dblocks_titan.inputs import Sources
from dblocks_titan.metrics import JsonlMetricsProcessor
from dblocks_titan.huginn_trainer import HuginnTrainer
from dblocks_titan.models import dblocks_llama, huginn, mdlm
from dblocks_titan.models.block_denoiser import Conditioning
from dblocks_titan.nelbo import NELBOValidator
from dblocks_titan.parallelize import parallelize_dblocks
from dblocks_titan.tables import apply_tables, model_kwargs, read_toml, table_origins, TomlError
from dblocks_titan.trainer import DBlocksConfig, DBlocksTrainer

ASSETS = Path(__file__).parent / "assets"
TRAIN_CONFIGS = Path(__file__).resolve().parent.parent / "train_configs"
MODELS = ("dblocks_llama", "llama3", "dblocks_mdlm", "mdlm", "dblocks_huginn", "huginn")
MASKED_MODELS = ("dblocks_mdlm", "mdlm")
RECURRENT_MODELS = ("dblocks_huginn", "huginn")
DEPTH_KEYS = ("mean_depth", "backprop_depth", "inference_depth")
"""[model] keys of the recurrent models (``huginn``: all three; ``dblocks_huginn``: inference_depth,
the sampler's σ levels K)."""


FLOAT8 = ("none", "rowwise", "emulate")
CONDITIONING_KEYS = tuple(f.name for f in dataclasses.fields(Conditioning))
SLOT_KEYS = tuple(f.name for f in dataclasses.fields(dblocks_llama.NoisySlot))
ARCH_KEYS = CONDITIONING_KEYS + SLOT_KEYS
"""``[model]`` keys that shape a DiffusionBlocks model (:class:`Conditioning`; AR also :class:`NoisySlot`)."""


def _architecture(name: str, options: dict) -> dict:
    """``options`` (``[model]`` keys of :data:`ARCH_KEYS`) as the model builders' keyword arguments."""
    allowed = {"dblocks_llama": ARCH_KEYS, "llama3": (), "huginn": ()}.get(name, CONDITIONING_KEYS)
    for key in options:
        if key not in allowed:
            raise ValueError(f"[model] {key} does not apply to model {name!r}"
                             + (f" (its keys: {', '.join(allowed)})" if allowed else ""))
    kwargs = {}
    if name not in ("llama3", "huginn"):
        kwargs["conditioning"] = Conditioning(**{k: v for k, v in options.items() if k in CONDITIONING_KEYS})
    if name == "dblocks_llama":
        kwargs["slot"] = dblocks_llama.NoisySlot(**{k: v for k, v in options.items() if k in SLOT_KEYS})
    return kwargs


PER_SAMPLE_MODULES = ("adaln", "t_embedder", "final_adaln", "adaln_single")
"""Module names of the noise-level conditioning: every Linear inside one of them takes one row per
sample (c [B, D] or the noise label's features [B, 256]), not one per token."""


def float8_skipped_fqns(model_config) -> list[str]:
    """FQNs of the Linears that float8 leaves in high precision: the head (as titan's recipes do) and
    every Linear with an FQN component in :data:`PER_SAMPLE_MODULES`.

    Why the per-sample ones: a Linear's weight gradient ``dW = dYᵀ·X`` contracts over its input's
    rows, here the local batch size, and CUDA's ``torch._scaled_mm`` needs every contracted dimension
    to be a multiple of 16, so as Float8Linear they crash at the usual small local batch (e.g. 2–8).
    They run once per sample, a negligible share of the FLOPs, so float8 would buy nothing there.
    Keyed on module names, not shapes (a per-sample Linear can have float8-friendly shapes). Exact
    FQNs are returned because titan's filter matches them as substrings.
    """
    skipped = ["lm_head"]
    for fqn, *_ in model_config.traverse(Linear.Config):
        if set(fqn.split(".")) & set(PER_SAMPLE_MODULES):
            skipped.append(fqn)
    return skipped


def model_registry(
    name: str, flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None, n_layers: int | None = None,
    float8: str = "none", compile: bool = False, **options,
) -> ModelSpec:
    """AR: ``dblocks_llama`` and its titan twin ``llama3``. Masked diffusion: ``dblocks_mdlm`` and
    its end-to-end baseline ``mdlm`` (always bidirectional SDPA: ``attn_backend`` is not used).
    ``vocab_size`` / ``n_layers`` override the flavor's; ``options``: the :data:`ARCH_KEYS` that shape
    the DiffusionBlocks models' conditioning and noisy slot.

    ``float8``: titan's ``Float8LinearConverter`` swaps every eligible Linear (both dims divisible by
    16; the head and the per-sample conditioning Linears excluded, :func:`float8_skipped_fqns`) for
    torchao's Float8Linear: ``rowwise`` (H100-class GPUs) or ``emulate`` (any device, eager only: for
    tests). ``compile`` tells it whether the layers will be compiled. ``depths``: :data:`DEPTH_KEYS` of
    the recurrent models.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model name {name!r}; choose one of {MODELS}.")
    depths = {k: options.pop(k) for k in DEPTH_KEYS if k in options}
    if depths and name not in RECURRENT_MODELS:
        raise ValueError(f"[model] {', '.join(sorted(depths))} apply to the recurrent models {RECURRENT_MODELS}, "
                         f"not {name!r}.")
    if name == "dblocks_huginn" and depths.keys() - {"inference_depth"}:
        raise ValueError("[model] mean_depth and backprop_depth apply to 'huginn' (a DiffusionBlocks step runs the core "
                         "once); 'dblocks_huginn' takes inference_depth (the sampler's σ levels K).")
    if n_layers is not None and name in RECURRENT_MODELS:
        raise ValueError(f"[model] n_layers does not apply to {name!r}: its flavor sets prelude, core and coda.")
    arch = _architecture(name, options)
    if name == "dblocks_llama":
        model = dblocks_llama.flavor_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size,
                                            n_layers=n_layers, **arch)
    elif name == "llama3":
        model = dblocks_llama.baseline_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size,
                                              n_layers=n_layers)
    elif name == "huginn":
        model = huginn.huginn_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size, **depths)
    elif name == "dblocks_huginn":
        model = huginn.dblocks_huginn_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size,
                                             sampler_levels=depths.get("inference_depth", 32), **arch)
    else:
        model = mdlm.mdlm_config(flavor, end_to_end=name == "mdlm", vocab_size=vocab_size, n_layers=n_layers, **arch)
    if float8 not in FLOAT8:
        raise ValueError(f"[model] float8 must be one of {FLOAT8}, got {float8!r}.")
    if float8 != "none":
        converter = Float8LinearConverter.Config(
            emulate=float8 == "emulate", model_compile_enabled=compile, filter_fqns=float8_skipped_fqns(model)
        )
        model = converter.build().convert(model)
    return ModelSpec(
        name=name,
        flavor=flavor,
        model=model,
        parallelize_fn=parallelize_dblocks,
        pipelining_fn=None,
        post_optimizer_build_fn=None,
        state_dict_adapter=None,
    )


def recipe(name: str = "dblocks_llama", flavor: str = "debugmodel", **model_kwargs) -> Trainer.Config:
    """Settings shared by a DiffusionBlocks run and its e2e twin (same data, tokenizer, optimizer).

    AR models read the embedded corpus with the embedded BPE. Masked-diffusion models validate with
    the NELBO; character-level ones (vocabulary 28: text8) read the corpus's text8-style (a–z and
    space) version with the character tokenizer, BPE ones (flavor ``owt``) the same data as AR.
    """
    model_spec = model_registry(name, flavor, **model_kwargs)
    common = dict(
        model_spec=model_spec,
        hf_assets_path=str(ASSETS / "tokenizer"),
        tokenizer=HuggingFaceTokenizer.Config(),
        optimizer=default_adamw(lr=1e-3),
        lr_scheduler=LRSchedulersContainer.Config(warmup_steps=20, decay_ratio=0.8, decay_type="cosine", min_lr_factor=0.1),
        training=TrainingConfig(local_batch_size=8, seq_len=128, steps=200, disable_cuda_graphs=True),
        dataloader=HuggingFaceTextDataLoader.Config(dataset="shakespeare"),
        validator=ARValidator.Config(
            enable=True, freq=50, steps=1,
            dataloader=HuggingFaceTextDataLoader.Config(dataset="shakespeare_validation", infinite=False),
        ),
        metrics=JsonlMetricsProcessor.Config(log_freq=10),  # + dump_folder/metrics.jsonl
        parallelism=ParallelismConfig(spmd_backend=compat.default_spmd_backend()),
        checkpoint=DBlocksCheckpointManager.Config(interval=500, last_save_model_only=False),
        activation_checkpoint=None,
        debug=DebugConfig(seed=0),  # reproducible initialisation: a run and its twin start alike
    )
    if name in MASKED_MODELS:
        common.update(
            validator=NELBOValidator.Config(
                enable=True, freq=100, steps=2,
                dataloader=HuggingFaceTextDataLoader.Config(dataset="shakespeare_validation", infinite=False),
            ),
            dblocks=DBlocksConfig(num_blocks=1 if name == "mdlm" else 3, gamma=0.05),
        )
        if model_spec.model.vocab_size == CharTokenizer(None).get_vocab_size():  # character level (text8)
            common.update(
                tokenizer=CharTokenizer.Config(),
                training=TrainingConfig(local_batch_size=16, seq_len=256, steps=200, disable_cuda_graphs=True),
                dataloader=Text8DataLoader.Config(dataset="shakespeare_text8"),
            )
            common["validator"].dataloader = Text8DataLoader.Config(
                dataset="shakespeare_text8", split="validation", infinite=False
            )
    if name == "dblocks_huginn":
        common["dblocks"] = DBlocksConfig(num_blocks=1, gamma=0.0)  # one denoiser for the whole σ range
    if name == "llama3":
        return BaselineTrainer.Config(loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config()), **common)
    if name == "huginn":
        return HuginnTrainer.Config(loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config()), **common)
    return DBlocksTrainer.Config(loss=CrossEntropyLoss.Config(), **common)


def build_config(table: dict, sources: Sources, where: str) -> Trainer.Config:
    """The ``Trainer.Config`` a TOML table describes: ``[model]`` picks the recipe, the other tables are
    applied onto it (:func:`dblocks_titan.tables.apply_tables`). ``where``: the file, for messages."""
    table = dict(table)
    model = model_kwargs(table.pop("model", {}), sources, where)
    given = dict(model)
    compile_table = table.get("compile", {})
    compile_enabled = isinstance(compile_table, dict) and compile_table.get("enable", False) is True
    try:
        config = recipe(model.pop("name", "dblocks_llama"), model.pop("flavor", "debugmodel"),
                        compile=compile_enabled, **model)
    except ValueError as e:  # an unknown name or flavor: name the flags that gave [model] keys, else the file
        flags = [f"{sources.origins[f'model.{k}']} {v}" for k, v in given.items()
                 if sources.origins.get(f"model.{k}", "").startswith("--")]
        raise TomlError(f"{', '.join(flags) or where}: {e}") from None
    return apply_tables(config, table, sources, where)


def config_from_table(table: dict, where: str) -> Trainer.Config:
    """The ``Trainer.Config`` of a TOML table read from ``where`` (a file name, for messages)."""
    return build_config(table, Sources(table_origins(table, where)), where)


def load_toml(path) -> Trainer.Config:
    """The ``Trainer.Config`` of a TOML file."""
    return config_from_table(read_toml(path), str(path))


def from_train_config(name: str) -> Trainer.Config:
    return load_toml(TRAIN_CONFIGS / f"{name}.toml")


def debug_dblocks() -> Trainer.Config:
    return from_train_config("debug_dblocks")


def debug_llama_baseline() -> Trainer.Config:
    return from_train_config("debug_llama_baseline")


def owt_dblocks() -> Trainer.Config:
    return from_train_config("owt_dblocks")


def owt_dblocks_blockparallel() -> Trainer.Config:
    return from_train_config("owt_dblocks_blockparallel")


def owt_llama_baseline() -> Trainer.Config:
    return from_train_config("owt_llama_baseline")


def debug_mdlm() -> Trainer.Config:
    return from_train_config("debug_mdlm")


def debug_dblocks_mdlm() -> Trainer.Config:
    return from_train_config("debug_dblocks_mdlm")


def text8_mdlm() -> Trainer.Config:
    return from_train_config("text8_mdlm")


def text8_dblocks() -> Trainer.Config:
    return from_train_config("text8_dblocks")


def debug_huginn() -> Trainer.Config:
    return from_train_config("debug_huginn")


def debug_dblocks_huginn() -> Trainer.Config:
    return from_train_config("debug_dblocks_huginn")


def lm1b_huginn() -> Trainer.Config:
    return from_train_config("lm1b_huginn")


def lm1b_dblocks_huginn() -> Trainer.Config:
    return from_train_config("lm1b_dblocks_huginn")
