"""User errors: a bad config value, flag, path, data file or checkpoint, reported in one line.

:class:`InputError` is what the validation pass (:mod:`dblocks_titan.inputs`), the checkpoint checks and
the command line raise. The entry points print it as ``<prog>: error: <message>`` and exit with 1, without
a traceback; ``--debug`` (or ``DBLOCKS_DEBUG=1``) shows the traceback too. Any other exception is a bug
and keeps its traceback. titan's own ``python -m torchtitan.train --module dblocks_titan`` prints an
InputError the same way through :func:`install_excepthook`.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

DEBUG_ENV = "DBLOCKS_DEBUG"
DEBUG_FLAG = "--debug"


class InputError(ValueError):
    """A bad config, flag, path, data file or checkpoint, found before anything is built: one line."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def take_debug_flag(argv: list[str]) -> list[str]:
    """``argv`` without ``--debug``; seeing it sets ``DBLOCKS_DEBUG=1`` (inherited by the ranks' processes)."""
    if DEBUG_FLAG in argv:
        os.environ[DEBUG_ENV] = "1"
    return [arg for arg in argv if arg != DEBUG_FLAG]


@contextmanager
def reported(prog: str):
    """Run the body; an :class:`InputError` exits with ``<prog>: error: <message>`` (traceback when debugging)."""
    try:
        yield
    except InputError as e:
        if debugging():
            raise
        sys.exit(f"{prog}: error: {one_line(e)}")


def install_excepthook(prog: str = "dblocks_titan") -> None:
    """An uncaught InputError prints one line (entry points that are not ours: titan's ``torchtitan.train``)."""
    previous = sys.excepthook

    def hook(kind, error, traceback):
        if issubclass(kind, InputError) and not debugging():
            print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        else:
            previous(kind, error, traceback)

    sys.excepthook = hook
