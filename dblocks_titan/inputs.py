"""The one validation pass over a run's whole config, before anything is built.

:func:`check_inputs` is called by every way a run starts (``python -m dblocks_titan.train`` / ``.eval``
through :class:`dblocks_titan.toml_config.TomlConfigManager`, and ``DBlocksTrainer.__init__`` for titan's
native ``--module dblocks_titan --config X``). It raises :class:`InputError`, one line naming the key,
where its value came from (:class:`Sources`: the TOML file or the flag), the bad value and what is allowed:

1. types: every leaf of the ``Trainer.Config`` tree against its annotation (TOML values are not typed
   by anyone else; tyro types the flags);
2. ranges (:data:`RULES`) and the optimizer's param groups;
3. settings that must agree (DiffusionBlocks: blocks divide the layers, block-parallel combinations, ...);
4. files: the tokenizer loads and fits the model's vocabulary, every dataset the run reads loads, holds
   records and at least one sequence, and a checkpoint it resumes from is complete and fits its model.

Its one change to the config: a held-out corpus of the user's (``text_validation``) takes its unigram
baseline from the run's training data (:func:`fill_unigram_source`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader
from torchtitan.tools.logging import logger

from dblocks_titan.checkpoints import check_resume
from dblocks_titan.data.datasets import check_dataset
from dblocks_titan.data.chars import CharTokenizer
from dblocks_titan.data.text8 import Text8DataLoader
from dblocks_titan.errors import InputError

__all__ = ["InputError", "Sources", "check_inputs", "check_values", "flag_keys", "field_hints"]

OPTIMIZERS = ("AdamW", "Adam", "DistMuon")  # titan 0.3.0's OptimizersContainer._resolve_optimizer_factory


# -- where a value came from ---------------------------------------------------------------------


@dataclass
class Sources:
    """Dotted config key (``training.seq_len``; ``optimizer.lr`` for param group 0) → where its value came
    from: a TOML file's path, or the command-line flag as typed (``--training.seq-len``)."""

    origins: dict[str, str] = field(default_factory=dict)

    def name(self, key: str, value: Any) -> str:
        """``x.toml: training.seq_len = 0``, ``--training.seq_len 0`` or ``training.seq_len = 0``."""
        origin = self.origins.get(key)
        if origin is None:
            return f"{key} = {value!r}"
        if origin.startswith("--"):
            return f"{origin} {value}"
        return f"{origin}: {key} = {value!r}"

    def fail(self, key: str, value: Any, allowed: str) -> InputError:
        return InputError(f"{self.name(key, value)}: must be {allowed}")


def flag_key(flag: str) -> str:
    """The dotted key a flag sets: ``--validator.no-enable`` → ``validator.enable``, titan's param-group-0
    spelling ``--optimizer.param-groups.0.optimizer-kwargs.lr`` → ``optimizer.lr``."""
    key = flag.split("=", 1)[0].lstrip("-").replace("-", "_")
    head, _, last = key.rpartition(".")
    if last.startswith("no_"):
        key = f"{head}.{last[3:]}" if head else last[3:]
    key = re.sub(r"^optimizer\.param_groups\.0\.optimizer_kwargs\.", "optimizer.", key)
    return re.sub(r"^optimizer\.param_groups\.0\.optimizer_name$", "optimizer.name", key)


def flag_keys(argv: list[str]) -> dict[str, str]:
    """Key → flag for every ``--flag`` in ``argv``."""
    return {flag_key(arg): arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}


# -- 1. types -------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def field_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation naming a TYPE_CHECKING-only import: check the resolvable ones
        return {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def leaves(config: Any, prefix: str = ""):
    """(dotted key, value, annotation) of every leaf field of the config tree (``model_spec`` aside:
    the recipe builds it); lists of configs (the optimizer's param groups) as ``key.<i>.``."""
    hints = field_hints(type(config))
    for f in dataclasses.fields(config):
        if f.name == "model_spec":
            continue
        key, value = prefix + f.name, getattr(config, f.name)
        if _is_config(value):
            yield from leaves(value, f"{key}.")
        elif isinstance(value, list) and value and all(map(_is_config, value)):
            for i, item in enumerate(value):
                yield from leaves(item, f"{key}.{i}.")
        else:
            yield key, value, hints.get(f.name)


def conforms(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``; None for annotations this pass does not check."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        fits = [conforms(value, a) for a in args]
        return True if True in fits else (None if None in fits else False)
    if hint is type(None):
        return value is None
    if hint in (bool, int, float, str):
        if isinstance(value, bool):
            return hint is bool
        return isinstance(value, (int, float) if hint is float else hint)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False
            fits = [conforms(v, a) for v, a in zip(value, args)]
        else:
            fits = [conforms(v, args[0]) for v in value] if args else []
        return False if False in fits else (None if None in fits else True)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return None


def describe(hint: Any) -> str:
    """``hint`` in words, for a message."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple):
        return "a list" + (f" of {describe(args[0])}" if args else "")
    words = {bool: "true or false", int: "an int", float: "a number", str: "a string", type(None): "unset"}
    return words.get(hint, getattr(hint, "__name__", str(hint)))


# -- 2. ranges ------------------------------------------------------------------------------------


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def at_least(n: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _int(v) and v >= n), f"an int >= {n}"


def unit_interval(closed: bool) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _number(v) and 0 <= v <= 1 and (closed or v < 1)), f"a number in [0, 1{']' if closed else ')'}"


POSITIVE = (lambda v: _number(v) and v > 0 and not math.isnan(v)), "a number > 0"
POSITIVE_FINITE = (lambda v: _number(v) and 0 < v < math.inf), "a finite number > 0"
FINITE = (lambda v: _number(v) and math.isfinite(v)), "a finite number"
DEGREE = (lambda v: _int(v) and (v >= 1 or v == -1)), "an int >= 1, or -1 (the ranks the other degrees leave)"

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "training.local_batch_size": at_least(1),
    "training.global_batch_size": ((lambda v: _int(v) and (v >= 1 or v == -1)),
                                   "an int >= 1, or -1 (local batch x data-parallel ranks)"),
    "training.seq_len": at_least(1),
    "training.steps": at_least(1),
    "training.max_norm": (POSITIVE[0], "a number > 0 (inf: no clipping)"),
    "training.gc_freq": at_least(1),
    "lr_scheduler.warmup_steps": at_least(0),
    "lr_scheduler.decay_ratio": ((lambda v: v is None or unit_interval(True)[0](v)), "a number in [0, 1], or unset"),
    "lr_scheduler.min_lr_factor": unit_interval(True),
    "metrics.log_freq": at_least(1),
    "validator.freq": at_least(1),
    "validator.steps": ((lambda v: _int(v) and (v >= 1 or v == -1)), "an int >= 1, or -1 (the whole split)"),
    "validator.t_samples": at_least(1),
    "validator.t_ranges": (at_least(0)[0], "an int >= 0 (0: one range per block)"),
    "checkpoint.interval": at_least(1),
    "checkpoint.keep_latest_k": ((lambda v: _int(v) and (v == 0 or v >= 2)), "0 (keep every checkpoint) or an int >= 2"),
    "checkpoint.load_step": (at_least(-1)[0], "a step >= 0, or -1 (the latest)"),
    "parallelism.data_parallel_replicate_degree": at_least(1),
    "parallelism.data_parallel_shard_degree": DEGREE,
    "parallelism.tensor_parallel_degree": at_least(1),
    "parallelism.pipeline_parallel_degree": at_least(1),
    "parallelism.context_parallel_degree": at_least(1),
    "parallelism.expert_parallel_degree": at_least(1),
    "parallelism.pipeline_parallel_microbatch_size": at_least(1),
    "comm.init_timeout_seconds": at_least(1),
    "comm.train_timeout_seconds": at_least(1),
    "dataloader.num_workers": at_least(0),
    "validator.dataloader.num_workers": at_least(0),
    "profiler.profile_freq": at_least(1),
    "dblocks.num_blocks": at_least(1),
    "dblocks.gamma": unit_interval(False),
    "dblocks.edge_share": unit_interval(True),
    "dblocks.steps_per_block": at_least(1),
    "dblocks.freeze_shared_after": (at_least(0)[0], "an int >= 0 (0: never frozen)"),
    "dblocks.steps_per_block_from": (at_least(0)[0], "an int >= 0 (0: runs of K from the first step)"),
    "dblocks.running_loss_decay": unit_interval(False),
    "dblocks.shared_lr_scale": POSITIVE_FINITE,
    "dblocks.edm.p_mean": FINITE,
    "dblocks.edm.p_std": POSITIVE_FINITE,
    "dblocks.edm.sigma_min": POSITIVE_FINITE,
    "dblocks.edm.sigma_max": POSITIVE_FINITE,
    "dblocks.edm.sigma_data": POSITIVE_FINITE,
}
"""Key → (test, what is allowed). Keys a config lacks (``dblocks`` in a titan run) are skipped."""

OPTIMIZER_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
    "weight_decay": (lambda v: _number(v) and 0 <= v < math.inf, "a finite number >= 0"),
    "eps": (lambda v: _number(v) and 0 < v < math.inf, "a finite number > 0"),
    "betas": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
              "two numbers in [0, 1), e.g. [0.9, 0.95]"),
}


def get(config: Any, key: str, default: Any = None) -> Any:
    for part in key.split("."):
        if not hasattr(config, part):
            return default
        config = getattr(config, part)
    return config


def passes(test: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(test(value))
    except TypeError:
        return False


def optimizer_name_key(i: int) -> str:
    """The key users write for param group ``i``'s optimizer name (group 0: ``optimizer.name``)."""
    return "optimizer.name" if i == 0 else f"optimizer.param_groups.{i}.optimizer_name"


def check_types_and_ranges(config: Any, sources: Sources) -> None:
    for key, value, hint in leaves(config):
        rule = RULES.get(key)
        if conforms(value, hint) is False:
            raise sources.fail(key, value, rule[1] if rule else describe(hint))
        if rule and not passes(rule[0], value):
            raise sources.fail(key, value, rule[1])
    for i, group in enumerate(config.optimizer.param_groups):
        prefix = "optimizer." if i == 0 else f"optimizer.param_groups.{i}.optimizer_kwargs."
        if group.optimizer_name not in OPTIMIZERS:
            raise sources.fail(optimizer_name_key(i), group.optimizer_name, "one of " + ", ".join(map(repr, OPTIMIZERS)))
        for name, (test, allowed) in OPTIMIZER_RULES.items():
            if name in group.optimizer_kwargs and not passes(test, group.optimizer_kwargs[name]):
                raise sources.fail(prefix + name, group.optimizer_kwargs[name], allowed)


# -- 3. settings that must agree -----------------------------------------------------------------


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_batch(config: Any, sources: Sources) -> None:
    """titan's ``global_batch_size % (local_batch_size x data-parallel degree) == 0`` (a bare assert there)."""
    t, p = config.training, config.parallelism
    if t.global_batch_size == -1 or config.comm.mode != "default":
        return
    others = p.tensor_parallel_degree * p.pipeline_parallel_degree * p.context_parallel_degree
    shard = p.data_parallel_shard_degree
    if shard == -1:
        shard = max(1, _world_size() // (others * p.data_parallel_replicate_degree))
    per_step = t.local_batch_size * shard * p.data_parallel_replicate_degree
    if t.global_batch_size % per_step:
        raise sources.fail("training.global_batch_size", t.global_batch_size,
                           f"a multiple of training.local_batch_size x data-parallel ranks = {t.local_batch_size} x "
                           f"{per_step // t.local_batch_size} = {per_step} (or -1)")


def check_dblocks(config: Any, sources: Sources) -> None:
    """A DiffusionBlocks run (a config with ``dblocks``): the settings that must agree."""
    db = config.dblocks
    if not config.training.disable_cuda_graphs:
        raise sources.fail("training.disable_cuda_graphs", False,
                           "true: DiffusionBlocks changes the active block every step and needs inactive grads to "
                           "stay None (set --training.disable_cuda_graphs)")
    if config.model_spec is not None:
        layers = len(config.model_spec.model.layers)
        if layers % db.num_blocks:
            raise sources.fail("dblocks.num_blocks", db.num_blocks,
                               f"an int that divides the model's n_layers = {layers}: one of "
                               f"{[b for b in range(1, layers + 1) if layers % b == 0]}")
    if not db.edm.sigma_min < db.edm.sigma_max:
        raise sources.fail("dblocks.edm.sigma_max", db.edm.sigma_max,
                           f"larger than dblocks.edm.sigma_min = {db.edm.sigma_min}")
    if db.offload_optimizer:  # the deprecated spelling of offload = "optimizer"
        if db.offload == "block":
            raise sources.fail("dblocks.offload_optimizer", True,
                               "false (deprecated) with dblocks.offload = 'block': drop offload_optimizer")
        if db.parallel == "blocks":
            raise sources.fail("dblocks.offload_optimizer", True,
                               "false with dblocks.parallel = 'blocks': a block-parallel rank holds only its own "
                               "block, which trains at every step")
        logger.warning("dblocks.offload_optimizer is deprecated: write dblocks.offload = 'optimizer'")
        db.offload, db.offload_optimizer = "optimizer", False
    if db.block_step == "host":
        if db.offload != "block":
            raise sources.fail("dblocks.block_step", "host", f"'device' with dblocks.offload = {db.offload!r}: the "
                               "optimizer step moves to the host with the blocks' parameters (offload = 'block')")
        for i, group in enumerate(config.optimizer.param_groups):
            if group.optimizer_name not in ("Adam", "AdamW"):
                raise sources.fail(optimizer_name_key(i), group.optimizer_name,
                                   "'Adam' or 'AdamW' with dblocks.block_step = 'host'")
        if config.optimizer.implementation == "fused_opt_states_bf16":
            raise sources.fail("optimizer.implementation", "fused_opt_states_bf16",
                               "'fused', 'foreach' or 'for-loop' with dblocks.block_step = 'host'")
    if config.training.enable_cpu_offload and db.offload != "none":
        raise sources.fail("dblocks.offload", db.offload,
                           "'none' with training.enable_cpu_offload: titan's CPU offload already keeps every block's "
                           "parameters, gradients and AdamW state on the host (choose one of the two)")
    check_model = getattr(getattr(config.model_spec, "model", None), "check_dblocks", None)
    if check_model is not None:  # a model's own rule, e.g. dblocks_huginn: B = 1
        try:
            check_model(db)
        except ValueError as e:
            raise InputError(str(e)) from None
    if db.parallel == "blocks":
        if db.offload != "none":
            raise sources.fail("dblocks.offload", db.offload,
                               "'none' with dblocks.parallel = 'blocks': a block-parallel rank holds only its own "
                               "block, which trains at every step")
        if db.num_blocks < 2:
            raise sources.fail("dblocks.num_blocks", db.num_blocks,
                               ">= 2 with dblocks.parallel = 'blocks' (one rank group per block)")
        if db.shared_grads == "group" and config.checkpoint.enable:
            raise sources.fail("dblocks.shared_grads", "group",
                               "'world' to checkpoint: 'group' trains B different copies of the shared modules, which "
                               "one checkpoint cannot hold")
    if db.shared_reduce_dtype != "float32" and (db.parallel != "blocks" or db.shared_grads != "world"):
        raise sources.fail("dblocks.shared_reduce_dtype", db.shared_reduce_dtype,
                           "'float32' unless dblocks.parallel = 'blocks' with shared_grads = 'world' (it is the dtype "
                           "of that mode's cross-group all-reduce; FSDP2's reductions stay titan's)")
    t_ranges = getattr(config.validator, "t_ranges", 0)
    if config.validator.enable and t_ranges % db.num_blocks:
        raise sources.fail("validator.t_ranges", t_ranges,
                           f"a multiple of dblocks.num_blocks = {db.num_blocks} (each t range is evaluated by the one "
                           "block that owns it)")


def check_values(config: Any, sources: Sources | None = None) -> None:
    """Steps 1-3 of the pass: no file is opened."""
    sources = sources or Sources(flag_keys(sys.argv[1:]))
    check_types_and_ranges(config, sources)
    check_batch(config, sources)
    if hasattr(config, "dblocks"):
        check_dblocks(config, sources)


# -- 4. files -------------------------------------------------------------------------------------


def check_tokenizer(config: Any):
    """The tokenizer loads and fits the model's vocabulary (and its [MASK] id); returns it."""
    if isinstance(config.tokenizer, HuggingFaceTokenizer.Config):
        if not (Path(config.hf_assets_path) / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in {config.hf_assets_path!r}: point --tokenizer.path (or --hf_assets_path) at "
                "the folder that holds it"
            )
    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)
    vocab = tokenizer.get_vocab_size()
    model = config.model_spec.model if config.model_spec is not None else None
    if model is not None and vocab > model.vocab_size:
        raise ValueError(
            f"tokenizer has {vocab} tokens but the model's vocab_size is {model.vocab_size}: "
            "set [model] vocab_size to at least the tokenizer's"
        )
    mask_id = getattr(model, "mask_id", None)
    if mask_id is not None and not isinstance(config.tokenizer, CharTokenizer.Config) and mask_id < vocab:
        raise ValueError(
            f"the [MASK] id {mask_id} is a token of the tokenizer ({vocab} tokens): use a tokenizer of at most "
            f"{mask_id} tokens (the {config.model_spec.flavor!r} flavor's [MASK] follows GPT-2's 50257)"
        )
    return tokenizer


def fill_unigram_source(config: Any) -> None:
    """A held-out corpus of the user's (``--validator.dataloader.dataset text_validation``) has no training
    split of its own: unless ``--validator.unigram_dataset`` names one, its unigram CE comes from the run's
    training data (``--dataloader.dataset``/``dataset_path``), the frequencies the model could have learnt."""
    validator = config.validator
    if (getattr(validator, "unigram_dataset", None) == "" and validator.dataloader.dataset == "text_validation"
            and isinstance(config.dataloader, HuggingFaceTextDataLoader.Config)):
        validator.unigram_dataset = config.dataloader.dataset
        validator.unigram_dataset_path = config.dataloader.dataset_path or ""


def check_data(config: Any, tokenizer) -> None:
    """Every dataset the run reads (training, validation when on, and the validator's unigram model's)
    loads and holds a sequence."""
    loaders = [("--dataloader", config.dataloader)]
    if config.validator.enable:
        loaders.append(("--validator.dataloader", config.validator.dataloader))
        if getattr(config.validator, "unigram_dataset", "") and config.validator.unigram_tokens:
            check_dataset(config.validator.unigram_dataset, config.validator.unigram_dataset_path or None,
                          flag="--validator.unigram_dataset")
    seq_len = config.training.seq_len
    for flag, loader in loaders:
        if isinstance(config.tokenizer, CharTokenizer.Config) and not isinstance(loader, Text8DataLoader.Config):
            raise ValueError(
                f"the char tokenizer reads only text8-style text (a-z and space) but dataset "
                f"{loader.dataset!r} is not one: use dataset text8, shakespeare_text8 or markov"
            )
        if isinstance(loader, Text8DataLoader.Config):
            loader.check(seq_len=seq_len, flag=flag)
        elif isinstance(loader, HuggingFaceTextDataLoader.Config):
            check_dataset(loader.dataset, loader.dataset_path, tokenizer=tokenizer, seq_len=seq_len,
                          flag=f"{flag}.dataset")
        elif hasattr(loader, "check"):
            loader.check()


def check_inputs(config: Any, sources: Sources | None = None) -> None:
    """The whole pass (see the module docstring). ``sources`` default: the flags of this process's argv."""
    sources = sources or Sources(flag_keys(sys.argv[1:]))
    check_values(config, sources)
    fill_unigram_source(config)
    try:
        check_data(config, check_tokenizer(config))
        check_resume(config)
    except InputError:
        raise
    except (OSError, ValueError, ImportError) as e:
        raise InputError(str(e)) from e
