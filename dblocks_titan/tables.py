"""TOML tables onto a ``Trainer.Config`` tree: a file's, and the command line's flags of the same spelling.

A TOML file is applied onto a base recipe (``config_registry.recipe``, picked by its ``[model]`` table):

1. ``[model] name, flavor, attn_backend, vocab_size, float8`` pick the recipe (:func:`model_kwargs`);
2. ``[job] dump_folder, description`` → ``dump_folder`` (description is only logged);
3. ``[tokenizer] type = "hf" | "tiktoken" | "sentencepiece" | "char", path`` → the tokenizer
   (``hf``: a folder with ``tokenizer.json``; tiktoken / sentencepiece: a ``.tiktoken`` / ``.model`` file);
4. ``[optimizer] name, lr, weight_decay, betas, eps`` → every param group of titan's optimizer;
5. ``[activation_checkpoint] type = "none" | "selective" | "full"`` (+ that policy's fields);
6. every other table maps onto the ``Trainer.Config`` tree field by field (nested tables for nested
   configs, e.g. ``[validator.dataloader]``).

The keys of 1-5 (:data:`CONVENIENCE`) are also flags (``--tokenizer.type tiktoken --optimizer.lr 3e-4``):
:func:`flag_table` takes them out of the command line as a table laid over the file's. An unknown
section or key, a value of the wrong type or a bad TOML file is a one-line :class:`TomlError`.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

from dblocks_titan.data.chars import CharTokenizer
from dblocks_titan.data.tokenizers import SentencePieceTokenizer, TiktokenTokenizer
from dblocks_titan.errors import InputError
from dblocks_titan.inputs import conforms, describe, field_hints, passes, RULES, Sources
from dblocks_titan.models.block_denoiser import Conditioning
from dblocks_titan.models.dblocks_llama import NoisySlot

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

AC_TYPES = {"none": None, "selective": SelectiveAC.Config, "full": FullAC.Config}
TOKENIZER_TYPES = ("hf", "tiktoken", "sentencepiece", "char")
MODEL_KEYS: dict[str, Any] = {
    "name": str, "flavor": str, "attn_backend": str, "vocab_size": int, "n_layers": int, "float8": str,
    "mean_depth": float, "backprop_depth": int, "inference_depth": int,  # the recurrent models
    **field_hints(Conditioning), **field_hints(NoisySlot),  # what shapes a DiffusionBlocks model
}
CONVENIENCE: dict[str, dict[str, Any]] = {
    "model": MODEL_KEYS,
    "job": {"dump_folder": str, "description": str},
    "tokenizer": {"type": str, "path": str},
    "optimizer": {"name": str, "lr": float, "weight_decay": float, "betas": tuple, "eps": float},
    "activation_checkpoint": {"type": str},
}
"""The keys that are not fields of the config tree (section → key → type), as TOML keys and as flags."""


class TomlError(InputError):
    """A TOML file (or a flag of the same spelling) that does not describe a config."""


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TomlError(f"config file not found: {path} (--job.config_file)")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TomlError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise TomlError(f"{path}: not a TOML file (not UTF-8 text)") from None
    except OSError as e:
        raise TomlError(f"{path}: cannot be read ({e.strerror})") from None


def table_origins(table: dict[str, Any], origin: str, prefix: str = "") -> dict[str, str]:
    """Dotted key → ``origin`` for every value of ``table`` (``[job] dump_folder`` also as ``dump_folder``)."""
    out = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(table_origins(value, origin, f"{name}."))
        else:
            out[name] = origin
            if name == "job.dump_folder":  # the tree's key
                out["dump_folder"] = origin
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid over ``base``, table by table."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# -- the command line's convenience flags --------------------------------------------------------


def _parse(text: str, kind: Any) -> Any:
    """``text`` as a value of ``kind`` (a plain type, a tuple of numbers, or an optional ``X | None``:
    ``none`` unsets it); ValueError when it is not one."""
    if kind is tuple:  # --optimizer.betas 0.9,0.95 (or [0.9, 0.95])
        return tuple(float(v) for v in text.strip("[]() ").split(","))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in typing.get_args(kind):
            return None
        for arg in typing.get_args(kind):
            if arg is not type(None):
                try:
                    return _parse(text, arg)
                except ValueError:
                    pass
        raise ValueError(text)
    return kind(text)


def _flag_value(flag: str, text: str, kind: Any) -> Any:
    try:
        return _parse(text, kind)
    except ValueError:
        allowed = "two numbers, e.g. 0.9,0.95" if kind is tuple else describe(kind)
        raise TomlError(f"{flag} {text}: must be {allowed}") from None


def flag_table(argv: list[str]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(table of the :data:`CONVENIENCE` flags in ``argv``, their origins, the other arguments)."""
    table: dict[str, dict[str, Any]] = {}
    origins: dict[str, str] = {}
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        flag, eq, text = arg.partition("=")
        section, _, key = flag[2:].replace("-", "_").partition(".") if flag.startswith("--") else ("", "", "")
        kind = CONVENIENCE.get(section, {}).get(key)
        if kind is None:
            rest.append(arg)
            continue
        if not eq:
            text = next(it, None)
            if text is None:
                raise TomlError(f"{flag} needs a value")
        table.setdefault(section, {})[key] = _flag_value(flag, text, kind)
        origins[f"{section}.{key}"] = flag
        if (section, key) == ("job", "dump_folder"):  # the tree's key
            origins["dump_folder"] = flag
    return table, origins, rest


# -- a table onto the config tree ----------------------------------------------------------------


def _check_keys(table: dict, section: str, where: str) -> None:
    if not isinstance(table, dict):
        raise TomlError(f"{where}: '{section}' is a section; write it as [{section}]")
    allowed = CONVENIENCE[section]
    for key in table:
        if key not in allowed:
            raise TomlError(f"{where}: unknown key '{section}.{key}' (allowed: {', '.join(sorted(allowed))})")


def _check_types(table: dict, section: str, sources: Sources) -> None:
    for key, value in table.items():
        kind = CONVENIENCE[section][key]
        ok = isinstance(value, (list, tuple)) if kind is tuple else conforms(value, kind)
        if not ok:
            raise sources.fail(f"{section}.{key}", value, "a list" if kind is tuple else describe(kind))


def model_kwargs(table: dict[str, Any], sources: Sources, where: str) -> dict[str, Any]:
    """``[model]`` checked: the keyword arguments of ``config_registry.recipe``."""
    _check_keys(table, "model", where)
    _check_types(table, "model", sources)
    for key in ("vocab_size", "n_layers"):
        if table.get(key, 1) < 1:
            raise sources.fail(f"model.{key}", table[key], "an int >= 1")
    return dict(table)


def apply_tables(config: Any, table: dict[str, Any], sources: Sources, where: str) -> Any:
    """Apply every table but ``[model]`` onto ``config`` (steps 2-6 of the module docstring); return it."""
    table = dict(table)
    for section in ("job", "tokenizer", "optimizer"):
        if section in table:
            _check_keys(table[section], section, where)
    if "job" in table:
        job = table.pop("job")
        _check_types(job, "job", sources)
        config.dump_folder = job.get("dump_folder", config.dump_folder)
    if "tokenizer" in table:
        _apply_tokenizer(config, table.pop("tokenizer"), sources)
    if "optimizer" in table:
        _apply_optimizer(config, table.pop("optimizer"), sources)
    if "activation_checkpoint" in table:
        ac = table.pop("activation_checkpoint")
        if not isinstance(ac, dict):
            raise TomlError(f"{where}: 'activation_checkpoint' is a section; write it as [activation_checkpoint]")
        ac = dict(ac)
        kind = ac.pop("type", "selective")
        if kind not in AC_TYPES:
            raise sources.fail("activation_checkpoint.type", kind, "one of " + ", ".join(map(repr, AC_TYPES)))
        policy = AC_TYPES[kind]
        config.activation_checkpoint = None if policy is None else _apply(policy(), ac, "activation_checkpoint.",
                                                                            sources, where)
    return _apply(config, table, "", sources, where)


def _apply(obj: Any, table: dict[str, Any], prefix: str, sources: Sources, where: str) -> Any:
    """Set each key of ``table`` on dataclass ``obj`` (recursing into tables), each value checked against
    the field's annotation; return ``obj`` (a new instance when ``obj`` is a frozen dataclass)."""
    fields = {f.name for f in dataclasses.fields(obj)}
    hints = field_hints(type(obj))
    changes = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if key not in fields or key == "model_spec":
            raise TomlError(f"{where}: unknown key '{name}'")
        current = getattr(obj, key)
        if isinstance(value, dict):
            if not dataclasses.is_dataclass(current):
                raise TomlError(f"{where}: '{name}' is a value, not a section")
            value = _apply(current, value, f"{name}.", sources, where)
        elif dataclasses.is_dataclass(current):
            raise TomlError(f"{where}: '{name}' is a section; write it as [{name}]")
        else:
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            rule = RULES.get(name)
            if conforms(value, hints.get(key)) is False or (rule and not passes(rule[0], value)):
                raise sources.fail(name, value, rule[1] if rule else describe(hints.get(key)))
        changes[key] = value
    if obj.__dataclass_params__.frozen:
        try:
            return dataclasses.replace(obj, **changes)
        except ValueError as e:  # the section's own checks (e.g. EDMConfig's)
            raise TomlError(f"{where}: [{prefix.rstrip('.')}]: {e}") from None
    for key, value in changes.items():
        setattr(obj, key, value)
    return obj


def _apply_tokenizer(config: Any, table: dict[str, Any], sources: Sources) -> None:
    _check_types(table, "tokenizer", sources)
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
        raise sources.fail("tokenizer.type", kind, "one of " + ", ".join(map(repr, TOKENIZER_TYPES)))


def _apply_optimizer(config: Any, table: dict[str, Any], sources: Sources) -> None:
    _check_types(table, "optimizer", sources)
    for group in config.optimizer.param_groups:
        if "name" in table:
            group.optimizer_name = table["name"]
        group.optimizer_kwargs.update({k: tuple(v) if k == "betas" else v for k, v in table.items() if k != "name"})
