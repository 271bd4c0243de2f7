"""Model specs and training recipes.

- ``model_registry(name, flavor)``: ``dblocks_llama`` (DiffusionBlocks) or ``llama3`` (its titan
  end-to-end twin: titan's own Llama3Model of the same shape).
- ``recipe(name, flavor)``: the base ``Trainer.Config`` for that model; a TOML file in
  ``train_configs/`` is applied on top of it (:mod:`dblocks_titan.toml_config`).
- Zero-argument config functions (``debug_dblocks``, ``owt_dblocks``, ``owt_llama_baseline``, …)
  for titan's native ``--module dblocks_titan --config <fn>``: each loads the TOML file of the
  same name, so the TOML files are the single source of every shipped run.
"""

from __future__ import annotations

from pathlib import Path

from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
from torchtitan.components.optimizer import default_adamw, LRSchedulersContainer
from torchtitan.components.quantization import Float8LinearConverter
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.components.validate import Validator
from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.config.configs import DebugConfig
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.models.common import Linear
from torchtitan.protocols.model_spec import ModelSpec
from torchtitan.trainer import Trainer

from dblocks_titan import compat, data  # noqa: F401  (data registers the datasets)
from dblocks_titan.data import CharTokenizer, Text8DataLoader
from dblocks_titan.metrics import JsonlMetricsProcessor
from dblocks_titan.models import dblocks_llama, mdlm
from dblocks_titan.nelbo import NELBOValidator
from dblocks_titan.parallelize import parallelize_dblocks
from dblocks_titan.trainer import DBlocksConfig, DBlocksTrainer

ASSETS = Path(__file__).parent / "assets"
TRAIN_CONFIGS = Path(__file__).resolve().parent.parent / "train_configs"
MODELS = ("dblocks_llama", "llama3", "dblocks_mdlm", "mdlm")
MASKED_MODELS = ("dblocks_mdlm", "mdlm")


FLOAT8 = ("none", "rowwise", "emulate")
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
    name: str, flavor: str, *, attn_backend: str = "auto", vocab_size: int | None = None, float8: str = "none",
    compile: bool = False,
) -> ModelSpec:
    """AR: ``dblocks_llama`` and its titan twin ``llama3``. Masked diffusion: ``dblocks_mdlm`` and
    its end-to-end baseline ``mdlm`` (always bidirectional SDPA: ``attn_backend`` is not used).

    ``float8``: titan's ``Float8LinearConverter`` swaps every eligible Linear (both dims divisible by
    16; the head and the per-sample conditioning Linears excluded, :func:`float8_skipped_fqns`) for
    torchao's Float8Linear: ``rowwise`` (H100-class GPUs) or ``emulate`` (any device, eager only: for
    tests). ``compile`` tells it whether the layers will be compiled.
    """
    if name == "dblocks_llama":
        model = dblocks_llama.flavor_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size)
    elif name == "llama3":
        model = dblocks_llama.baseline_config(flavor, attn_backend=attn_backend, vocab_size=vocab_size)
    elif name in MASKED_MODELS:
        model = mdlm.mdlm_config(flavor, end_to_end=name == "mdlm", vocab_size=vocab_size)
    else:
        raise ValueError(f"unknown model name {name!r}; choose one of {MODELS}.")
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
        validator=Validator.Config(
            enable=True, freq=50, steps=1,
            dataloader=HuggingFaceTextDataLoader.Config(dataset="shakespeare_validation", infinite=False),
        ),
        metrics=JsonlMetricsProcessor.Config(log_freq=10),  # + dump_folder/metrics.jsonl
        parallelism=ParallelismConfig(spmd_backend=compat.default_spmd_backend()),
        checkpoint=CheckpointManager.Config(interval=500, last_save_model_only=False),
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
    if name == "llama3":
        return Trainer.Config(loss=ChunkedLossWrapper.Config(loss_fn=CrossEntropyLoss.Config()), **common)
    return DBlocksTrainer.Config(loss=CrossEntropyLoss.Config(), **common)


def from_train_config(name: str) -> Trainer.Config:
    from dblocks_titan.toml_config import load_toml

    return load_toml(TRAIN_CONFIGS / f"{name}.toml")


def debug_dblocks() -> Trainer.Config:
    return from_train_config("debug_dblocks")


def debug_llama_baseline() -> Trainer.Config:
    return from_train_config("debug_llama_baseline")


def owt_dblocks() -> Trainer.Config:
    return from_train_config("owt_dblocks")


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
