"""``--job.config_file X.toml`` on top of torchtitan 0.3.0's Python config registry.

A TOML file is applied onto a base recipe (``config_registry.recipe``):

1. ``[model] name, flavor, attn_backend, vocab_size, n_layers, float8`` (+ the conditioning and
   noisy-slot keys of ``config_registry.ARCH_KEYS``) pick the recipe (DiffusionBlocks trainer for
   ``dblocks_llama``, titan's Trainer for its ``llama3`` twin);
2. ``[job] dump_folder, description`` → ``dump_folder`` (description is only logged);
3. ``[tokenizer] type = "hf" | "tiktoken" | "sentencepiece", path`` → the tokenizer
   (``hf``: a folder with ``tokenizer.json``; the others: a ``.tiktoken`` / ``.model`` file);
4. ``[optimizer] name, lr, weight_decay, betas, eps`` → every param group of titan's optimizer;
5. ``[activation_checkpoint] type = "none" | "selective" | "full"`` (+ that policy's fields);
6. every other table maps onto the ``Trainer.Config`` tree field by field (nested tables for
   nested configs, e.g. ``[validator.dataloader]``).

An unknown section or key raises ``ValueError`` naming the key and the file. CLI flags after
the file are parsed by titan's tyro parser with the TOML result as defaults, so they win.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.config.manager import ConfigManager
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataLoader

from dblocks_titan.data.datasets import check_dataset
from dblocks_titan.data.text8 import CharTokenizer, Text8DataLoader
from dblocks_titan.data.tokenizers import SentencePieceTokenizer, TiktokenTokenizer

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AC_TYPES = {"none": None, "selective": SelectiveAC.Config, "full": FullAC.Config}
MODEL_KEYS = {"name", "flavor", "attn_backend", "vocab_size", "n_layers", "float8", "mean_depth", "backprop_depth",
              "inference_depth"}  # + config_registry.ARCH_KEYS
OPTIMIZER_KEYS = {"lr", "weight_decay", "betas", "eps"}


class InputError(ValueError):
    """A bad config, path or file, found before anything is built: reported in one line."""


class TomlError(InputError):
    pass


def load_toml(path: str | Path):
    """Read ``path`` and build the ``Trainer.Config`` it describes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TomlError(f"{path}: invalid TOML: {e}") from None
    return build_config(table, str(path))


def build_config(table: dict[str, Any], where: str):
    from dblocks_titan.config_registry import ARCH_KEYS, recipe

    table = dict(table)
    model = table.pop("model", {})
    _check_keys(model, MODEL_KEYS | set(ARCH_KEYS), "model", where)
    compile_enabled = bool(table.get("compile", {}).get("enable", False))
    try:
        config = recipe(model.get("name", "dblocks_llama"), model.get("flavor", "debugmodel"), compile=compile_enabled,
                        **{k: v for k, v in model.items() if k not in ("name", "flavor")})
    except ValueError as e:
        raise TomlError(f"{where}: {e}") from None

    job = table.pop("job", {})
    _check_keys(job, {"dump_folder", "description"}, "job", where)
    config.dump_folder = job.get("dump_folder", config.dump_folder)

    if "tokenizer" in table:
        _apply_tokenizer(config, table.pop("tokenizer"), where)
    if "optimizer" in table:
        _apply_optimizer(config, table.pop("optimizer"), where)
    if "activation_checkpoint" in table:
        ac = dict(table.pop("activation_checkpoint"))
        kind = ac.pop("type", "selective")
        if kind not in AC_TYPES:
            raise TomlError(f"{where}: activation_checkpoint.type must be one of {sorted(AC_TYPES)}, got {kind!r}")
        config.activation_checkpoint = None if AC_TYPES[kind] is None else _apply(AC_TYPES[kind](), ac, "activation_checkpoint", where)
    config = _apply(config, table, "", where)
    validate = getattr(config, "validate_dblocks", None)
    if validate is not None:
        try:
            validate()
        except ValueError as e:
            raise TomlError(f"{where}: {e}") from None
    return config


def _check_keys(table: dict, allowed: set[str], section: str, where: str) -> None:
    for key in table:
        if key not in allowed:
            raise TomlError(f"{where}: unknown key '{section}.{key}' (allowed: {', '.join(sorted(allowed))})")


def _apply(obj: Any, table: dict[str, Any], prefix: str, where: str) -> Any:
    """Set each key of ``table`` on dataclass ``obj`` (recursing into tables); return ``obj``
    (a new instance when ``obj`` is a frozen dataclass)."""
    fields = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if key not in fields or key == "model_spec":
            raise TomlError(f"{where}: unknown key '{name}'")
        current = getattr(obj, key)
        if isinstance(value, dict):
            if not dataclasses.is_dataclass(current):
                raise TomlError(f"{where}: '{name}' is a value, not a section")
            value = _apply(current, value, f"{name}.", where)
        elif dataclasses.is_dataclass(current):
            raise TomlError(f"{where}: '{name}' is a section; write it as [{name}]")
        elif isinstance(current, bool) != isinstance(value, bool) and current is not None:
            raise TomlError(f"{where}: '{name}' expects {type(current).__name__}, got {value!r}")
        changes[key] = tuple(value) if isinstance(current, tuple) else value
    if obj.__dataclass_params__.frozen:
        return dataclasses.replace(obj, **changes)
    for key, value in changes.items():
        setattr(obj, key, value)
    return obj


def _apply_tokenizer(config, table: dict[str, Any], where: str) -> None:
    _check_keys(table, {"type", "path"}, "tokenizer", where)
    kind, path = table.get("type", "hf"), table.get("path")
    if kind == "char":
        config.tokenizer = CharTokenizer.Config()
    elif kind == "hf":
        config.tokenizer = HuggingFaceTokenizer.Config()
        if path is not None:
            config.hf_assets_path = path
    elif kind == "tiktoken":
        config.tokenizer = TiktokenTokenizer.Config(path=path)
    elif kind == "sentencepiece":
        config.tokenizer = SentencePieceTokenizer.Config(path=path)
    else:
        raise TomlError(f"{where}: tokenizer.type must be 'hf', 'tiktoken', 'sentencepiece' or 'char', got {kind!r}")


def _apply_optimizer(config, table: dict[str, Any], where: str) -> None:
    _check_keys(table, OPTIMIZER_KEYS | {"name"}, "optimizer", where)
    for group in config.optimizer.param_groups:
        if "name" in table:
            group.optimizer_name = table["name"]
        group.optimizer_kwargs.update({k: tuple(v) if k == "betas" else v for k, v in table.items() if k != "name"})


FLAG_ALIASES = {  # titan 0.2 spellings → titan 0.3 flags
    "--job.dump_folder": "--dump_folder",
    "--optimizer.lr": "--optimizer.param-groups.0.optimizer-kwargs.lr",
    "--optimizer.weight_decay": "--optimizer.param-groups.0.optimizer-kwargs.weight-decay",
}


def _titan_03_flag(arg: str) -> str:
    """``--job.dump_folder``, ``--optimizer.lr`` and ``--optimizer.weight_decay`` (param group 0: the
    only one our recipes build) as titan 0.3 spells them; any other argument unchanged."""
    flag, eq, value = arg.partition("=")
    return FLAG_ALIASES.get(flag, flag) + eq + value


class TomlConfigManager(ConfigManager):
    """titan's ConfigManager, plus ``--job.config_file X.toml`` as the source of defaults."""

    def _load_config(self, args: list[str]):
        rest, config_file = [], None
        it = iter(args)
        for arg in it:
            if arg == "--job.config_file":
                config_file = next(it, None)
            elif arg.startswith("--job.config_file="):
                config_file = arg.split("=", 1)[1]
            else:
                rest.append(_titan_03_flag(arg))
        if config_file is None:
            return super()._load_config(args)
        return load_toml(config_file), rest

    def _validate_config(self) -> None:
        # DBlocksTrainer runs these checks itself (whichever entry point built it); titan's
        # Trainer does not, so they run here for the e2e twin.
        if not hasattr(self.config, "validate_dblocks"):
            check_inputs(self.config)


def check_inputs(config) -> None:
    """Before any model is built: the tokenizer loads and fits the model's vocabulary, every dataset
    the run will read exists, and a checkpoint it will resume from fits its model."""
    from dblocks_titan.checkpoints import check_resume  # it raises this module's InputError

    try:
        if isinstance(config.tokenizer, HuggingFaceTokenizer.Config):
            if not (Path(config.hf_assets_path) / "tokenizer.json").is_file():
                raise FileNotFoundError(
                    f"no tokenizer.json in {config.hf_assets_path!r}; set [tokenizer] path or --hf_assets_path"
                )
        vocab = config.tokenizer.build(tokenizer_path=config.hf_assets_path).get_vocab_size()
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
        loaders = [config.dataloader] + ([config.validator.dataloader] if config.validator.enable else [])
        for loader in loaders:
            if isinstance(config.tokenizer, CharTokenizer.Config) and not isinstance(loader, Text8DataLoader.Config):
                raise ValueError(
                    f"the char tokenizer reads only text8-style text (a-z and space) but dataset "
                    f"{loader.dataset!r} is not one: use dataset text8, shakespeare_text8 or markov"
                )
            if hasattr(loader, "check"):  # loaders of this package check themselves
                loader.check()
            elif isinstance(loader, HuggingFaceTextDataLoader.Config):
                check_dataset(loader.dataset, loader.dataset_path)
        check_resume(config)
    except (OSError, ValueError, ImportError) as e:
        raise InputError(str(e)) from None
