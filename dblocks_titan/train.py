"""Entry point: ``torchrun --nproc_per_node=N -m dblocks_titan.train --job.config_file X.toml [--sec.key v ...]``.

Also accepts titan's own ``--module dblocks_titan --config <fn>``. It is titan's ``main``
(``torchtitan.train.main``) with the TOML-aware config manager plugged in. Without torchrun
(``python -m dblocks_titan.train ...``) it runs as a single process. ``--help`` prints the usage; a bad
input is one line ``dblocks_titan: error: ...`` (``--debug`` or ``DBLOCKS_DEBUG=1``: with its traceback).
"""

from __future__ import annotations

import os

import dblocks_titan  # noqa: F401  (applies the compat patches before titan is imported)
import torchtitan.train as titan_train

from dblocks_titan import compat
from dblocks_titan.errors import reported
from dblocks_titan.toml_config import TomlConfigManager


def _single_process_env() -> None:
    """Let a plain ``python -m`` run behave like ``torchrun --nproc_per_node=1``."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def main() -> None:
    _single_process_env()
    titan_train.ConfigManager = TomlConfigManager
    with reported("dblocks_titan"):
        titan_train.main()
    compat.exit_after_distributed_run()


if __name__ == "__main__":
    main()
