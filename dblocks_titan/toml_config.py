"""The command line: ``--job.config_file X.toml [--section.key value ...]`` on top of torchtitan 0.3.0's
Python config registry, and ``--help``.

:class:`TomlConfigManager` (titan's ``ConfigManager``, plugged into ``dblocks_titan.train`` and ``.eval``):

1. ``--job.config_file X.toml``: the file's tables give the run (:mod:`dblocks_titan.tables`); the flags
   that spell a TOML convenience key (``--tokenizer.type tiktoken --tokenizer.path F``, ``--optimizer.lr``,
   ``--model.flavor``, ``--activation_checkpoint.type``, ``--job.dump_folder``, ...) are laid over the
   file's tables before the recipe is built. Without a file, titan's own ``--module M --config fn``.
2. every other flag is titan's tyro parser, with the result of 1 as defaults, so flags win. A parse error
   (an unknown flag, a bad value) is one line naming the flag.
3. the validation pass (:func:`dblocks_titan.inputs.check_inputs`) over the whole tree, each value
   attributed to the file or the flag it came from.

Every failure is an :class:`InputError` (one line at the entry points; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import sys
import textwrap
import typing
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from typing import Literal

import tyro
from torchtitan.config.manager import ConfigManager, custom_registry

from dblocks_titan.checkpoints import DBlocksCheckpointManager
from dblocks_titan.config_registry import build_config, load_toml, TRAIN_CONFIGS
from dblocks_titan.errors import InputError, take_debug_flag
from dblocks_titan.inputs import check_inputs, field_hints, flag_key, flag_keys, leaves, passes, RULES, Sources
from dblocks_titan.tables import apply_tables, CONVENIENCE, flag_table, merge, read_toml, table_origins, TomlError
from dblocks_titan.trainer import DBlocksConfig

__all__ = ["InputError", "TomlConfigManager", "TomlError", "check_inputs", "load_toml", "usage"]

CONFIG_FLAG = "--job.config_file"


def _take_config_file(args: list[str]) -> tuple[str | None, list[str]]:
    config_file, rest = None, []
    it = iter(args)
    for arg in it:
        if arg == CONFIG_FLAG:
            config_file = next(it, None)
            if config_file is None:
                raise InputError(f"{CONFIG_FLAG} needs a value: the run's TOML file")
        elif arg.startswith(CONFIG_FLAG + "="):
            config_file = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return config_file, rest


class TomlConfigManager(ConfigManager):
    """titan's ConfigManager, plus ``--job.config_file X.toml`` as the source of defaults (module docstring)."""

    def __init__(self, prog: str = "python -m dblocks_titan.train"):
        super().__init__()
        self.prog = prog
        self.sources = Sources()

    def parse_args(self, args: list[str] | None = None):
        args = take_debug_flag(list(sys.argv[1:] if args is None else args))
        wants_help = "-h" in args or "--help" in args
        if wants_help:
            print(usage(self.prog))
        config_file, args = _take_config_file(args)
        if config_file is None and wants_help:
            sys.exit(0)
        if wants_help:  # titan's full help of this config (tyro prints it and exits 0)
            try:
                loaded, _ = self._load(config_file, args)
            except InputError as e:
                print(f"(titan's flags of {config_file} cannot be listed: {e})")
                sys.exit(0)
            parse_flags(loaded, ["--help"])
        loaded, rest = self._load(config_file, args)
        self.config = parse_flags(loaded, rest)
        self.sources.origins.update(flag_keys(rest))
        self._validate_config()
        return self.config

    def _load(self, config_file: str | None, args: list[str]):
        """(the config of the file or of ``--module/--config``, with the convenience flags applied; the other flags)."""
        overlay, overlay_origins, rest = flag_table(args)
        if config_file is not None:
            table = read_toml(config_file)
            self.sources = Sources({**table_origins(table, config_file), **overlay_origins})
            return build_config(merge(table, overlay), self.sources, config_file), rest
        if "--module" not in rest and not any(a.startswith("--module=") for a in rest):
            raise InputError(f"no config given: pass {CONFIG_FLAG} X.toml (e.g. train_configs/debug_dblocks.toml), or "
                             f"titan's --module dblocks_titan --config <function>; --help lists the flags")
        try:
            loaded, rest = super()._load_config(rest)
        except (ValueError, ImportError) as e:
            if not str(e).startswith("Config function"):
                raise InputError(str(e)) from None
            shipped = ", ".join(sorted(p.stem for p in TRAIN_CONFIGS.glob("*.toml")))
            raise InputError(f"{str(e).split('. Available')[0]}; dblocks_titan's are: {shipped}") from None
        if "model" in overlay:
            raise TomlError(f"--model.{next(iter(overlay['model']))} picks the recipe: use it with {CONFIG_FLAG}")
        self.sources = Sources(overlay_origins)
        return apply_tables(loaded, overlay, self.sources, "the command line"), rest

    def _validate_config(self) -> None:
        check_inputs(self.config, self.sources)


# -- tyro, with one-line errors -------------------------------------------------------------------


def known_flags(config) -> list[str]:
    """Every ``--section.key`` of ``config``'s tree and the TOML convenience flags."""
    keys = [key for key, _, _ in leaves(config)] + [f"{s}.{k}" for s, ks in CONVENIENCE.items() for k in ks]
    return [f"--{key}" for key in keys] + [CONFIG_FLAG]


def _flag_of(argument) -> str:
    """The flag of a tyro argument (tyro 1.0 ``ArgumentDefinition``), as typed by users: with the config's
    underscores (tyro displays ``--dblocks.shared-grads``, and accepts both)."""
    try:
        flag = str(argument.display_name())
    except Exception:  # another tyro version
        return str(argument)
    return "--" + flag[2:].replace("-", "_") if flag.startswith("--") else flag


def _event_message(event, config) -> str | None:
    """One line for a tyro parse error (``tyro._errors`` events), or None for tyro's own output."""
    name = type(event).__name__
    if name == "UnrecognizedArgs":
        token = next((t for t in event.tokens if t.startswith("-")), event.tokens[0])
        if not token.startswith("-"):
            return f"unexpected argument {token!r} (flags are --section.key VALUE; --help lists them)"
        key = flag_key(token)
        close = difflib.get_close_matches(f"--{key}", known_flags(config), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}? " if close else ""
        return f"unknown flag {token.split('=', 1)[0]} ({hint}--help lists the flags)"
    if name == "InvalidChoice":
        return f"{_flag_of(event.argument)} {event.value}: must be one of {', '.join(map(repr, event.choices))}"
    if name == "BadValue":
        value = f" {event.offending_value}" if event.offending_value is not None else ""
        what = "takes no value" if event.reason == "fixed" else "needs more values"
        return f"{_flag_of(event.argument)}{value}: {what}"
    if name == "InstantiationFailure":
        where = f"{_flag_of(event.argument)}: " if event.argument is not None else ""
        return where + " ".join(event.message.split())
    if name in ("MissingArgs", "MissingSubcommand", "MutexConflict", "SubcommandConflict"):
        return f"bad command line ({name}); --help lists the flags"
    return None


@contextmanager
def _one_line_parse_errors(config):
    """tyro's parse errors as one-line InputErrors, through tyro 1.0's parse-error hook (``tyro._errors``,
    a private module: without it, tyro's own error box is printed)."""
    errors = getattr(tyro, "_errors", None)
    if errors is None or not hasattr(errors, "on_parse_error"):
        yield
        return

    def hook(event):
        message = _event_message(event, config)
        if message is not None:
            raise InputError(message)

    with errors.on_parse_error(hook):
        yield


def _literal(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def check_flag_values(args: list[str]) -> None:
    """The ranges of :data:`dblocks_titan.inputs.RULES` on the flags' own text, before tyro builds the sections
    (whose ``__post_init__`` checks would otherwise report a bad value without its flag)."""
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag, eq, text = arg.partition("=")
        if not eq:
            if i + 1 == len(args) or args[i + 1].startswith("--"):
                continue
            text = args[i + 1]
        rule = RULES.get(flag_key(flag))
        if rule and not passes(rule[0], _literal(text)):
            raise InputError(f"{flag} {text}: must be {rule[1]}")


def parse_flags(config, args: list[str]):
    """titan's tyro parse of ``args`` over ``config`` (a ``ValueError`` of a section's own checks included)."""
    check_flag_values(args)
    with _one_line_parse_errors(config):
        try:
            return tyro.cli(type(config), args=args, default=config, registry=custom_registry)
        except ValueError as e:  # raised by a Config's __post_init__ outside tyro's handler
            raise InputError(str(e)) from None


# -- --help --------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (as tyro shows it as help)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flag_lines(cls: type, prefix: str, instance=None) -> list[str]:
    instance = instance if instance is not None else cls()
    docs, hints, lines = field_docs(cls), field_hints(cls), []
    for f in fields(cls):
        value, flag = getattr(instance, f.name), f"--{prefix}{f.name}"
        if is_dataclass(value):
            lines += _flag_lines(type(value), f"{flag[2:]}.", value)
            continue
        hint = hints.get(f.name)
        if hint is bool:
            head, _, last = flag.rpartition(".")
            flag = f"{flag} / {head}.no-{last}"
        elif typing.get_origin(hint) is Literal:
            flag += " {" + ",".join(typing.get_args(hint)) + "}"
        else:
            flag += f" {getattr(hint, '__name__', 'VALUE').upper()}"
        lines.append(_entry(flag, f"{docs.get(f.name, '')} (default: {value!r})"))
    return lines


def _entry(flag: str, help_text: str) -> str:
    wrapped = textwrap.wrap(help_text, 70) or [""]
    head = f"  {flag:<34} {wrapped[0]}" if len(flag) <= 34 else f"  {flag}\n  {'':<34} {wrapped[0]}"
    return "\n".join([head] + [f"  {'':<34} {line}" for line in wrapped[1:]])


CONVENIENCE_HELP = {
    "model.name": "dblocks_llama (AR DiffusionBlocks) | llama3 (its titan twin) | dblocks_mdlm | mdlm",
    "model.flavor": "debugmodel | 125M | 1B | 8B | owt | text8 ... (the model's shape)",
    "model.attn_backend": "auto | sdpa | flex",
    "model.vocab_size": "the model's vocabulary (default: the flavor's)",
    "model.float8": "none | rowwise | emulate",
    "job.dump_folder": "where checkpoints, metrics and traces go (also --dump_folder)",
    "job.description": "a note (logged only)",
    "tokenizer.type": "hf | tiktoken | sentencepiece | char",
    "tokenizer.path": "hf: the folder of tokenizer.json; tiktoken / sentencepiece: the .tiktoken / .model file",
    "optimizer.name": "AdamW | Adam (every param group)",
    "optimizer.lr": "learning rate (> 0)",
    "optimizer.weight_decay": "weight decay (>= 0)",
    "optimizer.betas": "two numbers in [0, 1), e.g. 0.9,0.95",
    "optimizer.eps": "Adam's epsilon (> 0)",
    "activation_checkpoint.type": "none | selective | full (titan's activation checkpointing)",
}


def usage(prog: str) -> str:
    """The ``--help`` text: how to launch, the TOML keys that are flags, the DiffusionBlocks flags."""
    shipped = ", ".join(sorted(p.stem for p in TRAIN_CONFIGS.glob("*.toml")))
    lines = [
        f"usage: {prog} {CONFIG_FLAG} X.toml [--section.key VALUE ...] [--debug]",
        f"       torchrun --nproc_per_node=N -m {prog.split()[-1]} {CONFIG_FLAG} X.toml [...]",
        "",
        "DiffusionBlocks block-wise training on torchtitan 0.3.0. The TOML file gives the run; flags after it",
        "override it (TOML [section] key = value is the flag --section.key VALUE).",
        "",
        _entry(f"{CONFIG_FLAG} X.toml", f"the run's TOML file; shipped in train_configs/: {shipped}"),
        _entry("--debug", "show the traceback of an input error (also DBLOCKS_DEBUG=1)"),
        _entry("-h, --help", f"this help; with {CONFIG_FLAG} X.toml also titan's flags for that run"),
        "",
        "TOML keys that are not titan fields, as flags:",
        *(_entry(f"--{key} VALUE", text) for key, text in CONVENIENCE_HELP.items()),
        "",
        "DiffusionBlocks ([dblocks] in the TOML file):",
        *_flag_lines(DBlocksConfig, "dblocks."),
        "",
        "Checkpoints ([checkpoint]; titan's --checkpoint.* flags too):",
        _entry("--checkpoint.fallback_to_previous",
               field_docs(DBlocksCheckpointManager.Config)["fallback_to_previous"] + " (default: False)"),
        "",
        f"titan's own flags (--training.steps, --checkpoint.enable, --parallelism.*, ...): {prog} "
        f"{CONFIG_FLAG} X.toml --help",
        "titan's native launch also works: python -m torchtitan.train --module dblocks_titan --config debug_dblocks",
    ]
    return "\n".join(lines)
